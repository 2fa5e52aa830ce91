"""``edge run``: the long-running device daemon (MQTT in, cooperative inference, MQTT out)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..cpu_latency import cpu_latency_hold
from ..errors import EdgeError

if TYPE_CHECKING:
    from ..daemon import ResolvedProfile

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the device daemon: sensor messages from MQTT in, inference results out",
        description="Subscribe to the profile's sensor topics, run each message through the model (head here, "
        "tail on an edge server, all here when no server answers) and publish one result per message. A message "
        "is acknowledged to the broker only once its result is confirmed, and the MQTT session is persistent, so "
        "a crash or a restart loses nothing. SIGTERM drains the queue and exits 0.",
    )
    p.add_argument(
        "--config",
        required=True,
        metavar="PROFILE",
        help="a profile file, or the name of one in /etc/edge/ or the repository's firmware_config/ "
        "(such as generic-x86)",
    )
    p.add_argument("--broker", metavar="HOST:PORT", help="use this MQTT broker instead of the profile's")
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="use this edge server instead of the profile's; repeat for several, tried in order",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the profile against its model, print it resolved, and exit",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from .. import daemon
        from ..daemon.mqtt import build_client
    except ImportError as err:
        raise EdgeError(
            f"edge run needs paho-mqtt and pillow: pip install 'edge-coop[daemon]' ({err})"
        ) from err
    path = daemon.find(args.config)
    profile = daemon.load(path)
    if args.broker or args.server:
        profile = daemon.apply_overrides(profile, broker=args.broker, servers=args.server, source=str(path))
    resolved = daemon.resolve(profile, path)
    # What start checks, --check checks too: the backend, and every file the profile names.
    daemon.preflight(resolved)
    client = build_client(profile, source=str(path))
    if args.check:
        print(json.dumps(_describe(resolved), indent=2))
        return 0
    with cpu_latency_hold(profile.runtime.cpu_latency_us):
        device = daemon.open_device(resolved)
        service = daemon.Daemon(resolved, device, client, cascade=daemon.open_cascade(resolved, device))

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("received %s; draining", signal.Signals(signum).name)
            service.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        return service.run()


def _describe(resolved: ResolvedProfile) -> dict[str, Any]:
    profile = resolved.profile
    graph = resolved.graph
    return {
        "profile": str(resolved.source),
        "config": profile.model_dump(mode="json"),
        "resolved": {
            "model_path": str(resolved.model_path),
            "model_name": resolved.model_name,
            "model_sha256": graph.sha256,
            "operators": graph.num_operators,
            "inputs": [t.describe() for t in graph.inputs],
            "outputs": [t.describe() for t in graph.outputs],
            "cut": resolved.cut if resolved.cut is not None else "auto",
            "cascade": None
            if resolved.cascade is None
            else {
                "small_model_sha256": resolved.cascade.small.sha256 if resolved.cascade.small else None,
                "exit": resolved.cascade.exit_output,
                "rule": resolved.cascade.rule,
                "threshold": resolved.cascade.threshold,
            },
            "client_id": profile.client_id,
            "broker": profile.mqtt.address,
            "edge_servers": [s.address for s in profile.edge.servers],
            "subscriptions": [s.topic for s in profile.sensors],
            "topics": {k: profile.topic(k) for k in ("results", "errors", "availability", "stats")},
        },
    }
