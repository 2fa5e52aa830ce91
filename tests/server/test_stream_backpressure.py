"""A client that writes on ModelStreamInfer and never reads its answers cannot make the server hold
more than the stream's window: the server stops reading it, and HTTP/2 flow control stops the
writer. (The slot was freed when an answer was computed, not sent, and the answer queue had no
bound: 296 k requests cost 422 MiB, never released.) Counted on a real server process: the
requests it computed, from its metrics, while the writer tries to send 20,000."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
from server_metrics import scrape, serve_with_metrics

from edge import models
from edge.graph import ModelGraph
from edge.protocol import pb, pb_grpc

MODEL = "digits_tiny"


def test_a_stream_that_is_not_read_is_not_read_either(tmp_path: Path) -> None:
    graph = ModelGraph.from_file(models.model_path(MODEL))
    tensor = graph.inputs[0]
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=tensor.name, datatype="INT8", shape=list(tensor.shape))
    request.raw_input_contents.append(np.zeros(tensor.shape, np.int8).tobytes())
    proc, url, port, _ = serve_with_metrics(tmp_path, model=MODEL)
    written = 0
    try:
        # No BDP probing: the client's receive window stays at its first 64 KiB, as a device that does not
        # read keeps it (probing grows it to megabytes while answers flow).
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0)])
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stop = threading.Event()

        def requests():  # type: ignore[no-untyped-def]
            nonlocal written
            for i in range(20_000):
                if stop.is_set():
                    return
                request.id = str(i)
                written += 1
                yield request

        call = stub.ModelStreamInfer(requests(), timeout=30)  # its answers are never read
        time.sleep(4.0)
        samples = scrape(url)
        computed = sum(v for (name, _), v in samples.items() if name == "edge_requests_total")
        stop.set()
        call.cancel()
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # The window (16) plus the answers that fit in the HTTP/2 windows between the two: far from all.
    assert computed < 2_000, f"the server computed {computed:.0f} answers nobody read ({written} written)"
    assert written < 20_000, "the writer was never held back"
