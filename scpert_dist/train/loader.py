"""A worker's batches, epoch after epoch, with each epoch's stream started ahead of use.

Ray Data starts a new streaming execution for every pass over a dataset; its first batch arrives seconds later
(launching the read and map tasks: 6-10 s measured on 2 cores) while a step takes a fraction of a second. Here every
epoch's stream runs in a background thread that fills a bounded queue of up to READ_AHEAD batches: epoch 0's starts
before the model is built, and epoch e+1's as soon as epoch e's stream has been read to its end, while the queued
batches of epoch e (the stream keeps the queue full: it is faster than the step) are still being trained on. So a
worker never runs two Ray Data executions at once (two would share, and on a small node starve, the read tasks'
CPUs), and the next epoch's start-up overlaps up to READ_AHEAD steps.
The rows, their order within an epoch and the resume semantics are those of `data.stream.iter_partition`: which
rows a worker consumed is decided by the consumer (the training loop), not by how far a stream has read ahead.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..data.stream import iter_partition

_END = object()
READ_AHEAD = 32
"""Batches a worker's stream may run ahead of the step (32 x 32 rows x 978 genes x 4 bytes = 4 MB at batch 32)."""


@dataclass
class StreamTimes:
    """Seconds this worker spent on the stream: `wait` in next() (all batches), `first_wait` in the first next() of
    each epoch, `startup`: from each stream's start to its first batch (what overlap hides)."""

    wait: float = 0.0
    first_wait: float = 0.0
    startup: float = 0.0


@dataclass
class _Epoch:
    q: queue.Queue
    thread: threading.Thread | None = None
    started: threading.Event = field(default_factory=threading.Event)
    read: threading.Event = field(default_factory=threading.Event)
    """Set once the stream has been read to its end (its last batches may still be queued)."""
    t0: float = 0.0


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars flood a terminal; our own progress lines say what matters."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class EpochLoader:
    """`epoch(e)` yields this worker's batches of epoch e (partition uid % world == rank, batches of exactly
    `batch_size` rows but the last). Epoch `first` skips `skip_uids` (the rows a restored checkpoint had consumed).
    With `overlap`, stream e+1 starts once stream e has been read to its end; without, each starts when asked for."""

    def __init__(self, source, *, batch_size: int, rank: int, world: int, seed: int, first: int, epochs: int,
                 skip_uids: set[int] | None = None, overlap: bool = True, depth: int = READ_AHEAD):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world
        self.seed, self.first, self.epochs, self.skip = seed, first, epochs, set(skip_uids or ())
        self.overlap, self.depth = overlap, depth
        self.times = StreamTimes()
        self._epochs: dict[int, _Epoch] = {}
        self._stop = threading.Event()
        if overlap:
            self._start(first)

    def epoch_seed(self, e: int) -> int:
        return self.seed * 100_003 + e

    def _start(self, e: int) -> None:
        if e in self._epochs or e >= self.epochs:
            return
        ep = _Epoch(q=queue.Queue(maxsize=self.depth), t0=time.perf_counter())
        ep.thread = threading.Thread(target=self._produce, args=(e, ep), daemon=True, name=f"scpert-epoch{e}")
        self._epochs[e] = ep
        ep.thread.start()

    def _produce(self, e: int, ep: _Epoch) -> None:
        it = iter_partition(self.source, batch_size=self.batch_size, rank=self.rank, world=self.world,
                            skip_uids=self.skip if e == self.first else None, seed=self.epoch_seed(e))
        try:
            for batch in it:
                if not ep.started.is_set():
                    self.times.startup += time.perf_counter() - ep.t0
                    ep.started.set()
                if not self._put(ep.q, batch):
                    return
            ep.read.set()
            if self.overlap:
                self._start(e + 1)  # read to the end: the next epoch's start-up overlaps this epoch's queued steps
            self._put(ep.q, _END)
        except BaseException as exc:  # handed to the consumer, which raises it in the training loop
            self._put(ep.q, exc)
        finally:
            ep.started.set()
            it.close()

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def epoch(self, e: int) -> Iterator[dict]:
        self._start(e)
        ep = self._epochs[e]
        first = True
        while True:
            t0 = time.perf_counter()
            item = ep.q.get()
            dt = time.perf_counter() - t0
            self.times.wait += dt
            if first:
                self.times.first_wait += dt
                first = False
            if item is _END:
                self._epochs.pop(e, None)
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the read-ahead threads (a run that ends at max_steps leaves a stream started)."""
        self._stop.set()
        for ep in self._epochs.values():
            if ep.thread is not None:
                ep.thread.join(timeout=1)
