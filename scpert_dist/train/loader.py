"""A worker's batches, epoch after epoch, with the next epoch's stream started ahead of use.

Ray Data starts a new streaming execution for every pass over a dataset; its first batch arrives seconds later
(launching the read and map tasks: 6-10 s measured on 2 cores, 20-30 s on a loaded machine) while a step takes a
fraction of a second. Here every epoch's stream runs in a background thread that fills a bounded queue of up to
READ_AHEAD batches: epoch 0's starts before the model is built, and epoch e+1's once epoch e's stream has been read
to its end AND the training loop has begun epoch e, so the next epoch's start-up overlaps the current epoch's steps.
At most two streams exist per worker (the consumer's epoch and the next), and never two reading at once (two would
share, and on a small node starve, the read tasks' CPUs). Without the second condition an epoch that fits in the
queue (fewer than READ_AHEAD batches) started the next one at once, which did the same, and so on: a 60-step
2-worker run with epochs=100 read dozens of epochs ahead and took 712 s instead of 99 s (the cause found
2026-11-30; tests/test_stream.py pins the bound). With `steps_left`, no stream is started for an epoch the run
will not reach.
The rows, their order within an epoch and the resume semantics are those of `ShardStream.iter_epoch`
(data/shards/stream.py): where a worker stands is the cursor of the last batch the consumer (the training loop) took,
not how far a stream has read ahead.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..data.shards.stream import Cursor, ShardStream

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
    batches: int = 0
    """Batches the stream yielded (all of the epoch's once `read` is set)."""


def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars flood a terminal; our own progress lines say what matters."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class EpochLoader:
    """`epoch(e)` yields this worker's batches of epoch e (its row groups of the epoch's plan, batches of exactly
    `batch_size` rows but the last, each with its `cursor`). Epoch `first` continues from `start` (the cursor a
    restored checkpoint holds, if it is of that epoch).
    With `overlap`, stream e+1 starts once stream e has been read to its end and `epoch(e)` has been asked for
    (at most one epoch ahead of the consumer); without, each starts when asked for. `steps_left` (0: no limit): the
    batches the consumer will take at most (max_steps minus the steps done); no stream is started ahead for an
    epoch beyond them."""

    def __init__(self, stream: ShardStream, *, batch_size: int, rank: int, world: int, first: int, epochs: int,
                 start: Cursor | None = None, overlap: bool = True, depth: int = READ_AHEAD, steps_left: int = 0):
        self.stream, self.batch_size, self.rank, self.world = stream, batch_size, rank, world
        self.first, self.epochs, self.start = first, epochs, start.copy() if start is not None else None
        self.overlap, self.depth, self.steps_left = overlap, depth, steps_left
        self.times = StreamTimes()
        self._epochs: dict[int, _Epoch] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._current = first - 1  # the epoch the consumer is in (asked for last)
        self._before: dict[int, int] = {first: 0}  # batches of the epochs before e (from `first` on)
        if overlap:
            self._start(first)

    def _start(self, e: int) -> None:
        if e in self._epochs or e >= self.epochs:
            return
        ep = _Epoch(q=queue.Queue(maxsize=self.depth), t0=time.perf_counter())
        ep.thread = threading.Thread(target=self._produce, args=(e, ep), daemon=True, name=f"scpert-epoch{e}")
        self._epochs[e] = ep
        ep.thread.start()

    def _produce(self, e: int, ep: _Epoch) -> None:
        it = self.stream.iter_epoch(e, rank=self.rank, world=self.world, batch_size=self.batch_size,
                                    start=self.start if e == self.first else None)
        try:
            for batch in it:
                if not ep.started.is_set():
                    self.times.startup += time.perf_counter() - ep.t0
                    ep.started.set()
                ep.batches += 1
                if not self._put(ep.q, batch):
                    return
            with self._lock:
                ep.read.set()
                self._ahead(e)
            self._put(ep.q, _END)
        except BaseException as exc:  # handed to the consumer, which raises it in the training loop
            self._put(ep.q, exc)
        finally:
            ep.started.set()
            it.close()

    def _ahead(self, e: int) -> None:
        """Under the lock: start stream e+1 if stream e has been read to its end, the consumer is in epoch e (not
        before it: that would chain read-aheads) and the run will reach epoch e+1."""
        ep = self._epochs.get(e)
        if not self.overlap or self._stop.is_set() or ep is None or not ep.read.is_set() or self._current < e:
            return
        self._before[e + 1] = self._before.get(e, 0) + ep.batches
        if self.steps_left and self._before[e + 1] >= self.steps_left:
            return  # max_steps ends the run within epoch e
        self._start(e + 1)

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def epoch(self, e: int) -> Iterator[dict]:
        with self._lock:
            self._current = e
            self._start(e)
            ep = self._epochs[e]
            self._ahead(e)  # stream e already read to its end (read ahead, shorter than the queue): start e+1 now
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
                with self._lock:
                    self._epochs.pop(e, None)
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the read-ahead threads (a run that ends at max_steps leaves a stream started)."""
        self._stop.set()
        with self._lock:
            started = list(self._epochs.values())
        for ep in started:
            if ep.thread is not None:
                ep.thread.join(timeout=1)
