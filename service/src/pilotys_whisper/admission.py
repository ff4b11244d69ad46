"""Admission control: a bounded number of transcriptions run at once, a bounded queue waits, the rest get 429.

Memory use grows with concurrent transcriptions, not with waiting requests, so this is what keeps a
small host from running out of memory under a burst.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ApiError


class Admission:
    def __init__(self, concurrency: int, queue_size: int, *, initial_estimate_s: float = 10.0):
        self.concurrency = concurrency
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._running = 0
        self._waiting = 0
        self._avg_s = initial_estimate_s  # moving average of a transcription's duration

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, divided among the running slots."""
        ahead = self._waiting + self._running
        return max(1, math.ceil(self._avg_s * ahead / self.concurrency))

    def refuse_if_full(self) -> None:
        """slot()'s 429, before the request's form is parsed and its audio probed: refusing then costs next to
        nothing, so a saturated service keeps its HTTP threads for /health and what it accepted (bench/load.py).
        slot() checks again: a place taken meanwhile is still refused."""
        with self._cond:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        if self._running >= self.concurrency and self._waiting >= self.queue_size:
            seconds = self.retry_after()
            raise ApiError(429, "server_busy",
                           f"all {self.concurrency} transcription slot(s) and the {self.queue_size} queue place(s) "
                           f"are taken; retry in about {seconds} s",
                           headers={"Retry-After": str(seconds)})

    @contextmanager
    def slot(self, *, bounded_queue: bool = True) -> Iterator[None]:
        """Run inside a slot. A request that finds every slot and the queue taken gets 429 at once.

        `bounded_queue=False` is for background jobs, whose queue is on disk: they wait for a slot
        without taking one of the synchronous callers' queue places.
        """
        with self._cond:
            if bounded_queue:
                self._refuse_if_full()
            self._waiting += bounded_queue
            try:
                while self._running >= self.concurrency:
                    self._cond.wait()
            finally:
                self._waiting -= bounded_queue
            self._running += 1
        started = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            with self._cond:
                self._running -= 1
                self._avg_s = 0.8 * self._avg_s + 0.2 * elapsed
                self._cond.notify()
