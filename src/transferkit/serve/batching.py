"""Dynamic batching: images from concurrent requests share one forward pass.

A forward pass over 16 images costs far less than 16 passes over one, so the server queues every image
it has decoded and runs them together: the first queued image opens a batch, which closes when
`max_batch` images are waiting or `max_wait_s` after it opened, whichever comes first (TorchServe's
batch size / max batch delay). `lanes` inference threads run batches side by side: on a CPU, two
single-threaded passes over small batches get more images through than one pass split over two threads,
which waits at every layer for its slower thread (benchmarks/serve.py measures both). The torch engine
keeps one lane, so its model is never called from two threads at once (it folds BatchNorm in place for
the call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from ..threads import named_pool

log = logging.getLogger(__name__)


class InferenceFailed(RuntimeError):
    """A batch's forward pass raised: logged once with its traceback here, then given to each request of the
    batch (chained to the error), whose answer is a 500 of one line (serve/app.py)."""


class DynamicBatcher:
    """`await submit(inputs)` -> their (n, C) probabilities, computed in batches shared with other callers.

    `infer(list of inputs)` returns (len, C) probabilities; it runs in one of the batcher's lane threads.
    """

    def __init__(self, infer: Callable[[list], np.ndarray], max_batch: int = 16, max_wait_s: float = 0.005,
                 lanes: int = 1):
        self.infer, self.max_batch, self.max_wait_s, self.lanes = infer, max_batch, max_wait_s, lanes
        # inference_s: lane-seconds spent in forward passes; over wall time × lanes, how busy the engine is.
        self.stats = {"batches": 0, "images": 0, "largest_batch": 0, "inference_s": 0.0, "lanes": lanes}
        self._pending: deque[tuple[object, asyncio.Future]] = deque()
        self._arrived = asyncio.Event()  # something is pending
        self._full = asyncio.Event()  # a whole batch is pending
        self._executor = named_pool(lanes, "transferkit-infer")
        self._stats_lock = threading.Lock()  # lanes finish in their own threads
        self._free_lanes: asyncio.Semaphore | None = None
        self._running: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._free_lanes = asyncio.Semaphore(self.lanes)
        self._task = self._loop.create_task(self._serve_batches())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, inputs: list) -> np.ndarray:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in inputs]
        self._pending.extend(zip(inputs, futures))
        self._update_events()
        return np.stack(await asyncio.gather(*futures))

    async def _serve_batches(self) -> None:
        while True:
            # A batch is formed only when a lane is free to run it: meanwhile images keep queueing, so
            # a busy server runs full batches.
            await self._free_lanes.acquire()
            batch = await self._next_batch()
            if not batch:
                self._free_lanes.release()
                continue
            task = self._loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list) -> None:
        try:
            probs = await self._loop.run_in_executor(self._executor, self._timed_infer, [x for x, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the callers get the error; the batcher keeps serving
            log.exception("inference failed on a batch of %d", len(batch))
            for _, future in batch:
                if not future.done():
                    failed = InferenceFailed(f"inference failed ({type(exc).__name__}: {exc})")
                    failed.__cause__ = exc
                    future.set_exception(failed)
            return
        finally:
            self._free_lanes.release()
        self._count(len(batch))
        for (_, future), p in zip(batch, probs):
            if not future.done():  # a client that went away cancelled its request
                future.set_result(p)

    def _timed_infer(self, inputs: list) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.infer(inputs)
        finally:
            with self._stats_lock:
                self.stats["inference_s"] += time.perf_counter() - start

    async def _next_batch(self) -> list:
        await self._arrived.wait()
        if len(self._pending) < self.max_batch:  # give concurrent requests a moment to join
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.max_wait_s)
        batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        self._update_events()
        return [(x, future) for x, future in batch if not future.done()]  # skip requests given up

    def _update_events(self) -> None:
        for event, is_set in ((self._arrived, bool(self._pending)), (self._full, len(self._pending) >= self.max_batch)):
            event.set() if is_set else event.clear()

    def _count(self, n: int) -> None:  # on the event loop, like every other writer of these counters
        self.stats["batches"] += 1
        self.stats["images"] += n
        self.stats["largest_batch"] = max(self.stats["largest_batch"], n)
