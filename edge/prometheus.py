"""prometheus-client, imported when metrics are asked for, and one way to serve a registry over HTTP.

Shared by ``edge-server`` and ``edge run``; neither imports prometheus-client otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import ConfigError

__all__ = ["load", "serve"]

logger = logging.getLogger(__name__)


def load(wanted_by: str, extra: str) -> Any:
    """The prometheus_client module; a ConfigError naming ``wanted_by`` and the extra when it is missing."""
    try:
        import prometheus_client
    except ImportError as err:
        raise ConfigError(f"{wanted_by} needs prometheus-client: pip install 'edge-coop[{extra}]'") from err
    return prometheus_client


def serve(registry: Any, host: str, port: int) -> Any:
    """Serve ``registry`` at ``http://host:port/metrics`` on a thread; returns the HTTP server
    (its ``server_port`` is the port bound, ``shutdown()`` stops it). A registry exists, so
    prometheus-client was loaded already."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from err
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
