"""Our own per-request work on both sides of a tail request, without the network, hot and cold.

"Cold" sleeps before each measurement, as each side does while the other computes; an idle CPU
(on a VM especially) comes back with cold caches, and that is how requests really run. The
server's share excludes the tail's own compute (its ``compute_us``).

    python3 tools/cold_path.py [--model mobilenetv2_035] [--split-at 32] [-n 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from edge import models
from edge.graph import ModelGraph
from edge.preprocess import random_tensors
from edge.protocol import converters, pb
from edge.wire import InferRequest, decode, encode
from server.dataplane import DataPlane
from server.repository import ModelRepository


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_035")
    p.add_argument("--split-at", type=int, default=32)
    p.add_argument("-n", type=int, default=1000, help="samples per part and mode (default: %(default)s)")
    p.add_argument("--sleep-us", type=int, default=1200, help="idle time before each cold sample")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    path = models.model_path(args.model)
    graph = ModelGraph.from_file(path)
    cut = random_tensors(graph.cut(args.split_at).tensors, seed=1)
    params = {"model_sha256": graph.sha256, "split_point": args.split_at}
    repository = ModelRepository.from_files([path])
    dataplane = DataPlane(repository)

    def device_before() -> bytes:
        tensors = tuple(encode(name, array) for name, array in cut.items())
        request = InferRequest(model_name=path.stem, inputs=tensors, parameters=params)
        return converters.infer_request_to_pb(request).SerializeToString()

    request_wire = device_before()

    def server_outside_compute() -> int:
        """Returns the nanoseconds of compute to take off."""
        message = pb.ModelInferRequest.FromString(request_wire)
        request = converters.infer_request_from_pb(message)
        response = dataplane.execute(dataplane.prepare(request))
        converters.infer_response_to_pb(response).SerializeToString()
        return int(response.parameters["compute_us"]) * 1000

    response = dataplane.execute(
        dataplane.prepare(converters.infer_request_from_pb(pb.ModelInferRequest.FromString(request_wire)))
    )
    response_wire = converters.infer_response_to_pb(response).SerializeToString()

    def device_after() -> None:
        message = pb.ModelInferResponse.FromString(response_wire)
        {t.name: decode(t) for t in converters.infer_response_from_pb(message).outputs}

    parts: dict[str, Callable[[], object]] = {
        "device: encode the cut, build and serialize the request": device_before,
        "server: parse, validate, decode; encode and serialize the answer": server_outside_compute,
        "device: parse the answer, decode the outputs": device_after,
    }
    report: dict[str, dict[str, float]] = {name: {} for name in parts}
    for mode, pause in (("hot_us", 0.0), ("cold_us", args.sleep_us / 1e6)):
        samples: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(args.n):
            for name, part in parts.items():  # interleaved, so drift hits every part alike
                if pause:
                    time.sleep(pause)
                started = time.perf_counter_ns()
                result = part()
                took = time.perf_counter_ns() - started
                if isinstance(result, int):
                    took -= result
                samples[name].append(took / 1000)
        for name, values in samples.items():
            report[name][mode] = round(statistics.median(values), 1)
    repository.close()
    if args.json:
        print(
            json.dumps(
                {"model": args.model, "split_point": args.split_at, "n": args.n, "parts": report}, indent=2
            )
        )
        return 0
    print(f"{args.model} cut {args.split_at}, median of {args.n}; cold = after {args.sleep_us} us idle")
    for name, values in report.items():
        print(f"  {name:66s} hot {values['hot_us']:6.1f} us   cold {values['cold_us']:6.1f} us")
    total = sum(v["cold_us"] for v in report.values())
    print(f"  {'total, cold':66s} {total:6.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
