#!/usr/bin/env python3
"""What a pool's policy costs a request: ``order()``, then the bookkeeping of one sent and answered.

Three clients that are never called (the policy's own work is measured, not a call), 100,000
requests a run, the best of 7 runs; prints µs a request as the last line, for ``../shared/ab.sh``:

    taskset -c 1 python bench/pool_policy.py --policy least-loaded
"""

from __future__ import annotations

import argparse
import time
import types

from edge.transport import FailoverClient
from edge.transport.failover import POLICIES


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", choices=POLICIES, default="least-loaded")
    p.add_argument("-n", type=int, default=100_000)
    args = p.parse_args()
    clients = [types.SimpleNamespace(timeout_s=1.0, close=lambda: None) for _ in range(3)]
    pool = FailoverClient(clients, policy=args.policy)  # type: ignore[arg-type]
    answer = types.SimpleNamespace(call_ms=1.0, queue_ms=0.1)
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(args.n):
            index = pool.order()[0]
            pool._started(index)
            pool._answered(index, answer)  # type: ignore[arg-type]
        best = min(best, (time.perf_counter() - started) / args.n * 1e6)
    pool.close()
    print(f"{best:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
