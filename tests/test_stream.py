"""The training stream without Ray (data/shards/stream.py, train/loader.py): each worker decodes only its own row
groups (summed over the workers: the corpus, each row group once), every training row once per epoch, the
validation rows the same for any world size and seed, the same rows in the same order for the same seed and world
size, a resume from the cursor that continues exactly where the checkpoint stood (also with another world size),
a cursor whose size does not grow with the rows, and the epoch loader that starts the next epoch's stream ahead of
use yielding exactly what the plain stream yields.

Shards: the real pipeline (simulator -> GCTX -> ingest) for the realistic folder, and small folders written with the
shard format module (bench/stream.py: simulated z-scores) with small row groups where the partition needs many."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr
from shards_fixture import simulated_shards

from scpert_dist.bench.stream import write_shard_folder
from scpert_dist.checkpoint.resume import data_state
from scpert_dist.data.shards.ingest import shard_paths
from scpert_dist.data.shards.stream import Cursor, ShardStream, is_validation, prepare_rows, sig_uid, units_of
from scpert_dist.errors import ShardError
from scpert_dist.train.loader import EpochLoader

VAL = 0.2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import SHARED

    return simulated_shards(tmp_path_factory.mktemp("stream"), metadata=SHARED)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3,000 rows in shards of 700 rows, row groups of 64: 48 row groups."""
    out = tmp_path_factory.mktemp("small") / "shards"
    write_shard_folder(out, 3000, rows_per_shard=700, row_group_rows=64)
    return out


def _table(shards) -> dict:
    cols = ["sig_id", "expr", "cell_idx", "drug_idx", "dose_um"]
    t = pq.read_table(shard_paths(shards), columns=cols).to_pydict()
    return {k: np.asarray(v, dtype=object if k == "sig_id" else None) for k, v in t.items()}


def _epoch(shards, rank, world, *, seed=0, epoch=0, batch=16, start=None, **kw):
    """(batches, the stream that made them): a fresh stream, as each worker has its own."""
    st = ShardStream(shards, seed=seed, val_fraction=VAL, **kw)
    return list(st.iter_epoch(epoch, rank=rank, world=world, batch_size=batch, start=start)), st


def _group(shards, rows) -> list[int]:
    """The row group (unit index) of each source position."""
    firsts = [u.first for u in units_of(json.loads((shards / "manifest.json").read_text()))]
    return (np.searchsorted(firsts, rows, side="right") - 1).tolist()


def _rows(batches) -> list[int]:
    return [r for b in batches for r in b["row"].tolist()]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_worker_decodes_its_row_groups_and_the_sum_is_the_corpus(small, world):
    man = json.loads((small / "manifest.json").read_text())
    units = units_of(man)
    uid = sig_uid(_table(small)["sig_id"])
    train = set(np.flatnonzero(~is_validation(uid, VAL)).tolist())  # source positions of the training rows
    seen, decoded, units_read, read = [], 0, 0, 0
    for rank in range(world):
        batches, st = _epoch(small, rank, world, shuffle_buffer=200)
        assert all(len(b["uid"]) == 16 for b in batches[:-1]) and 0 < len(batches[-1]["uid"]) <= 16
        assert {b["expr"].shape[1] for b in batches} == {978}
        seen += _rows(batches)
        decoded, units_read, read = decoded + st.stats.rows, units_read + st.stats.units, read + st.stats.bytes_read
    assert decoded == man["n_rows"] and units_read == len(units) == 48  # each row group decoded once, by one worker
    on_disk = 0
    for p in shard_paths(small):
        md = pq.ParquetFile(p).metadata
        on_disk += sum(md.row_group(g).column(c).total_compressed_size for g in range(md.num_row_groups)
                       for c in range(md.num_columns)
                       if md.row_group(g).column(c).path_in_schema.split(".")[0] in ShardStream.columns)
    assert read == on_disk
    assert len(seen) == len(set(seen)) == len(train) and set(seen) == train  # every training row once


def test_validation_rows_the_same_for_any_world_size_and_seed(shards):
    """The held-out rows are those of the sig_id hash, whatever the world size, seed or row-group layout: the union
    of the workers' training rows is the same set, disjoint from the rows the validation pass reads."""
    t = _table(shards)
    val = set(prepare_rows(t, VAL, True)["uid"].tolist())
    assert 0.1 < len(val) / len(t["sig_id"]) < 0.3
    sets = []
    for world, seed in ((1, 0), (2, 0), (3, 7), (2, 11)):
        got = [u for r in range(world) for b in _epoch(shards, r, world, seed=seed)[0] for u in b["uid"].tolist()]
        assert len(got) == len(set(got))
        sets.append(set(got))
    assert all(s == sets[0] for s in sets) and not sets[0] & val
    assert len(sets[0]) + len(val) == len(t["sig_id"])


