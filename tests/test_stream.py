"""The training stream's row accounting without Ray: the id partition (uid % world == rank), every training row once
per epoch across ranks, validation rows disjoint, a resumed epoch skipping exactly the consumed rows, and the epoch
loader that starts the next epoch's stream ahead of use yielding exactly what the plain stream yields.

The source reads the real shards (simulator -> GCTX -> ingest) with pyarrow and prepares every block with the same
function the Ray Data pipeline maps over them (data.stream.prepare_batch); it offers the DataIterator method the stream
uses (iter_batches)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from shards_fixture import simulated_shards

from scpert_dist.data.shards.ingest import shard_paths
from scpert_dist.data.shards.stream import is_validation, iter_partition, prepare_batch, sig_uid
from scpert_dist.train.loader import EpochLoader

VAL = 0.2
COLS = ["sig_id", "expr", "cell_idx", "drug_idx", "dose_um"]


class ParquetSource:
    """The shards' rows, prepared block by block as build_dataset's map_batches prepares them."""

    def __init__(self, shards, validation: bool = False, block: int = 100):
        self.paths, self.validation, self.block = shard_paths(shards), validation, block
        self.iterations = 0

    def iter_batches(self, *, batch_size=None, batch_format="numpy", prefetch_batches=0):
        self.iterations += 1
        for p in self.paths:
            for rb in pq.ParquetFile(p).iter_batches(batch_size=self.block, columns=COLS):
                d = rb.to_pydict()
                yield prepare_batch({k: np.asarray(v, dtype=object if k == "sig_id" else None) for k, v in d.items()},
                               VAL, self.validation)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import SHARED

    return simulated_shards(tmp_path_factory.mktemp("stream"), metadata=SHARED)


@pytest.fixture(scope="module")
def all_uids(shards) -> np.ndarray:
    ids = np.concatenate([pq.read_table(p, columns=["sig_id"]).column("sig_id").to_numpy(zero_copy_only=False)
                          for p in shard_paths(shards)])
    return sig_uid(ids)


def _uids(batches) -> list[int]:
    return [u for b in batches for u in b["uid"].tolist()]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_training_row_once_per_epoch_across_ranks(shards, all_uids, world):
    train = set(all_uids[~is_validation(all_uids, VAL)].tolist())
    val = _uids(iter_partition(ParquetSource(shards, validation=True), batch_size=64, rank=0, world=1))
    assert len(train) + len(val) == len(all_uids) == len(set(all_uids.tolist()))  # ids are unique
    assert not train & set(val) and 0.1 < len(val) / len(all_uids) < 0.3
    seen: list[int] = []
    for rank in range(world):
        batches = list(iter_partition(ParquetSource(shards), batch_size=16, rank=rank, world=world, seed=5))
        assert all(len(b["uid"]) == 16 for b in batches[:-1]) and 0 < len(batches[-1]["uid"]) <= 16
        assert {b["expr"].shape[1] for b in batches} == {978}
        mine = _uids(batches)
        assert all(u % world == rank for u in mine)
        seen += mine
    assert len(seen) == len(set(seen)) == len(train) and set(seen) == train


def test_resumed_epoch_skips_exactly_the_consumed_rows(shards):
    src = ParquetSource(shards)
    full = _uids(iter_partition(src, batch_size=16, rank=1, world=2, seed=9))
    it = iter_partition(src, batch_size=16, rank=1, world=2, seed=9)
    consumed = set(_uids(next(it) for _ in range(5)))  # a checkpoint after 5 steps
    rest = _uids(iter_partition(src, batch_size=16, rank=1, world=2, seed=9, skip_uids=consumed))
    assert not consumed & set(rest) and consumed | set(rest) == set(full) and len(rest) == len(full) - 80


@pytest.mark.parametrize("overlap", [True, False])
def test_epoch_loader_yields_the_plain_stream_and_starts_the_next_epoch_ahead(shards, overlap):
    """Epoch e's batches are exactly iter_partition's with the epoch's seed; resumed epoch 1 skips the consumed rows;
    with overlap, the next epoch's stream is running when the current epoch's stream has been read to its end, and
    never two at once."""
    src = ParquetSource(shards)
    consumed = set(_uids(iter_partition(src, batch_size=16, rank=0, world=2, seed=3 * 100_003 + 1)))
    consumed = set(list(consumed)[:40])
    loader = EpochLoader(src, batch_size=16, rank=0, world=2, seed=3, first=1, epochs=3, skip_uids=consumed,
                         overlap=overlap, depth=2)
    for e in (1, 2):
        want = list(iter_partition(src, batch_size=16, rank=0, world=2, seed=loader.epoch_seed(e),
                                   skip_uids=consumed if e == 1 else None))
        got, running = [], []
        for b in loader.epoch(e):
            got.append(b)
            running.append(sorted(k for k, ep in loader._epochs.items() if not ep.read.is_set()))
        assert [g["uid"].tolist() for g in got] == [w["uid"].tolist() for w in want]
        assert all(np.array_equal(g["expr"].numpy(), w["expr"].numpy()) for g, w in zip(got, want, strict=True))
        assert ((e + 1) in loader._epochs) == (overlap and e + 1 < 3)  # started before epoch e's end was taken
        assert all(len(r) <= 1 for r in running), running  # one stream reading at a time
    loader.close()
    assert loader.times.wait >= loader.times.first_wait > 0 and loader.times.startup > 0


def test_epoch_loader_reads_at_most_one_epoch_ahead_of_the_consumer(shards):
    """An epoch shorter than the read-ahead queue is read to its end at once; the next epoch's stream must then wait
    for the consumer to begin the current epoch, or stream e+1 starts e+2, and so on (the chain that made 3-epoch
    runs 7x slower). With `steps_left`, no stream starts for an epoch the run will not reach."""
    src = ParquetSource(shards)
    n = sum(1 for _ in EpochLoader(src, batch_size=32, rank=0, world=2, seed=0, first=0, epochs=1).epoch(0))
    assert 2 < n < 64
    src = ParquetSource(shards)
    loader = EpochLoader(src, batch_size=32, rank=0, world=2, seed=0, first=0, epochs=100, depth=64)
    assert loader._epochs[0].read.wait(60)  # epoch 0 read ahead before it was asked for: nothing more starts
    time.sleep(0.5)
    assert src.iterations == 1 and sorted(loader._epochs) == [0]
    it = loader.epoch(0)
    next(it)  # the consumer is in epoch 0: epoch 1's stream starts, and only that one
    assert loader._epochs[1].read.wait(60)
    time.sleep(0.5)
    assert src.iterations == 2 and sorted(loader._epochs) == [0, 1]
    assert len(list(it)) == n - 1
    assert len(list(loader.epoch(1))) == n and loader._epochs[2].read.wait(60)
    time.sleep(0.5)
    assert src.iterations == 3 and sorted(loader._epochs) == [2]
    loader.close()

    src = ParquetSource(shards)
    loader = EpochLoader(src, batch_size=32, rank=0, world=2, seed=0, first=0, epochs=100, depth=64, steps_left=n)
    assert len(list(loader.epoch(0))) == n  # max_steps ends the run with epoch 0: epoch 1 is never read
    assert src.iterations == 1 and not loader._epochs
    loader.close()


def test_epoch_loader_stops_its_read_ahead_and_passes_stream_errors(shards):
    class Broken(ParquetSource):
        def iter_batches(self, **kw):
            yield from list(super().iter_batches(**kw))[:2]
            raise OSError("shard vanished")

    loader = EpochLoader(ParquetSource(shards), batch_size=8, rank=0, world=1, seed=0, first=0, epochs=5, depth=1)
    next(loader.epoch(0))  # a run that ends at max_steps mid-epoch: epochs 0 and 1 are read ahead, blocked
    loader.close()
    assert not any(t.name.startswith("scpert-epoch") and t.is_alive() for t in threading.enumerate())
    bad = EpochLoader(Broken(shards), batch_size=8, rank=0, world=1, seed=0, first=0, epochs=1)
    with pytest.raises(OSError, match="shard vanished"):
        list(bad.epoch(0))
