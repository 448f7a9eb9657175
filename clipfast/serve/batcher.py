"""Dynamic batching: one asyncio batcher per tower merges the rows of concurrent requests into
tower calls of at most ``max_batch`` rows, waiting at most ``max_wait`` for more once a row is
queued, and runs each call in a worker thread (ONNX Runtime releases the GIL, so the event loop
keeps accepting requests meanwhile).

Admission is bounded: ``reserve(n)`` counts a request's rows from before its images are decoded
until its answer, and refuses (``Overloaded``, answered 503 with Retry-After) past
``max_queue`` rows, so the memory held by requests in the server is bounded whatever the load;
it also refuses a request that would, at the recent tower rate, wait past ``deadline_s`` (the
request timeout): under overload the excess gets 503s at once, not 504s after a long wait.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np


class Overloaded(Exception):
    """The tower's queue cannot take the request now; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class _Job:
    __slots__ = ("rows", "taken", "done", "out", "future", "cancelled", "enqueued")

    def __init__(self, rows: Sequence[Any], future: asyncio.Future):
        self.rows = rows
        self.taken = 0  # rows handed to a batch so far
        self.done = 0  # rows whose results are in
        self.out: np.ndarray | None = None
        self.future = future
        self.cancelled = False
        self.enqueued = time.monotonic()


class Reservation:
    """``n`` admitted rows of one request; released when the request is answered."""

    def __init__(self, batcher: TowerBatcher, n: int):
        self._batcher = batcher
        self.n = n

    def release(self) -> None:
        if self.n:
            self._batcher._admitted -= self.n
            self._batcher._gauge()
            self.n = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class TowerBatcher:
    """Merge rows from concurrent requests into tower calls.

    run: rows (a list of at most ``max_batch`` per-row inputs) -> float32 ``(len(rows), D)``;
        called in ``executor``.
    on_batch: called with each batch's size and duration in seconds (metrics).
    on_depth: called with (rows queued, rows admitted) whenever they change (metrics).
    """

    def __init__(self, name: str, run: Callable[[list[Any]], np.ndarray], *, max_batch: int,
                 max_wait_s: float, max_queue: int, executor: Executor,
                 deadline_s: float | None = None,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_depth: Callable[[int, int], None] | None = None):
        self.name = name
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.deadline_s = deadline_s
        self._executor = executor
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued = 0  # rows waiting for a batch
        self._admitted = 0  # rows reserved: decoding, queued or running
        self._wake = asyncio.Event()
        self._rate = 0.0  # rows per second of recent batches (an average for Retry-After)
        self._task: asyncio.Task | None = None

    # -- admission ------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queued

    @property
    def admitted(self) -> int:
        return self._admitted

    def retry_after(self) -> int:
        """Seconds until the admitted rows are likely done (at least 1, at most 60)."""
        if self._rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self._admitted / self._rate))))

    def reserve(self, n: int) -> Reservation:
        if self._admitted + n > self.max_queue:
            raise Overloaded(
                f"the {self.name} queue is full ({self._admitted} of {self.max_queue} rows "
                f"admitted, --max-queue); retry later", self.retry_after())
        # A request that would wait past its deadline at the recent rate is refused now (503)
        # rather than timed out later (504) after taking its place in the queue.
        if self.deadline_s is not None and self._rate > 0 and self._admitted > 0:
            wait = (self._admitted + n) / self._rate
            if wait > self.deadline_s:
                raise Overloaded(
                    f"the {self.name} queue is full for now: {self._admitted} rows admitted "
                    f"would take about {wait:.1f} s at the recent {self._rate:.1f} rows/s, "
                    f"more than the {self.deadline_s:g} s a request may wait "
                    "(--request-timeout-s); retry later", self.retry_after())
        self._admitted += n
        self._gauge()
        return Reservation(self, n)

    def _gauge(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._queued, self._admitted)

    # -- submission -----------------------------------------------------------------------------
    async def submit(self, rows: Sequence[Any]) -> np.ndarray:
        """Rows (admitted with ``reserve``) -> float32 ``(len(rows), D)`` in order. Cancelling
        the caller (a timeout) drops its rows not yet handed to a batch."""
        if not rows:
            raise ValueError("submit: no rows")
        self._ensure_started()
        job = _Job(rows, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._queued += len(rows)
        self._gauge()
        self._wake.set()
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            if not job.future.done():
                job.cancelled = True
                self._queued -= len(rows) - job.taken
                job.taken = len(rows)
                self._gauge()
            raise

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"clipfast-batcher-{self.name}")

    async def close(self) -> None:
        """Stop the batching task; requests still queued get an error."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._jobs.clear()

    # -- the loop -------------------------------------------------------------------------------
    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to ``max_batch`` rows from the oldest jobs: ``(job, start, stop)`` slices."""
        parts, room = [], self.max_batch
        while self._jobs and room:
            job = self._jobs[0]
            if job.cancelled or job.taken >= len(job.rows):
                self._jobs.popleft()
                continue
            stop = min(len(job.rows), job.taken + room)
            parts.append((job, job.taken, stop))
            room -= stop - job.taken
            self._queued -= stop - job.taken
            job.taken = stop
            if job.taken >= len(job.rows):
                self._jobs.popleft()
        return parts

    def _oldest(self) -> float | None:
        for job in self._jobs:
            if not job.cancelled and job.taken < len(job.rows):
                return job.enqueued
        return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            oldest = self._oldest()
            if oldest is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Wait for a full batch, at most max_wait after the oldest queued row arrived
            # (rows that queued while the previous batch ran go at once).
            while self._queued < self.max_batch:
                left = oldest + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            parts = self._take()
            self._gauge()
            if not parts:
                continue
            rows = [r for job, a, b in parts for r in job.rows[a:b]]
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._executor, self._run, rows)
            except Exception as e:  # the tower failed: every request in the batch gets it
                for job, _, _ in parts:
                    if not job.cancelled and not job.future.done():
                        job.future.set_exception(e)
                continue
            took = time.perf_counter() - start
            if took > 0:
                rate = len(rows) / took
                self._rate = rate if self._rate <= 0 else 0.8 * self._rate + 0.2 * rate
            if self._on_batch is not None:
                self._on_batch(len(rows), took)
            pos = 0
            for job, a, b in parts:
                n = b - a
                if not job.cancelled and not job.future.done():
                    if job.out is None:
                        job.out = np.empty((len(job.rows), out.shape[1]), dtype=np.float32)
                    job.out[a:b] = out[pos:pos + n]
                    job.done += n
                    if job.done >= len(job.rows):
                        job.future.set_result(job.out)
                pos += n
