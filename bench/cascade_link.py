#!/usr/bin/env python3
"""The adaptive cascade threshold on a slow link: calibrated threshold alone, then adaptive.

Needs root (network namespaces). Builds the sweep's emulated link (a veth pair between two
namespaces of our own, ``tc tbf`` at ``--mbit``, and a user-space delay proxy for ``--rtt-ms``),
runs edge-server in the server namespace, and ``edge cascade eval`` in the device namespace on
the held-out digits the calibration did not see, twice: with the calibrated threshold alone, and
with ``--max-extra-loss PP --escalation-deadline-ms MS``. Prints both reports side by side.

    sudo python bench/cascade_link.py --cascade cal.json --data eval.npz --mbit 1 --rtt-ms 10 \\
        --max-extra-loss 1 --escalation-deadline-ms 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.cascade import Calibration  # noqa: E402
from edge.emulation.netns import NetnsLink  # noqa: E402
from edge.emulation.sweep import PROXY_PORT, SERVER_PORT, _stop, _wait_for_line  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cascade", type=Path, required=True, metavar="CAL.json")
    p.add_argument("--data", type=Path, required=True, metavar="FILE.npz")
    p.add_argument("--mbit", type=float, default=1.0)
    p.add_argument("--rtt-ms", type=float, default=10.0)
    p.add_argument("--max-extra-loss", type=float, default=1.0, metavar="PP")
    p.add_argument("--escalation-deadline-ms", type=float, default=20.0, metavar="MS")
    args = p.parse_args()
    calibration = Calibration.load(args.cascade)
    big = calibration.big.load("big")
    work = Path(tempfile.mkdtemp(prefix="cascade-link-"))
    models = work / "models"
    models.mkdir()
    shutil.copy(
        Path(big.source), models / Path(big.source).name
    )  # the server refuses links out of its directory
    reports = {}
    with NetnsLink() as link:
        link.shape(args.mbit)
        server = link.popen(
            link.server_ns,
            [sys.executable, "-m", "server", "--models", str(models), "--host", "127.0.0.1", "--port",
             str(SERVER_PORT)],
            stdout=subprocess.PIPE, stderr=(work / "server.log").open("w"), cwd=REPO,
        )  # fmt: skip
        proxy = link.popen(
            link.server_ns,
            [sys.executable, "-m", "edge.emulation.proxy", "--listen", f"{link.server_ip}:{PROXY_PORT}",
             "--upstream", f"127.0.0.1:{SERVER_PORT}", "--delay-ms", f"{args.rtt_ms / 2:g}"],
            stdout=subprocess.PIPE, stderr=(work / "proxy.log").open("w"), cwd=REPO,
        )  # fmt: skip
        try:
            _wait_for_line(server, "edge-server: serving", 60.0, "edge server")
            _wait_for_line(proxy, "listening on", 30.0, "delay proxy")
            base = [sys.executable, "-m", "edge", "cascade", "eval", "--cascade", str(args.cascade.resolve()),
                    "--data", str(args.data.resolve()), "--server", f"{link.server_ip}:{PROXY_PORT}",
                    "--timeout", "5", "--json"]  # fmt: skip
            adaptive = ["--max-extra-loss", f"{args.max_extra_loss:g}",
                        "--escalation-deadline-ms", f"{args.escalation_deadline_ms:g}"]  # fmt: skip
            for name, extra in (("calibrated", []), ("adaptive", adaptive)):
                device = link.popen(link.device_ns, [*base, *extra], stdout=subprocess.PIPE, cwd=REPO)
                out, _ = device.communicate(timeout=600)
                if device.returncode != 0:
                    raise SystemExit(f"cascade eval ({name}) failed with {device.returncode}")
                reports[name] = json.loads(out)
        finally:
            _stop(proxy)
            _stop(server)
    keys = ("local_share", "accuracy", "reference_accuracy", "loss_pp", "bytes_per_request", "mean_e2e_ms",
            "escalated", "relaxed_answers", "fallbacks")  # fmt: skip
    result = {
        "link": {"mbit": args.mbit, "rtt_ms": args.rtt_ms},
        "adaptive": {
            "max_extra_loss_pp": args.max_extra_loss,
            "escalation_deadline_ms": args.escalation_deadline_ms,
        },
        **{name: {k: r[k] for k in keys} for name, r in reports.items()},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
