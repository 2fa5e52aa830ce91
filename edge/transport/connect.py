"""Connection set-up, kept apart from a request's deadline.

A slow link (Wi-Fi, a cellular modem, TLS at 200 ms RTT) takes several round trips to connect:
TCP, the TLS handshake, HTTP/2 settings. That is the connection's cost, not a request's: a
request's deadline starts once the channel is ready, and the connection has a deadline of its
own, ``connect_timeout_s``.

gRPC bounds each connection attempt by ``grpc.min_reconnect_backoff_ms`` as well (its minimum
connect timeout), so the channel options carry the same figure; retries between attempts still
start at 100 ms.
"""

from __future__ import annotations

import asyncio

import grpc

from ..errors import RemoteError

__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "channel_options", "until_connected"]

DEFAULT_CONNECT_TIMEOUT_S = 5.0
"""Time for TCP, TLS and HTTP/2 set-up: about 8 round trips at 200 ms, with room for a loaded CPU."""


def channel_options(connect_timeout_s: float) -> list[tuple[str, int]]:
    """gRPC channel options: quick reconnects after a server restarts (its default backoff grows to two
    minutes), each attempt allowed ``connect_timeout_s``."""
    return [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", max(100, int(connect_timeout_s * 1000))),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),
        # A channel of its own connection: a new one is a new attempt, not the failed one of another
        # channel to the same address (gRPC shares connections between channels by default).
        ("grpc.use_local_subchannel_pool", 1),
    ]


async def until_connected(channel: grpc.aio.Channel, timeout_s: float, address: str) -> None:
    """Return once ``channel`` is ready; RemoteError (UNAVAILABLE) when the attempt fails (a refused
    connection fails at once) or does not finish within ``timeout_s``."""
    state = channel.get_state(try_to_connect=True)
    if state is grpc.ChannelConnectivity.READY:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while state is not grpc.ChannelConnectivity.READY:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            raise RemoteError(f"UNAVAILABLE: cannot connect to edge server {address}", status="UNAVAILABLE")
        if state is grpc.ChannelConnectivity.SHUTDOWN:
            raise RemoteError(f"CANCELLED: the channel to {address} is closed", status="CANCELLED")
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise RemoteError(
                f"UNAVAILABLE: edge server {address} did not finish connecting within {timeout_s:g} s "
                "(--connect-timeout)",
                status="UNAVAILABLE",
            )
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except asyncio.TimeoutError:
            pass
        state = channel.get_state(try_to_connect=True)