def test_same_seed_and_world_same_rows_in_the_same_order_and_shuffled(small):
    a = [_rows(_epoch(small, r, 2, seed=3)[0]) for r in range(2)]
    b = [_rows(_epoch(small, r, 2, seed=3, readers=3)[0]) for r in range(2)]  # decoded 3 row groups at a time
    assert a == b
    assert a != [_rows(_epoch(small, r, 2, seed=4)[0]) for r in range(2)]
    assert a != [_rows(_epoch(small, r, 2, seed=3, epoch=1)[0]) for r in range(2)]
    # shuffled: training position vs source position uncorrelated; a batch mixes several row groups
    rows = a[0]
    rho = spearmanr(np.arange(len(rows)), rows).statistic
    assert abs(rho) < 0.2, rho
    per_batch = [len(set(_group(small, b["row"].numpy()))) for b in _epoch(small, 0, 2, seed=3)[0][:-1]]
    assert np.mean(per_batch) > 4, per_batch
    # shuffle_buffer=0: rows of each row group in stored order (the row groups still permuted)
    plain = _rows(_epoch(small, 0, 2, seed=3, shuffle_buffer=0)[0])
    assert sorted(plain) == sorted(rows) and plain != rows
    g = _group(small, plain)
    group = [r for r, gi in zip(plain, g, strict=True) if gi == g[0]]
    assert plain[:len(group)] == group == sorted(group) and len(group) > 40


@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_the_cursor_continues_exactly(small, world):
    """A restarted worker, given the cursor of the last checkpoint (saved and loaded as state.pt is), yields exactly
    the rest of the uninterrupted epoch: no row lost, none repeated; it decodes at most one window again."""
    full = {r: _epoch(small, r, world, seed=5)[0] for r in range(world)}
    cur = Cursor(0, world)
    for r in range(world):
        cur.update(full[r][7 + 3 * r]["cursor"])  # the ranks stand at different places
    buf = io.BytesIO()
    torch.save(data_state(cur, "k"), buf)
    back = Cursor.from_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert back == cur
    for r in range(world):
        k = 8 + 3 * r
        rest, st = _epoch(small, r, world, seed=5, start=back)
        assert _rows(full[r][:k]) + _rows(rest) == _rows(full[r])
        assert [b["expr"].numpy().tobytes() for b in rest] == [b["expr"].numpy().tobytes() for b in full[r][k:]]
        assert rest[-1]["cursor"].rows(r, world) == len(_rows(full[r]))
        _, whole = _epoch(small, r, world, seed=5)
        assert st.stats.rows <= whole.stats.rows - len(_rows(full[r][:k])) + whole.window * 64 + 64


def test_resume_with_another_world_size_loses_and_repeats_nothing(small):
    full = {r: _epoch(small, r, 2, seed=1)[0] for r in range(2)}
    cur = Cursor(0, 2)
    cur.update(full[0][4]["cursor"])
    cur.update(full[1][20]["cursor"])
    done = _rows(full[0][:5]) + _rows(full[1][:21])
    for world in (1, 3):
        rest = [row for r in range(world) for row in _rows(_epoch(small, r, world, seed=1, start=cur)[0])]
        assert not set(rest) & set(done) and len(rest) == len(set(rest))
        assert set(rest) | set(done) == set(_rows(full[0]) + _rows(full[1]))


