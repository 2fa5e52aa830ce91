"""The work behind ``edge bench sweep`` (see :mod:`edge.cli.sweep` for what it measures): set up
each emulated scenario, run the device under ``--split-at auto`` and then at every cut, and
write the JSON, the PNG and the summary table. Needs root.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import models
from ..console import output_console
from ..graph import ModelGraph
from .netns import EmulationError, NetnsLink, check_privileges
from .report import Summary, plot, summarize

__all__ = ["Scenario", "codec_path", "run", "scenarios_from"]

logger = logging.getLogger(__name__)

SERVER_PORT = 8001
PROXY_PORT = 9001


@dataclass(frozen=True, slots=True)
class Scenario:
    mbit: float
    rtt_ms: float
    slowdown: float

    @property
    def key(self) -> str:
        return f"{self.mbit:g}mbit-{self.rtt_ms:g}ms-{self.slowdown:g}x"

    @property
    def label(self) -> str:
        device = "device 1x" if self.slowdown == 1 else f"device {self.slowdown:g}x slower (emulated)"
        return f"{self.mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT, {device}"


def scenarios_from(
    bandwidths: list[float], rtts: list[float], slowdowns: list[float], only: list[str] | None = None
) -> list[Scenario]:
    """The grid, optionally reduced to the scenarios named by key (``10mbit-5ms-4x``)."""
    grid = [Scenario(b, r, s) for s in slowdowns for b in bandwidths for r in rtts]
    if not only:
        return grid
    wanted = {key.strip().lower() for key in only}
    chosen = [s for s in grid if s.key in wanted]
    unknown = wanted - {s.key for s in chosen}
    if unknown:
        raise EmulationError(
            f"unknown scenario(s) {', '.join(sorted(unknown))}; keys look like {grid[0].key} "
            f"(from --bandwidths, --rtts and --slowdowns)"
        )
    return chosen


def run(args: argparse.Namespace) -> int:
    check_privileges()
    graph = ModelGraph.from_file(models.resolve(args.model))
    scenarios = scenarios_from(args.bandwidths, args.rtts, args.slowdowns, args.scenarios)
    command = "edge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    console = Console(stderr=True)
    started = time.time()
    results: list[dict[str, Any]] = []
    summaries: list[Summary] = []
    with ExitStack() as stack, _sigterm_exits():
        work = Path(tempfile.mkdtemp(prefix="edge-sweep-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        link = stack.enter_context(NetnsLink())
        server = _start_server(link, graph, work, args)
        stack.callback(_stop, server)
        progress = stack.enter_context(
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
        )
        overall = progress.add_task("scenarios", total=len(scenarios))
        for scenario in scenarios:
            result = _run_scenario(link, graph, scenario, work, args, progress)
            summary = summarize(scenario.key, result)
            summaries.append(summary)
            results.append({"key": scenario.key, "label": scenario.label, "scenario": _describe(scenario),
                            "summary": summary.as_dict(), "result": result})  # fmt: skip
            progress.advance(overall)
            _save(args, graph, results, command, started)
    _print_summary(summaries, graph)
    return 0 if all(s.ratio <= 1.10 for s in summaries) else 1


# -- one scenario -------------------------------------------------------------------------------


def _run_scenario(
    link: NetnsLink,
    graph: ModelGraph,
    scenario: Scenario,
    work: Path,
    args: argparse.Namespace,
    progress: Progress,
) -> dict[str, Any]:
    link.shape(scenario.mbit)
    proxy = link.popen(
        link.server_ns,
        [sys.executable, "-m", "edge.emulation.proxy", "--listen", f"{link.server_ip}:{PROXY_PORT}",
         "--upstream", f"127.0.0.1:{SERVER_PORT}", "--delay-ms", f"{scenario.rtt_ms / 2:g}"],
        stdout=subprocess.PIPE, stderr=(work / f"proxy-{scenario.key}.log").open("w"),
    )  # fmt: skip
    try:
        _wait_for_line(proxy, "listening on", 30.0, "delay proxy")
        log = work / f"device-{scenario.key}.log"
        argv = [
            sys.executable, "-m", "edge.emulation.device", "--model", str(Path(graph.source).resolve()),
            "--server", f"{link.server_ip}:{PROXY_PORT}", "--slowdown", f"{scenario.slowdown:g}",
            "--threads", str(args.threads), "--adapt", str(args.adapt), "--requests", str(args.requests),
            "--pilots", str(args.pilots), "--prune", str(args.prune), "--timeout", str(args.timeout),
            "--gap-ms", f"{args.gap_ms:g}", "--codec", codec_path(args.codec),
        ]  # fmt: skip
        if args.cuts:
            argv += ["--cuts", *map(str, args.cuts)]
        if args.codec_max_loss is not None:
            argv += ["--max-loss", f"{args.codec_max_loss:g}"]
        env = {**os.environ, "EDGE_CACHE_DIR": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
        device = link.popen(link.device_ns, argv, stdout=subprocess.PIPE, stderr=log.open("w"), env=env)
        try:
            return _follow(device, progress, scenario, log)
        finally:
            _stop(device)
    finally:
        _stop(proxy)


def codec_path(codec: object) -> str:
    """How a codec is named on another process's command line: its name, or its file's full path."""
    source = getattr(codec, "source", None)
    return str(Path(source).resolve()) if source else str(codec)


def _follow(
    device: subprocess.Popen[str], progress: Progress, scenario: Scenario, log: Path
) -> dict[str, Any]:
    task = progress.add_task(f"  {scenario.key}: plan", total=None)
    try:
        assert device.stdout is not None
        for line in device.stdout:
            event = json.loads(line)
            if event["event"] == "result":
                return dict(event["result"])
            progress.update(
                task,
                description=f"  {scenario.key}: {event['stage']}",
                completed=event["done"],
                total=event["total"],
            )
        device.wait(timeout=10)
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise EmulationError(
            f"{scenario.key}: the device exited with {device.returncode} and no result\n{tail}"
        )
    finally:
        progress.remove_task(task)


# -- processes ----------------------------------------------------------------------------------


def _start_server(
    link: NetnsLink, graph: ModelGraph, work: Path, args: argparse.Namespace
) -> subprocess.Popen[str]:
    models = work / "models"
    models.mkdir()
    shutil.copy(
        Path(graph.source), models / Path(graph.source).name
    )  # a link out of the directory is refused
    server = link.popen(
        link.server_ns,
        [sys.executable, "-m", "server", "--models", str(models), "--host", "127.0.0.1", "--port", str(SERVER_PORT),
         "--threads", str(args.server_threads), "--cache-size", str(2 * (graph.num_operators + 1) + 4)],
        stdout=subprocess.PIPE, stderr=(work / "server.log").open("w"),
    )  # fmt: skip
    try:
        _wait_for_line(server, "edge-server: serving", 60.0, "edge server")
    except BaseException:
        _stop(server)
        raise
    return server


def _wait_for_line(proc: subprocess.Popen[str], marker: str, timeout_s: float, what: str) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    stream: IO[str] = proc.stdout
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([stream], [], [], remaining)
        if not readable:
            break
        line = stream.readline()
        if marker in line:
            return
        if not line and proc.poll() is not None:
            raise EmulationError(f"the {what} exited with {proc.returncode} before it was ready")
    raise EmulationError(f"the {what} was not ready within {timeout_s:g}s")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the namespaces and processes are cleaned up."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- output -------------------------------------------------------------------------------------


def _describe(scenario: Scenario) -> dict[str, Any]:
    return {
        "bandwidth_mbit_s": scenario.mbit,
        "rtt_ms": scenario.rtt_ms,
        "device_slowdown": scenario.slowdown,
    }


def _save(
    args: argparse.Namespace, graph: ModelGraph, results: list[dict[str, Any]], command: str, started: float
) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": Path(graph.source).stem,
        "model_sha256": graph.sha256,
        "num_operators": graph.num_operators,
        "command": command,
        "machine": {"cpus": os.cpu_count(), "processor": _cpu_model(), "python": platform.python_version()},
        "emulation": {
            "bandwidth": "tc qdisc tbf (burst 1 ms of traffic, 1 s queue) on both ends of a veth pair between two "
            "network namespaces",
            "delay": "user-space asyncio TCP proxy in the server namespace, RTT/2 each way, per-direction FIFO",
            "device": "this machine's CPU at --threads; a slower device is emulated by time dilation: each "
            "device-side inference is followed by a sleep of (slowdown - 1) x its measured duration",
            "server": f"edge-server on this machine, {args.server_threads} thread(s), in the server namespace",
        },
        "settings": {
            "requests": args.requests,
            "pilots": args.pilots,
            "prune": args.prune,
            "adapt": args.adapt,
            "gap_ms": args.gap_ms,
            "threads": args.threads,
        },
        "elapsed_s": round(time.time() - started, 1),
        "summary": [r["summary"] for r in results],
        "scenarios": results,
    }
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, out / f"{args.name}.png", title=f"{report['model']}: measured vs predicted latency per cut")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print_summary(summaries: list[Summary], graph: ModelGraph) -> None:
    console = output_console(min_width=140)
    n = graph.num_operators
    table = Table(title=f"{Path(graph.source).stem}: planner's cut vs best measured (N = {n}), median e2e ms")
    for column in ("scenario", "chosen K", "ms", "best K", "ms", "ratio", "device-only ms", "server-only ms",
                   "vs device", "vs server"):  # fmt: skip
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for s in summaries:
        table.add_row(
            s.scenario, str(s.chosen), f"{s.chosen_ms:.2f}", str(s.best), f"{s.best_ms:.2f}", f"{s.ratio:.3f}",
            f"{s.device_only_ms:.2f}", f"{s.server_only_ms:.2f}", f"{s.speedup_vs_device:.2f}x",
            f"{s.speedup_vs_server:.2f}x", style=None if s.ratio <= 1.10 else "bold red",
        )  # fmt: skip
    console.print(table)
    worst = max(summaries, key=lambda s: s.ratio)
    console.print(f"worst chosen/best ratio: {worst.ratio:.3f} ({worst.scenario}); bar: 1.10")
