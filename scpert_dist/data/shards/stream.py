"""The training stream over the Parquet shards: each worker reads only its own row groups, in an order fixed by
(seed, epoch, world size), shuffled within a bounded window, and resumable from a cursor whose size does not grow
with the data.

**Partition.** The unit of work is a row group of a shard (the manifest's `row_group_rows`, format.py; a folder
written before that key existed has one unit per shard). Every epoch the units are permuted by (seed, epoch) and
dealt to the world's ranks greedily by rows (each unit in turn to the rank with the fewest rows so far), so every
unit goes to exactly one rank, the ranks' shares differ by less than one row group, and summed over the workers the
rows decoded in an epoch are the corpus (a restarted worker decodes again the window it stopped in: at most one
window per worker more). Nothing is dropped to balance the ranks: a rank whose share runs out first takes
zero-weight steps (train/trainer.py). The partition only needs each shard's row count and the row-group size, not
the row schema, so any shard of the format streams through it (`ShardStream.columns` / `prepare` are the schema).

*Why not Ray Data's `streaming_split`.* Its coordinator actor hands each block to the split that asks for one next
(Ray 2.60 `OutputSplitter`: to the consumer with the least rows so far, at the moment it asks), so which rows a
worker gets, and in which order, depends on timing: the same seed and world size do not give the same rows in the
same order (ray-project/ray#58658), and there is no position in that stream that a checkpoint could store and a
restart resume from (Ray Data's own checkpointing is by row ids and re-reads all input, ray-project/ray#65891);
`equal=True` drops rows to equalise the splits. A Ray Data pipeline per worker over its assigned row groups would be
deterministic with `preserve_order`, but pays a streaming-execution start per epoch (6-10 s measured on 2 cores)
and runs its decode tasks beside the workers on the same CPUs for nothing a worker's own threads cannot do: pyarrow
decodes a row group with the GIL released, so a worker decodes up to `readers` row groups at once (one per CPU it
reserves, `scaling.cpus_per_worker`). Ray Data still reads the validation rows (build_dataset): one parallel pass at
the end of a run.

**Shuffle.** Row groups are permuted per (seed, epoch); then a worker's sequence of units is cut into windows of
`shuffle_buffer` rows (whole row groups, at least one) and the rows of each window are permuted (MosaicML
Streaming's block shuffle is the same idea). A window's order is a function of (seed, epoch, plan world, plan rank,
window index) only, so the shuffle buffer needs no saving: a restart reads its window again, draws the same
permutation and skips the rows already taken.

**Validation split.** A row is held out when the hash of its sig_id says so (`is_validation`): the same rows for
any world size, seed and row-group size. Training drops them inside its own row groups, so nothing beyond the
worker's share is decoded for them (they are 5% of the rows it decodes at the default val_fraction); the
end-of-run validation pass decodes the corpus once more (Ray Data, all CPUs of the cluster) to find them.

**Cursor.** Where an epoch stands: for each rank of the epoch's plan, (window, rows taken from it, rows consumed in
the epoch), plus the epoch and the plan's world size: O(world), whatever the rows. The plan's world is the world
size when the epoch began; a run resumed with another world size mid-epoch serves plan rank v on rank v % world,
so the epoch still ends with every row once.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ... import schema as S
from ...errors import CheckpointError, ConfigError, ShardError
from .format import read_manifest, shard_paths, verify_shards

NUMERIC = ["uid", S.EXPR, S.CELL_IDX, S.DRUG_IDX, "log_dose"]
COLUMNS = [S.SIG_ID, S.EXPR, S.CELL_IDX, S.DRUG_IDX, S.DOSE_UM]
"""Shard columns the stream reads (the other metadata columns are never decoded)."""
SHUFFLE_BUFFER = 16_384
"""Default rows permuted together (8 row groups of 978-gene rows: 64 MB of float32)."""
_VAL_BUCKETS = 10_000


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def sig_uid(sig_ids) -> np.ndarray:
    """Stable non-negative int64 id per signature id: 64-bit FNV-1a of its UTF-8 bytes, then MurmurHash3's fmix64
    finaliser, >> 1. Vectorised over the bytes of an Arrow string array (0.14 us a row; blake2b per id in Python,
    which the ids were before the row-group stream, took 0.5-0.7 us, 10% of decoding a 978-gene row). Accepts an
    Arrow (chunked) string array or a sequence of strings."""
    import pyarrow as pa

    arr = sig_ids
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if not isinstance(arr, pa.Array):
        arr = pa.array([str(x) for x in arr], pa.string())
    arr = arr.cast(pa.large_string())
    n = len(arr)
    off = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    lens = np.diff(off)
    width = int(lens.max()) if n else 0
    if width:
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
        cols = np.arange(width)
        chars = data[np.minimum(off[:-1, None] + cols, len(data) - 1)].astype(np.uint64)
        live = cols[None, :] < lens[:, None]
        with np.errstate(over="ignore"):
            for j in range(width):
                h = np.where(live[:, j], (h ^ chars[:, j]) * _FNV_PRIME, h)
    with np.errstate(over="ignore"):
        for k in (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)):
            h ^= h >> np.uint64(33)
            h *= k
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(1)).astype(np.int64)


def is_validation(uid: np.ndarray, val_fraction: float) -> np.ndarray:
    # multiplicative hash so the split is independent of anything the partition uses
    h = (uid.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (h % np.uint64(_VAL_BUCKETS)) < np.uint64(round(val_fraction * _VAL_BUCKETS))


def numeric_columns(batch: dict) -> dict:
    """Shard columns -> the numeric training columns of every row: uid, expr (float32; a view where it already is),
    cell_idx, drug_idx, log_dose (NaN for vehicle), and `row` when given."""
    dose = np.asarray(batch[S.DOSE_UM], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_dose = np.where(np.isfinite(dose) & (dose > 0), np.log10(dose), np.nan).astype(np.float32)
    expr = np.asarray(batch[S.EXPR])
    if expr.dtype == object:  # list column that arrived as objects
        expr = np.stack(expr)
    out = {"uid": sig_uid(batch[S.SIG_ID]), S.EXPR: expr.astype(np.float32, copy=False),
           S.CELL_IDX: np.asarray(batch[S.CELL_IDX], dtype=np.int64),
           S.DRUG_IDX: np.asarray(batch[S.DRUG_IDX], dtype=np.int64), "log_dose": log_dose}
    if "row" in batch:
        out["row"] = np.asarray(batch["row"], dtype=np.int64)
    return out


def prepare_rows(batch: dict, val_fraction: float, want_val: bool) -> dict:
    """Shard columns -> numeric_columns of the training (or, `want_val`, the validation) rows."""
    cols = numeric_columns(batch)
    keep = is_validation(cols["uid"], val_fraction) == want_val
    return {k: v[keep] for k, v in cols.items()}


def build_dataset(shards_dir: str, *, val_fraction: float = 0.05, validation: bool = False, verify: bool = True):
    """A Ray Dataset of the training (or validation) rows of a shard folder, numeric columns only. Pretraining uses
    it for the validation rows (one parallel pass at the end); training reads through ShardStream."""
    import ray.data

    read_manifest(shards_dir)  # ShardError if missing / wrong schema
    if verify:
        verify_shards(shards_dir)  # ShardError naming a missing / truncated / corrupt shard
    ds = ray.data.read_parquet(shard_paths(shards_dir), columns=COLUMNS)
    return ds.map_batches(prepare_rows, fn_kwargs={"val_fraction": val_fraction, "want_val": validation},
                          batch_format="numpy", batch_size=1024)


# ------------------------------------------------------------------------------------------------ units and plan
@dataclass(frozen=True)
class Unit:
    """A row group of a shard (group -1: the whole shard, for manifests without row_group_rows)."""

    shard: int
    group: int
    rows: int
    first: int
    """Source position of its first row (rows of the shards before it, in manifest order, plus the groups before)."""


def units_of(manifest: dict, where: str = "") -> list[Unit]:
    """The read units of a shard folder, in manifest order."""
    rg = manifest.get("row_group_rows")
    if rg is not None and (not isinstance(rg, int) or rg < 1):
        raise ShardError(f"manifest row_group_rows must be a positive integer, not {rg!r}", path=where,
                         field="row_group_rows", hint="re-run the ingest")
    out, first = [], 0
    for i, s in enumerate(manifest["shards"]):
        n = int(s["rows"])
        if rg is None:
            out.append(Unit(i, -1, n, first))
        else:
            out += [Unit(i, g, min(rg, n - g * rg), first + g * rg) for g in range(math.ceil(n / rg))]
        first += n
    return out


def deal(units: list[Unit], *, seed: int, epoch: int, world: int) -> list[list[int]]:
    """The epoch's plan: per rank, the indices of its units in reading order. Units are permuted by (seed, epoch)
    and each in turn goes to the rank with the fewest rows so far (lowest rank on ties)."""
    order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(units))
    heap = [(0, r) for r in range(world)]
    plan: list[list[int]] = [[] for _ in range(world)]
    for u in order.tolist():
        load, r = heapq.heappop(heap)
        plan[r].append(u)
        heapq.heappush(heap, (load + units[u].rows, r))
    return plan


# ---------------------------------------------------------------------------------------------------------- cursor
@dataclass
class Cursor:
    """Where an epoch's stream stands. `pos[v]` = [window, rows taken from it, rows consumed in the epoch] of rank v
    of the epoch's plan (`world` ranks: the world size when the epoch began); ranks absent have not started."""

    epoch: int
    world: int
    pos: dict[int, list[int]] = field(default_factory=dict)

    @staticmethod
    def owned(plan_world: int, rank: int, world: int) -> list[int]:
        """Plan ranks served by `rank` of a `world`-rank group (all of them at once, v % world == rank)."""
        return [v for v in range(plan_world) if v % world == rank]

    def of(self, rank: int, world: int) -> dict[int, list[int]]:
        return {v: list(self.pos[v]) for v in self.owned(self.world, rank, world) if v in self.pos}

    def rows(self, rank: int | None = None, world: int = 1) -> int:
        """Rows consumed in the epoch (by the plan ranks `rank` serves, or by all)."""
        vs = self.pos if rank is None else self.owned(self.world, rank, world)
        return sum(self.pos[v][2] for v in vs if v in self.pos)

    def update(self, other: Cursor) -> None:
        if (other.epoch, other.world) != (self.epoch, self.world):
            raise ValueError(f"cursor of epoch {other.epoch}/world {other.world} into {self.epoch}/{self.world}")
        self.pos.update({v: list(p) for v, p in other.pos.items()})

    def copy(self) -> Cursor:
        return Cursor(self.epoch, self.world, {v: list(p) for v, p in self.pos.items()})

    def to_state(self, key: str) -> dict:
        """Plain data for a checkpoint (loads with torch.load(weights_only=True)); its size depends on the world
        size only."""
        import torch

        pos = torch.tensor([[v, *self.pos[v]] for v in sorted(self.pos)], dtype=torch.int64).reshape(-1, 4)
        return {"epoch": int(self.epoch), "world": int(self.world), "key": key, "pos": pos}

    @classmethod
    def from_state(cls, st: dict) -> Cursor:
        return cls(int(st["epoch"]), int(st["world"]), {int(r[0]): [int(x) for x in r[1:]] for r in st["pos"].tolist()})