def test_cursor_size_does_not_depend_on_the_rows(tmp_path):
    """The checkpoint's data state of a 2-worker epoch stopped half way, at 1,000 and at 10,000 rows: the same size
    within 10% (the consumed-id sets it replaces grew by 8 bytes a row)."""
    sizes = {}
    for n in (1_000, 10_000):
        d = tmp_path / str(n)
        write_shard_folder(d, n, n_genes=50, rows_per_shard=n // 4, row_group_rows=128)
        cur = Cursor(0, 2)
        for r in range(2):
            st = ShardStream(d, seed=0, val_fraction=VAL)
            it = st.iter_epoch(0, rank=r, world=2, batch_size=16)
            for _ in range(n // 64):
                b = next(it)
            it.close()
            cur.update(b["cursor"])
        assert cur.rows() == 2 * 16 * (n // 64)
        buf = io.BytesIO()
        torch.save(data_state(cur, st.key), buf)
        sizes[n] = len(buf.getvalue())
    assert abs(sizes[10_000] / sizes[1_000] - 1) < 0.10, sizes


def test_folder_without_row_group_rows_streams_a_shard_as_one_unit(tmp_path):
    d = tmp_path / "old"
    man = write_shard_folder(d, 900, rows_per_shard=300, row_group_rows=64, legacy=True)
    assert "row_group_rows" not in man and [u.group for u in units_of(man)] == [-1, -1, -1]
    got, decoded = [], 0
    for r in range(2):
        batches, st = _epoch(d, r, 2)
        got += _rows(batches)
        decoded += st.stats.rows
    assert decoded == 900 and len(got) == len(set(got)) == len(set(_rows(_epoch(d, 0, 1)[0])))


def test_unreadable_or_mismatched_shards_are_named(tmp_path, small):
    d = tmp_path / "bad"
    shutil.copytree(small, d)
    st = ShardStream(d, val_fraction=VAL)
    (d / "shard-00002.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ShardError, match="cannot read row group") as e:
        list(st.iter_epoch(0, rank=0, world=1, batch_size=16))
    assert "shard-00002.parquet" in str(e.value)
    man = json.loads((d / "manifest.json").read_text())
    man["row_group_rows"] = 128  # the files have groups of 64
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ShardError, match="manifest says"):
        list(ShardStream(d, val_fraction=VAL).iter_epoch(0, rank=0, world=1, batch_size=16))


class CountingStream(ShardStream):
    """The real stream, counting the epochs it was asked to stream."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.iterations = 0

    def iter_epoch(self, *a, **kw):
        self.iterations += 1
        return super().iter_epoch(*a, **kw)


@pytest.mark.parametrize("overlap", [True, False])
def test_epoch_loader_yields_the_plain_stream_and_starts_the_next_epoch_ahead(shards, overlap):
    """Epoch e's batches are exactly iter_epoch's; resumed epoch 1 continues from the cursor; with overlap, the next
    epoch's stream is running when the current epoch's stream has been read to its end, and never two at once."""
    batches, _ = _epoch(shards, 0, 2, seed=3, epoch=1)
    start = Cursor(1, 2)
    start.update(batches[2]["cursor"])
    loader = EpochLoader(ShardStream(shards, seed=3, val_fraction=VAL), batch_size=16, rank=0, world=2, first=1,
                         epochs=3, start=start, overlap=overlap, depth=2)
    for e in (1, 2):
        want = _epoch(shards, 0, 2, seed=3, epoch=e, start=start if e == 1 else None)[0]
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
    def loader(**kw):
        src = CountingStream(shards, val_fraction=VAL)
        return src, EpochLoader(src, batch_size=32, rank=0, world=2, first=0, **kw)

    n, n1 = (len(_epoch(shards, 0, 2, epoch=e, batch=32)[0]) for e in (0, 1))  # shares differ by epoch
    assert 2 < min(n, n1) and max(n, n1) < 64
    src, ld = loader(epochs=100, depth=64)
    assert ld._epochs[0].read.wait(60)  # epoch 0 read ahead before it was asked for: nothing more starts
    time.sleep(0.5)
    assert src.iterations == 1 and sorted(ld._epochs) == [0]
    it = ld.epoch(0)
    next(it)  # the consumer is in epoch 0: epoch 1's stream starts, and only that one
    assert ld._epochs[1].read.wait(60)
    time.sleep(0.5)
    assert src.iterations == 2 and sorted(ld._epochs) == [0, 1]
    assert len(list(it)) == n - 1
    assert len(list(ld.epoch(1))) == n1 and ld._epochs[2].read.wait(60)
    time.sleep(0.5)
    assert src.iterations == 3 and sorted(ld._epochs) == [2]
    ld.close()

    src, ld = loader(epochs=100, depth=64, steps_left=n)
    assert len(list(ld.epoch(0))) == n  # max_steps ends the run with epoch 0: epoch 1 is never read
    assert src.iterations == 1 and not ld._epochs
    ld.close()


def test_epoch_loader_stops_its_read_ahead_and_passes_stream_errors(tmp_path, small):
    loader = EpochLoader(ShardStream(small, val_fraction=VAL), batch_size=8, rank=0, world=1, first=0, epochs=5,
                         depth=1)
    next(loader.epoch(0))  # a run that ends at max_steps mid-epoch: epochs 0 and 1 are read ahead, blocked
    loader.close()
    names = ("scpert-epoch", "scpert-read")
    assert not any(t.name.startswith(names) and t.is_alive() for t in threading.enumerate())
    d = tmp_path / "vanishing"
    shutil.copytree(small, d)
    bad = EpochLoader(ShardStream(d, val_fraction=VAL, shuffle_buffer=0), batch_size=8, rank=0, world=1, first=0,
                      epochs=1, overlap=False)
    for p in shard_paths(d)[1:]:
        (d / p.split("/")[-1]).unlink()  # the shards vanish after the first
    with pytest.raises(ShardError, match="cannot read"):
        list(bad.epoch(0))


def test_bench_stream_refuses_bad_sizes_by_name(monkeypatch, capsys):
    from conftest import run_cli

    code, out = run_cli(monkeypatch, capsys, "bench", "stream", "--rows", "1e5,zero")
    assert code == 2 and "--rows" in out and "positive integers" in out
