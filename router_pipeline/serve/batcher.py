"""Dynamic batching: concurrent requests share one router forward pass.

A request's query waits at most ``window_ms`` for others (or until ``max_batch``
are waiting), then one worker thread routes the batch. The router's model is used by
that one thread only, so the event loop never blocks on it and two passes never
run at once. ``max_batch=1`` turns batching off (one pass per request).

``idle`` is clear while a pass runs: a local model answering on the same CPU cores
waits on it before each forward pass (serve/backends.py), so routing, which every
request waits for, comes first: without it, one client whose queries went to the
local model doubled everyone else's routing time (benchmarks/serving_load.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass


@dataclass
class _Pending:
    query: str
    future: asyncio.Future
    queued_at: float


class RouteBatcher:
    def __init__(self, router, *, window_ms: float, max_batch: int):
        self.router, self.window_s, self.max_batch = router, window_ms / 1000, max(1, max_batch)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.routed = 0
        self.idle = threading.Event()
        self.idle.set()
        self._pass_started: float | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def route(self, query: str):
        """The RouteDecision for one query (its ``latency_ms`` is the batch's share)."""
        if self._queue is None:
            raise RuntimeError("RouteBatcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(query, future, time.perf_counter()))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            batch = [p for p in batch if not p.future.done()]  # a caller that stopped waiting costs no pass
            if not batch:
                continue
            try:
                decisions = await asyncio.to_thread(self._pass, [p.query for p in batch])
            except Exception as exc:  # one bad batch fails its requests, never the worker
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches += 1
            self.routed += len(batch)
            for p, d in zip(batch, decisions):
                if not p.future.done():
                    p.future.set_result(d)

    def stalled(self, limit_s: float) -> bool:
        """Whether the pass running now has run for more than ``limit_s``: a router that
        hangs, as against a queue that is long but moving."""
        started = self._pass_started
        return started is not None and time.perf_counter() - started > limit_s

    def _pass(self, queries: list[str]):
        self.idle.clear()
        self._pass_started = time.perf_counter()
        try:
            return self.router.route_batch(queries)
        finally:
            self._pass_started = None
            self.idle.set()
