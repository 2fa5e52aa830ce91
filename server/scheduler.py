"""When and where a prepared request computes: admission, fair turns, batching, the inline budget.

The servicer converts messages; the :class:`Scheduler` decides. A request first takes its places
(one of its device's ``max_inflight_per_device``, then one of the data plane's in-flight places and
its bytes), then yields once, so every request that has arrived holds a place before the first of
them computes: the limits count the requests waiting, and refuse past them. Then:

- with ``max_batch`` > 1, it joins the batch gathering for its route (model x cut), which runs
  as one interpreter call when full or after the batch delay, bit-exact per member;
- else, when its route last computed in so little that the requests in flight, each taking as
  long, fit in :data:`INLINE_BUDGET_US`, it computes on the event loop: a thread hand-off costs
  about 0.45 ms of latency on this kind of machine, and more CPU than a short tail itself, and a
  health check waits behind at most that budget;
- otherwise (and the first time on a route) it computes on one of ``workers`` threads (LiteRT
  releases the GIL while it computes), so the loop keeps answering health checks and metadata
  while every core computes. Compute turns go to devices in round robin (:class:`FairTurns`).

``workers`` 0 computes everything on the event loop, one request at a time. So does a request that
finds the server idle (nothing else in flight) on a route that last computed within the budget: no
other request can be waiting for a place or a turn, so it computes where it was read, without the
yield, the turn or a task. A request whose caller's deadline passed while it waited is not computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edge.runner import Tensors
from edge.wire import COMPUTE_US, InferResponse

from .dataplane import DataPlane, PreparedRequest
from .errors import DeadlineExpiredError
from .fairness import DeviceLimit, FairTurns
from .settings import DEFAULT_MAX_BATCH_DELAY_US, DEFAULT_MAX_INFLIGHT_PER_DEVICE

__all__ = ["INLINE_BUDGET_US", "ROUTE_TIMES", "Scheduler"]

T = TypeVar("T")

INLINE_BUDGET_US = 2000
"""A request computes on the event loop when its route's last compute time per sample, times its
samples and the requests in flight, is at most this: what a health check may wait behind."""

STACK_PART_US = 1000
"""A stacked request computes a part at a time, each part a compute turn of its own of about this
much (at least one sample): a request of another device then waits behind one part, not the whole
stack, and the loop reads what arrived between parts."""

ROUTE_TIMES = 4096
"""Routes whose last compute time is remembered (model sha256 x cut); the table is cleared past it."""

Route = tuple[str, int | None]


@dataclass(slots=True)
class _Batch:
    """Requests for one route, gathered to run together."""

    items: list[tuple[PreparedRequest, float | None, asyncio.Future[InferResponse]]] = field(
        default_factory=list
    )
    full: asyncio.Event = field(default_factory=asyncio.Event)


class Scheduler:
    """Runs prepared requests of a :class:`DataPlane` on the event loop or its compute threads."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        workers: int = 0,
        max_inflight_per_device: int = DEFAULT_MAX_INFLIGHT_PER_DEVICE,
        max_batch: int = 1,
        max_batch_delay_us: int = DEFAULT_MAX_BATCH_DELAY_US,
        stack_part_us: int = STACK_PART_US,
    ) -> None:
        self.dataplane = dataplane
        self.stack_part_us = stack_part_us
        """A stacked request's compute per turn (:data:`STACK_PART_US`)."""
        self.max_batch = max_batch
        self.batch_delay_s = max_batch_delay_us / 1e6
        self.executor = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge-infer") if workers > 0 else None
        )
        self.turns = FairTurns(max(1, workers))
        """Compute turns, as many at once as there are compute threads, to devices in round robin."""
        self.per_device = DeviceLimit(max_inflight_per_device)
        self.serial = self.executor is None and max_batch == 1
        """Every request computes on the event loop, one after another: a stream's requests may be
        answered in the order they came, without a task each."""
        self._compute_us: dict[Route, int] = {}
        self._batches: dict[Route, _Batch] = {}
        self._batch_tasks: set[asyncio.Task[None]] = set()

    async def run(
        self, prepared: PreparedRequest, device: str, nbytes: int, deadline: float | None
    ) -> InferResponse:
        """``prepared``'s response, once it took its places and its turn; ServerOverloadedError when
        its device or the server holds too many, DeadlineExpiredError when ``deadline`` (on the
        ``time.monotonic()`` clock) passed before it could compute."""
        if self.computes_now(prepared):
            return self.run_serial(prepared, nbytes, deadline)
        self.per_device.acquire(device)
        try:
            self.dataplane.admit(nbytes)
            try:
                if prepared.profile:
                    # Profiling takes seconds: on a thread of its own, so neither the event loop nor
                    # the compute threads wait for it.
                    return await asyncio.to_thread(self.dataplane.execute, prepared)
                if prepared.ping:
                    return self.dataplane.execute(prepared)
                await asyncio.sleep(0)  # the other arrived requests take their places before this computes
                route = (prepared.model.graph.sha256, prepared.split_point)
                if prepared.stack > 1:
                    return await self._stack_in_parts(route, prepared, device, deadline)
                if self.max_batch > 1:
                    return await self._batched(route, prepared, device, deadline)
                return await self._single(route, prepared, device, deadline)
            finally:
                self.dataplane.release(nbytes)
        finally:
            self.per_device.release(device)

    def computes_now(self, prepared: PreparedRequest) -> bool:
        """Whether :meth:`run_serial` answers ``prepared``: it is not a profile (which takes a thread
        of its own), and either everything computes on the loop (:attr:`serial`; a stack computes at
        once there too: its device's stream is answered in order, and the others wait for it as they
        would for its samples sent one by one), or nothing is in flight on the server and its route is short."""
        if prepared.profile:
            return False
        if self.serial:
            return True
        if prepared.stack > 1 or self.max_batch > 1 or self.dataplane.inflight:
            return False
        return self._short((prepared.model.graph.sha256, prepared.split_point))

    def predicts_now(self, model_name: str, split_point: int | None) -> bool:
        """Whether a request for this route, read now, would likely :meth:`computes_now` (by the
        route's last compute, before the message is read): its stream may then answer it in place."""
        if self.serial:
            return True
        if self.max_batch > 1 or self.dataplane.inflight:
            return False
        model = self.dataplane.repository.find(model_name)
        return model is not None and self._short((model.graph.sha256, split_point))

    def _short(self, route: Route) -> bool:
        """The route last computed within :data:`INLINE_BUDGET_US` a sample."""
        last_us = self._compute_us.get(route)
        return last_us is not None and last_us <= INLINE_BUDGET_US

    def run_serial(self, prepared: PreparedRequest, nbytes: int, deadline: float | None) -> InferResponse:
        """:meth:`run` for a request that :meth:`computes_now`, with no await: it computes on the loop
        where it was read. Nothing waits, so no device holds more than one and no turn is taken;
        admission still refuses while the server drains. A caller on the hot path calls it directly,
        saving the coroutine :meth:`run` is."""
        self.dataplane.admit(nbytes)
        try:
            _check_deadline(deadline)
            response = self.dataplane.execute(prepared)
        finally:
            self.dataplane.release(nbytes)
        if not self.serial:
            route = (prepared.model.graph.sha256, prepared.split_point)
            self._remember(route, int(response.parameters[COMPUTE_US]))
        return response

    def shutdown(self) -> None:
        """Let the compute threads finish what they hold, then stop them."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    async def _single(
        self, route: Route, prepared: PreparedRequest, device: str, deadline: float | None
    ) -> InferResponse:
        if not self.turns.try_acquire():
            await self.turns.acquire(device)
        try:
            last_us = self._compute_us.get(route)
            inline = last_us is not None and last_us * self.dataplane.inflight <= INLINE_BUDGET_US
            response = await self._compute(inline, _execute_before, self.dataplane, prepared, deadline)
        finally:
            self.turns.release()
        self._remember(route, int(response.parameters[COMPUTE_US]))
        return response

    async def _stack_in_parts(
        self, route: Route, prepared: PreparedRequest, device: str, deadline: float | None
    ) -> InferResponse:
        """A stacked request, computed in parts of about :attr:`stack_part_us` (a power of two samples,
        at least one). Its turn ends after the part during which another device came to wait for one:
        that device goes next, and the stack's next part goes before its own device's later requests.
        The samples computed in a turn are charged as that many turns (:meth:`FairTurns.charge`). A
        stack small enough to compute on the loop (:data:`INLINE_BUDGET_US`) computes in one part."""
        samples, done, compute_ns = prepared.stack, 0, 0
        parts: list[Tensors] = []
        while done < samples:
            if not self.turns.try_acquire():
                await self.turns.acquire(device, first=done > 0)  # its next part, before its later requests
            try:
                per_sample = self._compute_us.get(route)  # read with the turn: what ran before it counts
                left = samples - done
                if per_sample is not None and per_sample * left * self.dataplane.inflight <= INLINE_BUDGET_US:
                    computed = [(*_part_before(self.dataplane, prepared, done, left, deadline), left)]
                else:
                    fits = max(1, self.stack_part_us // max(per_sample, 1)) if per_sample else 1
                    computed = await self._compute(
                        False, _parts_until, self.dataplane, prepared, done, 1 << (fits.bit_length() - 1),
                        deadline, lambda: self.turns.others_wait(device),
                    )  # fmt: skip
                count = 0
                for part, took_ns, samples_in_part in computed:
                    parts.append(part)
                    compute_ns += took_ns
                    count += samples_in_part
                self.turns.charge(device, count - 1)
            finally:
                self.turns.release()
            self._remember(route, compute_ns // 1000 // (done + count))
            done += count
        return self.dataplane.join_parts(prepared, parts, compute_ns)

    def _remember(self, route: Route, sample_us: int) -> None:
        """Keep ``route``'s last compute time per sample (bounded: the table is cleared when full)."""
        if len(self._compute_us) >= ROUTE_TIMES and route not in self._compute_us:
            self._compute_us.clear()
        self._compute_us[route] = sample_us

    async def _compute(self, inline: bool, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on the event loop when ``inline`` or there are no compute threads, else on one."""
        if inline or self.executor is None:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)

    async def _batched(
        self, route: Route, prepared: PreparedRequest, device: str, deadline: float | None
    ) -> InferResponse:
        """Join the batch gathering for ``route`` (or start one), and wait for this request's answer."""
        batch = self._batches.get(route)
        if batch is None or len(batch.items) >= self.max_batch:
            batch = self._batches[route] = _Batch()
            task = asyncio.create_task(self._run_batch(route, batch, device))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
        answer: asyncio.Future[InferResponse] = asyncio.get_running_loop().create_future()
        batch.items.append((prepared, deadline, answer))
        if len(batch.items) >= self.max_batch:
            batch.full.set()
        return await answer

    async def _run_batch(self, route: Route, batch: _Batch, device: str) -> None:
        """Gather for up to the batch delay (or until full), then run what is still wanted as one batch."""
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(batch.full.wait(), self.batch_delay_s)
        finally:
            if self._batches.get(route) is batch:
                del self._batches[route]
        live: list[tuple[PreparedRequest, asyncio.Future[InferResponse]]] = []
        for prepared, deadline, answer in batch.items:
            if answer.done():  # its caller went away
                continue
            try:
                _check_deadline(deadline)
            except DeadlineExpiredError as err:
                answer.set_exception(err)
            else:
                live.append((prepared, answer))
        if not live:
            return
        requests = [prepared for prepared, _ in live]
        try:
            async with self.turns.turn(device):
                responses = await self._compute(False, self.dataplane.execute_batch, requests)
        except Exception as err:
            for _, answer in live:
                if not answer.done():
                    answer.set_exception(err)
            return
        for (_, answer), response in zip(live, responses, strict=True):
            if answer.done():
                continue
            if isinstance(response, BaseException):
                answer.set_exception(response)  # this member alone was refused
            else:
                answer.set_result(response)


def _check_deadline(deadline: float | None) -> None:
    """A request whose caller's deadline has passed is not computed: its answer would go nowhere."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExpiredError("the request's deadline passed before it could be computed")


def _parts_until(
    dataplane: DataPlane,
    prepared: PreparedRequest,
    start: int,
    size: int,
    deadline: float | None,
    others_wait: Callable[[], bool],
) -> list[tuple[Tensors, int, int]]:
    """A stack's samples from ``start`` on, computed ``size`` at a time until they are done or, after a
    part, ``others_wait()``: each part's outputs, nanoseconds and samples."""
    computed = []
    while start < prepared.stack:
        count = min(size, prepared.stack - start)
        computed.append((*_part_before(dataplane, prepared, start, count, deadline), count))
        start += count
        if others_wait():
            break
    return computed


def _part_before(
    dataplane: DataPlane, prepared: PreparedRequest, start: int, count: int, deadline: float | None
) -> tuple[Tensors, int]:
    """:meth:`DataPlane.execute_part`, unless the deadline passed while the part waited its turn."""
    _check_deadline(deadline)
    return dataplane.execute_part(prepared, start, count)


def _execute_before(dataplane: DataPlane, prepared: PreparedRequest, deadline: float | None) -> InferResponse:
    """Compute ``prepared`` unless its deadline passed while it waited; checked where it starts
    computing, on the loop or on a compute thread."""
    _check_deadline(deadline)
    return dataplane.execute(prepared)
