#!/usr/bin/env python3
"""A/B the request path against another commit: split overhead and the 8-device fleet, alternately.

Each round runs, in the other commit's checkout and then in this one, on the same machine:

- ``overhead``: ``edge bench --model M --split-at K -n N --json`` pinned to one core (device and
  server share it); the figure is ``overhead_ms.p50``, the request's time outside the head, the
  tail's compute and the server's queue (lower is better);
- ``fleet``: ``bench/fleet.py --devices D`` (this checkout's script, run against the other's
  package), edge-server pinned to core 1 with ``--workers 0``, the devices on core 0; the figure is
  ``ratio``, answers per second over the raw interpreter's runs per second (higher is better).

It prints every round, both medians and the ratio this/other, and ``--json`` a summary. Each
round's own ratio (this/other, run back to back) gives a 95 % bootstrap interval of the median
ratio: a difference smaller than that interval is not resolved on this machine. The two sides take
turns going first, so neither always runs second. ``bench/ab.py HEAD`` (this commit against itself)
shows the machine's own spread.

The other commit gets a git worktree and a venv of its own under ``$TMPDIR`` (made once, kept while its
``pyproject.toml`` is unchanged); this checkout runs with the interpreter running this script.

    python bench/ab.py 24f5b74 --model /tmp/zoo/mobilenetv2_224.tflite --rounds 5
    python bench/ab.py HEAD~1 --only overhead
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("overhead", "fleet")
BETTER = {"overhead": "lower", "fleet": "higher"}


def checkout(rev: str) -> tuple[Path, Path]:
    """The worktree of ``rev`` and the python of its venv, made if need be."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
    ).stdout.strip()
    tmp = Path(tempfile.gettempdir())
    tree, venv = tmp / f"edge-ab-{sha}", tmp / f"edge-ab-venv-{sha}"
    if not tree.is_dir():
        print(f"ab: git worktree for {sha} in {tree}", file=sys.stderr)
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "-f", "-q", "--detach", str(tree), sha], check=True
        )
    stamp = hashlib.sha256((tree / "pyproject.toml").read_bytes()).hexdigest()[:16]
    python = venv / "bin" / "python"
    if not python.exists() or (venv / ".stamp").read_text(errors="replace") != stamp:
        print(f"ab: venv for {sha} in {venv} (a minute or two, once)", file=sys.stderr)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-e", str(tree), "tritonclient[grpc]"], check=True)
        (venv / ".stamp").write_text(stamp)
    return tree, python


def run_figure(figure: str, tree: Path, python: Path, args: argparse.Namespace) -> float:
    env = {**os.environ, "PATH": f"{python.parent}:{os.environ['PATH']}", "PYTHONPATH": str(tree)}
    if figure == "overhead":
        command = ["taskset", "-c", "0", str(python), "-m", "edge", "bench", "--model", args.model,
                   "--split-at", str(args.cut), "-n", str(args.n), "--json"]  # fmt: skip
    else:
        script = REPO / "bench" / "fleet.py"
        if tree != REPO:  # this checkout's fleet script, run against the other commit's package
            script = tree / "bench" / "_ab_fleet.py"
            shutil.copy(REPO / "bench" / "fleet.py", script)
        command = [str(python), str(script), "--model", args.model, "--cut", str(args.cut),
                   "--devices", str(args.devices), "--seconds", str(args.seconds), "--json",
                   "--server-cores", "1", "--device-cores", "0", "--", "--workers", "0"]  # fmt: skip
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"ab: {figure} failed in {tree}:\n{done.stderr[-2000:]}")
    text = done.stdout.strip()
    try:
        report = json.loads(text)  # edge bench's JSON, indented in older commits
    except json.JSONDecodeError:
        report = json.loads(text.splitlines()[-1])  # the fleet's, after its progress lines
    return float(report["overhead_ms"]["p50"] if figure == "overhead" else report["ratio"])


def interval(ratios: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median of the rounds' own ratios (seeded: the same rounds give
    the same interval)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="the commit to compare this checkout with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default="mobilenetv2_035", help="a shipped model's name, or a .tflite path")
    p.add_argument("--cut", type=int, default=32)
    p.add_argument("-n", type=int, default=1000, help="requests per overhead run")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0, help="the fleet's timed window")
    p.add_argument("--only", choices=FIGURES, help="one figure only")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if Path(args.model).suffix == ".tflite":
        args.model = str(Path(args.model).resolve())
    tree, python = checkout(args.rev)
    sides = {"base": (tree, python), "head": (REPO, Path(sys.executable))}
    figures = (args.only,) if args.only else FIGURES
    values: dict[str, dict[str, list[float]]] = {f: {"base": [], "head": []} for f in figures}
    for i in range(1, args.rounds + 1):
        for figure in figures:
            for side in ("base", "head") if i % 2 else ("head", "base"):
                where, interpreter = sides[side]
                values[figure][side].append(run_figure(figure, where, interpreter, args))
            base, head = values[figure]["base"][-1], values[figure]["head"][-1]
            print(f"round {i} {figure:>8}: base {base:.4g}  head {head:.4g}", file=sys.stderr, flush=True)
    summary = {}
    for figure in figures:
        base, head = (statistics.median(values[figure][s]) for s in ("base", "head"))
        ratios = [h / b for b, h in zip(values[figure]["base"], values[figure]["head"], strict=True)]
        low, high = interval(ratios)
        summary[figure] = {
            "base_median": base, "head_median": head, "head_over_base": head / base,
            "round_ratio_median": statistics.median(ratios), "round_ratio_interval_95": [low, high],
            "better": BETTER[figure], "base": values[figure]["base"], "head": values[figure]["head"],
        }  # fmt: skip
        print(
            f"{figure}: base {args.rev} median {base:.4g}, head median {head:.4g}, head/base {head / base:.3f}"
            f" ({BETTER[figure]} is better); the rounds' own ratios: median {statistics.median(ratios):.3f},"
            f" 95 % interval {low:.3f} - {high:.3f}"
        )
    if args.json:
        print(json.dumps({"rev": args.rev, "model": args.model, "cut": args.cut, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
