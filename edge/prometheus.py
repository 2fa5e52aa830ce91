"""prometheus-client, imported when metrics are asked for, and one way to serve a registry over HTTP.

Shared by ``edge-server`` and ``edge run``; neither imports prometheus-client otherwise.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import HTTPServer
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


WORKERS = 4
"""Threads answering scrapes: a scrape takes milliseconds, and Prometheus sends one at a time."""
MAX_PENDING = 32
"""Connections held at once, answered or waiting; one past it is closed as it is accepted."""
TIMEOUT_S = 5.0
"""How long a connection may take to send its request: a half-open one frees its thread then."""


class _BoundedHTTPServer(HTTPServer):
    """An HTTP server with a fixed pool of threads and a bound on connections held, where
    prometheus-client's own spends a thread per connection, with no timeout (300 half-open
    connections made 312 threads, and the inference server then could not start one)."""

    request_queue_size = (
        128  # the listen backlog (5 by default): a burst of connects waits there, not in SYN retries
    )

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="edge-metrics")
        self._held = threading.BoundedSemaphore(MAX_PENDING)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._held.acquire(blocking=False):
            self.shutdown_request(request)
            return
        request.settimeout(TIMEOUT_S)
        self._pool.submit(self._answer, request, client_address)

    def _answer(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            logger.debug("a metrics scrape from %s failed", client_address, exc_info=True)
        finally:
            self.shutdown_request(request)
            self._held.release()

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Served:
    """The running metrics endpoint: ``server_port``, and ``shutdown()`` to stop it."""

    def __init__(self, server: _BoundedHTTPServer) -> None:
        self._server = server
        self.server_port = server.server_port
        self._thread = threading.Thread(target=server.serve_forever, name="edge-metrics-accept", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(registry: Any, host: str, port: int) -> _Served:
    """Serve ``registry`` at ``http://host:port/metrics`` on a bounded server of its own threads;
    returns it (its ``server_port`` is the port bound, ``shutdown()`` stops it). A registry exists,
    so prometheus-client was loaded already."""
    from prometheus_client.exposition import MetricsHandler

    handler = MetricsHandler.factory(registry)
    handler.log_message = lambda self, *args: None  # type: ignore[method-assign,attr-defined]  # no line per scrape
    try:
        server = _BoundedHTTPServer((host, port), handler)
    except OSError as err:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}") from err
    served = _Served(server)
    logger.info("metrics on http://%s:%d/metrics", host, served.server_port)
    return served
