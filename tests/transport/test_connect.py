"""A server that comes up where a connection was just refused is used at once.

gRPC holds a channel whose connection failed in TRANSIENT_FAILURE until its backoff lets it try
again, and by default shares that failed connection with every new channel to the same address.
Covered, each right after a refused attempt and a server starting on that address: the same
client's unary call, its streamed request (one at a time) and its pipelined one (submit), and a
new client's first call. Each must reach the server, not fail at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from edge import models
from edge.errors import RemoteError
from edge.graph import ModelGraph
from edge.transport import TailClient
from helpers import RefusedAddress, digit_inputs
from server.embedded import BackgroundServer

MODEL = "digits_tiny"


def _whole_model(client: TailClient) -> np.ndarray:
    graph = ModelGraph.from_file(models.model_path(MODEL))
    outputs = client.infer(MODEL, digit_inputs(graph, 1)[0]).outputs
    return outputs[graph.outputs[0].name]


def _submitted(client: TailClient) -> np.ndarray:
    graph = ModelGraph.from_file(models.model_path(MODEL))
    outputs = client.submit(MODEL, digit_inputs(graph, 1)[0]).result(10).outputs
    return outputs[graph.outputs[0].name]


CALLS: dict[str, Callable[[TailClient], object]] = {
    "unary": lambda client: client.server_metadata(2.0),
    "stream": _whole_model,
    "submit": _submitted,
}


@pytest.fixture()
def refused_then_served() -> Iterator[tuple[TailClient, BackgroundServer]]:
    """A client whose connection was refused, and a server started where it looked, after that."""
    with RefusedAddress() as held:
        client = TailClient(held.address, timeout_s=2.0)
        with pytest.raises(RemoteError) as err:
            client.server_metadata(1.0)
        assert err.value.status == "UNAVAILABLE"
        client.submit(MODEL, {}).exception(10)  # the pipe's channel has failed too
        port = held.release()
        with BackgroundServer.from_files([models.model_path(MODEL)], port=port) as server:
            try:
                yield client, server
            finally:
                client.close()


@pytest.mark.parametrize("call", sorted(CALLS))
def test_the_same_client_reaches_a_server_that_came_up(
    refused_then_served: tuple[TailClient, BackgroundServer], call: str
) -> None:
    client, _ = refused_then_served
    CALLS[call](client)  # raises RemoteError("UNAVAILABLE: cannot connect ...") without the fix


def test_a_new_client_reaches_a_server_that_came_up_while_an_old_one_still_fails(
    refused_then_served: tuple[TailClient, BackgroundServer],
) -> None:
    _, server = refused_then_served
    with TailClient(server.address, timeout_s=2.0) as fresh:
        name, _, _ = fresh.server_metadata(2.0)
    assert name == "edge-server"
