"""The scoring engine: one inference thread owns the model; the event loop never runs torch.

A request first takes a place in the bounded queue (:meth:`ScoringEngine.admit`): when
``max_queue`` requests are already waiting — queued or still being tokenized — it is refused
at once (429), before it costs any work. Admitted requests are tokenized in the thread pool and
queued. The
inference thread drains the queue, sorts the waiting items by length so that little is
padded, cuts them into batches by a padded-token budget and an item cap, and completes
each request as soon as its last item is scored. A full queue refuses at once (429) rather
than letting a client time out. Each request carries the model it was admitted with, so a
model swap never changes the model under a request in flight.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from service.errors import Overloaded
from service.metrics import Metrics
from training.registry import ResolvedModel
from training.reward_model import Encoded, RewardModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """A loaded reward model and the resolved reference it answers to."""

    rm: RewardModel
    model: ResolvedModel

    @property
    def label(self) -> str:
        return self.model.label

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def metadata(self) -> dict[str, Any]:
        return self.model.metadata

    @property
    def reward_stats(self) -> dict[str, float] | None:
        return self.model.reward_stats


@dataclass
class _Request:
    model: ServedModel
    items: Sequence[Encoded]
    future: Future
    scores: list[float | None]
    remaining: int
    enqueued_at: float


class ScoringEngine:
    def __init__(
        self,
        *,
        max_batch_tokens: int,
        max_batch_size: int,
        max_queue: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._pending: deque[_Request] = deque()
        self._admitted = 0  # places taken by requests still being tokenized
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._recent_batch_seconds = 0.05  # for Retry-After; updated as batches run

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        # The inference thread and the event loop hand work to each other several times per
        # request; with the default 5 ms GIL switch interval each hand-off can stall that long.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="generalrm-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + self._admitted

    # ------------------------------------------------------------------ admission
    def _refuse_when_full(self) -> None:
        waiting = len(self._pending) + self._admitted
        if waiting >= self.max_queue:
            self.metrics.rejected.inc()
            raise Overloaded(
                f"{waiting} requests are already waiting (max_queue={self.max_queue}); retry "
                "after the Retry-After delay",
                retry_after=self._recent_batch_seconds * 2,
            )

    def admit(self) -> None:
        """Take a place in the queue before doing any work for a request; Overloaded at once
        when it is full. Each admit is followed by one ``submit(..., admitted=True)`` or one
        :meth:`release`."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("scoring engine is stopped")
            self._refuse_when_full()
            self._admitted += 1

    def release(self) -> None:
        """Give back an admitted place (the request failed before it was queued)."""
        with self._cond:
            self._admitted -= 1

    def submit(self, model: ServedModel, items: Sequence[Encoded], *,
               admitted: bool = False) -> Future:
        """Queue encoded items; the future resolves to their scores in order. ``admitted``:
        the request already holds a place (:meth:`admit`)."""
        future: Future = Future()
        with self._cond:
            if admitted:
                self._admitted -= 1
            if not items:
                future.set_result([])
                return future
            if self._stopping:
                raise RuntimeError("scoring engine is stopped")
            if not admitted:
                self._refuse_when_full()
            self._pending.append(
                _Request(model, items, future, [None] * len(items), len(items), time.monotonic())
            )
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return future

    def call(self, function: Callable[[], Any]) -> Future:
        """Run ``function`` on the inference thread (between batches).

        Warm-ups go through here: torch's OpenMP pool is per calling thread, and a second
        thread that has run a parallel region leaves more pool threads than cores, which
        makes OpenMP stop spinning and slows every small forward pass by ~50% on 2 cores.
        """
        future: Future = Future()
        if self._thread is None:  # not started (scripts, tests): the caller's thread will do
            try:
                future.set_result(function())
            except Exception as exc:
                future.set_exception(exc)
            return future
        with self._cond:
            self._calls.append((function, future))
            self._cond.notify()
        return future

    # ------------------------------------------------------------------ inference thread
    def _run_calls(self) -> None:
        while self._calls:
            function, future = self._calls.popleft()
            try:
                future.set_result(function())
            except Exception as exc:
                future.set_exception(exc)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._calls and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending:
                    return
                taken = list(self._pending)
                self._pending.clear()
                self.metrics.queue_depth.set(0)
            self._run_calls()
            by_model: dict[int, list[_Request]] = {}
            for request in taken:
                by_model.setdefault(id(request.model), []).append(request)
            for requests in by_model.values():
                self._score_requests(requests)

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of items grouped into batches: sorted by length, cut by budget and cap."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            width = lengths[index]  # ascending order: the newest item is the widest
            if current and (
                len(current) >= self.max_batch_size
                or (len(current) + 1) * width > self.max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        return batches

    def _score_requests(self, requests: list[_Request]) -> None:
        model = requests[0].model
        flat = [(r, j, ids) for r in requests for j, ids in enumerate(r.items)]
        for batch in self.plan_batches([len(ids) for _, _, ids in flat]):
            live = [flat[i] for i in batch if not flat[i][0].future.done()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                scores = model.rm.score_ids([ids for _, _, ids in live])
            except Exception as exc:  # a model failure fails its requests, not the thread
                log.exception("forward pass failed")
                for request, _, _ in live:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            elapsed = time.perf_counter() - started
            self._recent_batch_seconds = 0.8 * self._recent_batch_seconds + 0.2 * elapsed
            self.metrics.forward_seconds.observe(elapsed)
            self.metrics.batch_size.observe(len(live))
            self.metrics.batch_tokens.observe(len(live) * max(len(ids) for _, _, ids in live))
            self.metrics.items.inc(len(live))
            for (request, position, _), score in zip(live, scores, strict=True):
                request.scores[position] = score
                request.remaining -= 1
                if request.remaining == 0 and not request.future.done():
                    request.future.set_result(list(request.scores))