# ---------------------------------------------------------------------------------------------------------- stream
@dataclass
class ReadStats:
    """What a stream decoded: units, rows (validation rows included), on-disk bytes of the column chunks read and
    decoded Arrow bytes."""

    units: int = 0
    rows: int = 0
    bytes_read: int = 0
    bytes_decoded: int = 0


def _table_columns(table) -> dict:
    """An Arrow table of shard columns -> numpy / list columns for prepare_rows, without per-row Python objects for
    the expression values."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if name == S.EXPR:
            arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # combine_chunks copies
            out[name] = arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
        elif name == S.SIG_ID:
            out[name] = col  # hashed from its Arrow buffers (sig_uid)
        else:
            out[name] = col.to_numpy()
    return out


class ShardStream:
    """The training stream of one shard folder under one seed: `iter_epoch` yields a rank's batches of an epoch (see
    the module docstring), `key` names what a cursor depends on. `readers` row groups are decoded at once."""

    columns = COLUMNS

    def __init__(self, shards_dir, *, seed: int = 0, val_fraction: float = 0.05,
                 shuffle_buffer: int = SHUFFLE_BUFFER, readers: int = 1):
        self.dir = Path(shards_dir)
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be an integer >= 0, not {shuffle_buffer!r}",
                              field="data.shuffle_buffer", hint="rows shuffled together, e.g. 16384; 0 = none")
        if readers < 1:
            raise ConfigError("readers must be >= 1", field="readers")
        self.manifest = read_manifest(self.dir)
        self.units = units_of(self.manifest, str(self.dir / S.MANIFEST))
        if not self.units or not sum(u.rows for u in self.units):
            raise ShardError("the shard folder has no rows", path=str(self.dir), field="n_rows",
                             hint="ingest a non-empty matrix")
        self.paths = shard_paths(self.dir)
        self.seed, self.val_fraction, self.shuffle_buffer, self.readers = seed, val_fraction, shuffle_buffer, readers
        self.window = max(1, shuffle_buffer // max(u.rows for u in self.units))
        """Units per shuffle window."""
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._plans: dict[tuple[int, int], list[list[int]]] = {}

    @property
    def key(self) -> str:
        """What a cursor's meaning depends on: the shards (sha256), their row groups and the order settings."""
        d = {"shards": [s["sha256"] for s in self.manifest["shards"]], "rg": self.manifest.get("row_group_rows"),
             "val": self.val_fraction, "shuffle": self.shuffle_buffer, "seed": self.seed}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def check(self, cursor: Cursor | None, key: str | None) -> None:
        """CheckpointError when a restored cursor mid-epoch was written for other shards or order settings."""
        if cursor is not None and cursor.rows() and key != self.key:
            raise CheckpointError("the checkpoint's stream position is for other shards or other data settings "
                                  "(data.shards, data.val_fraction, data.shuffle_buffer or seed changed)",
                                  path=str(self.dir), field="data",
                                  hint="resume with the settings of the run, or start a new run")

    def plan(self, epoch: int, world: int) -> list[list[int]]:
        k = (epoch, world)
        if k not in self._plans:
            self._plans = {k: deal(self.units, seed=self.seed, epoch=epoch, world=world)}
        return self._plans[k]

    # -------------------------------------------------------------------------------------------- reading
    def read_unit(self, u: Unit) -> dict:
        """Decode one unit: numeric_columns of all its rows in stored order, `row` (source positions) and `keep`
        (training rows)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.paths[u.shard]
        try:
            pf = pq.ParquetFile(path)
            if u.group < 0:
                table = pf.read(columns=self.columns, use_threads=False)
                groups = range(pf.metadata.num_row_groups)
            else:
                table = pf.read_row_group(u.group, columns=self.columns, use_threads=False)
                groups = [u.group]
            md = pf.metadata
        except (OSError, pa.ArrowException) as e:
            what = "the shard" if u.group < 0 else f"row group {u.group}"
            raise ShardError(f"cannot read {what} ({type(e).__name__}: {e})", path=path, field=Path(path).name,
                             hint="re-run `scpert data lincs` with the same inputs (it verifies and rebuilds)") from None
        if table.num_rows != u.rows:
            raise ShardError(f"{'shard' if u.group < 0 else f'row group {u.group}'} has {table.num_rows} rows, the "
                             f"manifest says {u.rows}", path=path, field="row_group_rows",
                             hint="the shards and manifest.json do not belong together: re-run the ingest")
        want = set(self.columns)
        read = sum(md.row_group(g).column(c).total_compressed_size for g in groups for c in range(md.num_columns)
                   if md.row_group(g).column(c).path_in_schema.split(".")[0] in want)
        with self._lock:
            self.stats.bytes_read += read
            self.stats.bytes_decoded += table.nbytes
            self.stats.rows += u.rows
            self.stats.units += 1
        cols = _table_columns(table)
        cols["row"] = np.arange(u.first, u.first + u.rows, dtype=np.int64)
        out = self.prepare(cols)
        out["keep"] = ~is_validation(out["uid"], self.val_fraction)
        return out

    def prepare(self, cols: dict) -> dict:
        """The row schema: shard columns -> numeric columns (numeric_columns for the dense LINCS shards)."""
        return numeric_columns(cols)

    def _windows(self, units: list[int], first: int, pool) -> Iterator[tuple[int, _Window]]:
        """(window index, its units' rows) from window `first` on. A window's units are decoded `readers` at a
        time, and the next window's first `readers` units while the current one is used: at most a window plus
        `readers` units are held (a whole window decoded ahead doubled the memory, and the pages its buffers
        freed were returned to the OS before reuse: page faults cost more CPU than the read-ahead saved)."""
        wins = [units[i:i + self.window] for i in range(0, len(units), self.window)]
        flat = [u for w in range(first, len(wins)) for u in wins[w]]
        q: deque = deque()
        nxt = 0

        def top(limit: int) -> None:
            nonlocal nxt
            while nxt < len(flat) and len(q) < limit:
                q.append(pool.submit(self.read_unit, self.units[flat[nxt]]))
                nxt += 1

        for w in range(first, len(wins)):
            k = len(wins[w])
            top(k)
            parts = [q.popleft().result() for _ in range(k)]
            top(self.readers)
            yield w, _Window(parts)
            del parts

    def _order(self, epoch: int, world: int, v: int, w: int, keep: np.ndarray) -> np.ndarray:
        """Window positions of its training rows in the order they are trained on."""
        idx = np.flatnonzero(keep)
        if self.shuffle_buffer == 0:
            return idx
        return idx[np.random.default_rng(np.random.SeedSequence([self.seed, epoch, world, v, w])).permutation(len(idx))]

    def iter_epoch(self, epoch: int, *, rank: int, world: int, batch_size: int,
                   start: Cursor | None = None) -> Iterator[dict]:
        """This rank's batches of `epoch` (exactly `batch_size` rows but the last) as torch tensors: uid, expr,
        cell_idx, drug_idx, log_dose, row (source positions), plus `cursor`: a Cursor of the plan ranks this rank
        serves, as it stands after the batch. `start`: a restored cursor of this epoch."""
        import torch

        if start is not None and start.epoch == epoch:
            plan_world, pos = start.world, start.of(rank, world)
        else:
            plan_world, pos = world, {}
        plan = self.plan(epoch, plan_world)
        cur = {v: list(pos.get(v, [0, 0, 0])) for v in Cursor.owned(plan_world, rank, world)}
        pending: list[_Piece] = []  # rows ready to batch, in training order
        n_pending = 0

        def emit(n: int) -> dict:
            nonlocal n_pending
            parts = []
            while n:
                p = pending[0]
                k = min(n, p.left)
                parts.append(p.win.take(p.idx[p.at:p.at + k]))
                p.at += k
                n -= k
                n_pending -= k
                taken, done = p.taken + p.at, p.done + p.at
                cur[p.v] = [p.w + 1, 0, done] if taken == p.n else [p.w, taken, done]
                if not p.left:
                    pending.pop(0)
            out = {c: torch.from_numpy(parts[0][c] if len(parts) == 1 else np.concatenate([q[c] for q in parts]))
                   for c in parts[0]}
            out["cursor"] = Cursor(epoch, plan_world, {v: list(x) for v, x in cur.items()})
            return out

        pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="scpert-read")
        try:
            for v in list(cur):
                w0, taken0, done = cur[v]
                for w, win in self._windows(plan[v], w0, pool):
                    order = self._order(epoch, plan_world, v, w, win.keep)
                    skip = taken0 if w == w0 else 0
                    if skip < len(order):
                        pending.append(_Piece(win=win, idx=order[skip:], v=v, w=w, n=len(order), taken=skip,
                                              done=done))
                    del win  # held by its piece only: freed once its rows are taken
                    if skip >= len(order):
                        continue
                    done += len(order) - skip
                    n_pending += len(order) - skip
                    while n_pending >= batch_size:
                        yield emit(batch_size)
            if n_pending:
                yield emit(n_pending)
        finally:  # also when the consumer stops early: decodes not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)


def _pooled_empty(shape: tuple, dtype) -> np.ndarray:
    """A writable array in pyarrow's memory pool (mimalloc/jemalloc keep freed pages; numpy's malloc returned each
    batch's megabyte to the OS, and touching it again page-faulted: 7,000 faults per 20,000 rows, measured)."""
    import pyarrow as pa

    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(pa.allocate_buffer(max(n, 1)), dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class _Window:
    """The decoded units of a shuffle window. Per-row columns are concatenated; 2-D columns (expr) stay one array
    per unit, and a batch gathers its rows from them directly (one copy of the values from decode to batch)."""

    def __init__(self, parts: list[dict]):
        self.keep = np.concatenate([p.pop("keep") for p in parts])
        self.wide = [c for c, a in parts[0].items() if a.ndim > 1]
        self.cols = {c: np.concatenate([p[c] for p in parts]) if len(parts) > 1 else parts[0][c]
                     for c in parts[0] if c not in self.wide}
        self.parts = [{c: p[c] for c in self.wide} for p in parts]
        self.offsets = np.cumsum([0] + [len(p["uid"]) for p in parts])

    def take(self, idx: np.ndarray) -> dict:
        """The rows at window positions `idx`, as new arrays, in ascending position (the batch's rows grouped by
        unit: the order within a batch does not matter to a step, and it reads each unit's rows in order)."""
        idx = np.sort(idx)
        out = {c: a[idx] for c, a in self.cols.items()}
        cuts = np.searchsorted(idx, self.offsets)
        for c in self.wide:
            a0 = self.parts[0][c]
            dst = _pooled_empty((len(idx), *a0.shape[1:]), a0.dtype)
            for u, part in enumerate(self.parts):
                lo, hi = cuts[u], cuts[u + 1]
                if hi > lo:
                    np.take(part[c], idx[lo:hi] - self.offsets[u], axis=0, out=dst[lo:hi])
            out[c] = dst
        return out


@dataclass
class _Piece:
    """The untaken rows of a window: `idx` (window positions, training order) into `win`; `taken`/`done`: the
    window's and the epoch's rows of plan rank `v` taken before idx[0]; `at`: rows of idx taken since."""

    win: _Window
    idx: np.ndarray
    v: int
    w: int
    n: int
    taken: int
    done: int
    at: int = 0

    @property
    def left(self) -> int:
        return len(self.idx) - self.at
