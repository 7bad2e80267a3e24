"""Ray Data pipeline over the Parquet shards: read -> (row id, split, partition) -> torch batches.

Each row gets a stable 63-bit id from its sig_id (blake2b). The id decides, deterministically and without a pass over
the data, whether the row is held out for validation (Table-1 metrics) and which training worker owns it
(id % world_size == rank). Partitioning by id instead of Ray's equal split means no row is dropped to balance
workers, and a resumed epoch can skip exactly the rows that were consumed before the checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from ... import schema as S
from .format import read_manifest, shard_paths, verify_shards

NUMERIC = ["uid", S.EXPR, S.CELL_IDX, S.DRUG_IDX, "log_dose"]
_VAL_BUCKETS = 10_000


def sig_uid(sig_ids) -> np.ndarray:
    """Stable non-negative int64 id per signature id."""
    out = np.empty(len(sig_ids), dtype=np.int64)
    for i, s in enumerate(sig_ids):
        out[i] = int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "little") >> 1
    return out


def is_validation(uid: np.ndarray, val_fraction: float) -> np.ndarray:
    # multiplicative hash so the split is independent of the partition (uid % world)
    h = (uid.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (h % np.uint64(_VAL_BUCKETS)) < np.uint64(round(val_fraction * _VAL_BUCKETS))


def prepare_batch(batch: dict, val_fraction: float, want_val: bool) -> dict:
    """One Parquet batch as the model's rows: stable ids, this split's rows only, log10 dose, expression matrix."""
    uid = sig_uid(batch[S.SIG_ID])
    keep = is_validation(uid, val_fraction) == want_val
    dose = np.asarray(batch[S.DOSE_UM], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_dose = np.where(np.isfinite(dose) & (dose > 0), np.log10(dose), np.nan).astype(np.float32)
    expr = np.asarray(batch[S.EXPR])
    if expr.dtype == object:  # list column that arrived as objects
        expr = np.stack(expr)
    return {
        "uid": uid[keep],
        S.EXPR: expr[keep].astype(np.float32, copy=False),
        S.CELL_IDX: np.asarray(batch[S.CELL_IDX], dtype=np.int64)[keep],
        S.DRUG_IDX: np.asarray(batch[S.DRUG_IDX], dtype=np.int64)[keep],
        "log_dose": log_dose[keep],
    }


def build_dataset(shards_dir: str, *, val_fraction: float = 0.05, validation: bool = False, verify: bool = True):
    """A Ray Dataset of the training (or validation) rows of a shard folder, numeric columns only."""
    import ray.data


    read_manifest(shards_dir)  # ShardError if missing / wrong schema
    if verify:
        verify_shards(shards_dir)  # ShardError naming a missing / truncated / corrupt shard
    ds = ray.data.read_parquet(shard_paths(shards_dir),
                               columns=[S.SIG_ID, S.EXPR, S.CELL_IDX, S.DRUG_IDX, S.DOSE_UM])
    return ds.map_batches(prepare_batch, fn_kwargs={"val_fraction": val_fraction, "want_val": validation},
                          batch_format="numpy", batch_size=1024)


def iter_partition(data_iter, *, batch_size: int, rank: int, world: int, skip_uids: set[int] | None = None,
                   seed: int = 0) -> Iterator[dict]:
    """Yield torch batches of this worker's partition (uid % world == rank), minus `skip_uids`, re-batched to
    exactly `batch_size` rows (last one smaller). `data_iter` is a Ray DataIterator (get_dataset_shard) or any
    object with iter_batches(batch_format='numpy')."""
    import torch

    rng = np.random.default_rng(seed)
    buf: dict[str, list[np.ndarray]] = {k: [] for k in NUMERIC}
    n_buf = 0
    for b in data_iter.iter_batches(batch_size=1024, batch_format="numpy", prefetch_batches=2):
        sel = (b["uid"] % world) == rank
        if skip_uids:
            sel &= ~np.isin(b["uid"], np.fromiter(skip_uids, dtype=np.int64, count=len(skip_uids)))
        if not sel.any():
            continue
        order = rng.permutation(int(sel.sum()))  # local shuffle within the block
        for k in NUMERIC:
            buf[k].append(np.asarray(b[k])[sel][order])
        n_buf += int(sel.sum())
        while n_buf >= batch_size:
            cat = {k: np.concatenate(v) for k, v in buf.items()}
            out = {k: v[:batch_size] for k, v in cat.items()}
            buf = {k: [v[batch_size:]] for k, v in cat.items()}
            n_buf -= batch_size
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
    if n_buf:
        cat = {k: np.concatenate(v) for k, v in buf.items()}
        yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cat.items()}
