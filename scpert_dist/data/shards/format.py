"""The shard folder format: zstd Parquet shards (one row per signature, `expr` as a fixed-size list) + manifest.json.

Writing a shard (serialise, checksum, atomic rename), the manifest (read / write, written last), verification
(size + sha256 of every shard), the shard paths in manifest order, the resume progress file, and an exclusive
lock so two ingests cannot write one folder at once. See schema.py for the columns and manifest keys.

Row groups. Every shard is written in row groups of a fixed number of rows (the last one of a shard shorter),
recorded in the manifest as `row_group_rows`: the training stream (stream.py) deals row groups to the workers, so
a row group is the unit each worker reads, shuffles and resumes in. `row_group_rows(n_genes, dtype)` picks it: the
largest power of two whose `expr` fits ROW_GROUP_BYTES (8 MiB), at most ROW_GROUP_ROWS (2,048 rows: 978 float32 or
float16 genes, the size every shard had before the key existed) and at least 128 (all 12,328 float32 genes).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from ... import schema as S
from ...errors import OutputError, ShardError
from ...paths import atomic_write_bytes, sha256_file

ROW_GROUP_ROWS = 2_048
"""Most rows in a row group (978 landmarks: 2,048 x 3,912 B = 8 MB of float32 `expr`)."""
ROW_GROUP_BYTES = 8 << 20
"""Target `expr` bytes of a row group; wider rows get fewer rows per group (see row_group_rows)."""
MIN_ROW_GROUP_ROWS = 128
PROGRESS = "_progress.json"
LOCK = ".ingest.lock"
SHARD_PATTERN = "shard-{:05d}.parquet"
MANIFEST_KEYS = ("schema_version", "genes", "cells", "drugs", "shards", "n_rows", "expr_dtype")


def fingerprint(d: dict) -> str:
    """A stable hash of the ingest's inputs and settings (decides what a re-run may reuse)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- writing
def row_group_rows(n_genes: int, dtype: str = "float32") -> int:
    """Rows per row group for rows of `n_genes` values of `dtype`: the largest power of two whose `expr` bytes fit
    ROW_GROUP_BYTES, within [MIN_ROW_GROUP_ROWS, ROW_GROUP_ROWS] (978 float32 -> 2,048; 12,328 float32 -> 128)."""
    row_bytes = max(1, n_genes) * (2 if dtype == "float16" else 4)
    fit = max(1, ROW_GROUP_BYTES // row_bytes)
    return int(min(ROW_GROUP_ROWS, max(MIN_ROW_GROUP_ROWS, 1 << (fit.bit_length() - 1))))


def _table_row_group_rows(table) -> int:
    if S.EXPR not in table.column_names:
        return ROW_GROUP_ROWS
    t = table.schema.field(S.EXPR).type
    return row_group_rows(t.list_size, "float16" if str(t.value_type) in ("halffloat", "float16") else "float32")


def expr_array(x: np.ndarray, dtype: str):
    import pyarrow as pa

    n, g = x.shape
    flat = pa.array(x.reshape(-1), type=pa.float16() if dtype == "float16" else pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, g)


def shard_table(m: pd.DataFrame, dose, tim, smiles, cidx, didx, x: np.ndarray, dtype: str):
    """One shard as an Arrow table: metadata rows `m` (sig_id, cell_id, pert_id, pert_iname, pert_type) with their
    dose/time/SMILES/vocabulary indices and the expression rows `x`."""
    import pyarrow as pa

    cols = {
        S.SIG_ID: pa.array(m["sig_id"].tolist(), pa.string()),
        S.CELL_ID: pa.array(m["cell_id"].tolist(), pa.string()),
        S.PERT_ID: pa.array(m["pert_id"].tolist(), pa.string()),
        S.PERT_INAME: pa.array(m["pert_iname"].tolist(), pa.string()),
        S.PERT_TYPE: pa.array(m["pert_type"].tolist(), pa.string()),
        S.DOSE_UM: pa.array(np.asarray(dose, np.float32), pa.float32()),
        S.TIME_H: pa.array(np.asarray(tim, np.float32), pa.float32()),
        S.SMILES: pa.array(list(smiles), pa.string()),
        S.CELL_IDX: pa.array(cidx, pa.int32()),
        S.DRUG_IDX: pa.array(didx, pa.int32()),
        S.EXPR: expr_array(x, dtype),
    }
    return pa.table(cols)


def parquet_bytes(table, row_group_rows: int | None = None) -> bytes:
    """The shard's Parquet bytes, in row groups of `row_group_rows` rows (default: `row_group_rows` of its `expr`
    width; the manifest must record the same value)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # dictionary encoding only for strings (trying it on float lists costs ~40% of the write time);
    # byte-stream-split makes float z-scores compress better under zstd
    strings = [f.name for f in table.schema if str(f.type) == "string"]
    enc = {f"{S.EXPR}.list.element": "BYTE_STREAM_SPLIT"} if S.EXPR in table.column_names else None
    buf = pa.BufferOutputStream()
    rg = row_group_rows or _table_row_group_rows(table)
    pq.write_table(table, buf, compression="zstd", compression_level=1, row_group_size=rg,
                   use_dictionary=strings, column_encoding=enc)
    return buf.getvalue().to_pybytes()


def write_shard(table, path: Path, row_group_rows: int | None = None) -> tuple[str, int]:
    """Serialise, checksum and write one shard atomically (temp + fsync + rename) -> (sha256, bytes)."""
    data = parquet_bytes(table, row_group_rows)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest(), len(data)


# ---------------------------------------------------------------------------------------------- manifest
def write_manifest(out_dir, manifest: dict) -> None:
    """Write manifest.json atomically (the last file of an ingest: its presence means the folder is complete)."""
    atomic_write_bytes(Path(out_dir) / S.MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(out_dir) -> dict:
    """The manifest.json of a shard folder; ShardError when absent or unreadable."""
    p = Path(out_dir) / S.MANIFEST
    if not p.is_file():
        raise ShardError("no manifest.json: the folder is not a finished shard folder", path=str(p),
                         hint="run `scpert data lincs` (again) to finish the ingest")
    try:
        man = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"manifest.json is not valid JSON ({e})", path=str(p), hint="re-run the ingest") from None
    if not isinstance(man, dict):
        raise ShardError("manifest.json is not a JSON object", path=str(p), hint="re-run the ingest")
    for k in MANIFEST_KEYS:
        if k not in man:
            raise ShardError(f"manifest.json lacks {k!r}", path=str(p), field=k, hint="re-run the ingest")
    if man["schema_version"] != S.SCHEMA_VERSION:
        raise ShardError(f"manifest schema_version {man['schema_version']} != {S.SCHEMA_VERSION}", path=str(p),
                         field="schema_version", hint="re-run the ingest with this version of scpert")
    return man


def verify_shards(out_dir) -> None:
    """Check every shard in the manifest exists with its size and sha256; raise ShardError naming the shard."""
    out = Path(out_dir)
    man = read_manifest(out)
    for s in man["shards"]:
        p = out / s["file"]
        if not p.is_file():
            raise ShardError("shard listed in the manifest is missing", path=str(p), field=s["file"],
                             hint="re-run `scpert data lincs` with the same inputs to rebuild it")
        if p.stat().st_size != s["bytes"] or sha256_file(p) != s["sha256"]:
            raise ShardError("shard fails its sha256/size check (corrupt or truncated)", path=str(p),
                             field=s["file"], hint="re-run `scpert data lincs` with the same inputs to rebuild it")


def shard_paths(out_dir) -> list[str]:
    """The shard files of a finished folder in manifest order (give these to ray.data.read_parquet: the folder
    itself also holds manifest.json)."""
    out = Path(out_dir)
    return [str(out / s["file"]) for s in read_manifest(out)["shards"]]


# ---------------------------------------------------------------------------------------------- resume + lock
def read_progress(out_dir, fp: str) -> dict[int, dict]:
    """Shards finished by an interrupted run with the same fingerprint ({index: shard info}); {} otherwise."""
    p = Path(out_dir) / PROGRESS
    try:
        prog = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(prog, dict) or prog.get("fingerprint") != fp:
        return {}
    return {int(k): v for k, v in prog.get("shards", {}).items()}


def write_progress(out_dir, fp: str, done: dict[int, dict]) -> None:
    atomic_write_bytes(Path(out_dir) / PROGRESS, json.dumps({"fingerprint": fp, "shards": done}).encode())


def _lock_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    return True


def _stale(holder: dict, path: Path) -> bool:
    """A lock left by a process of this host that no longer runs (a killed ingest)."""
    if holder.get("host") != socket.gethostname() or "pid" not in holder:
        return False
    return not _alive(holder["pid"]) and path.exists()


@contextmanager
def ingest_lock(out_dir) -> Iterator[Path]:
    """Hold `<out_dir>/.ingest.lock` (created with O_EXCL) while writing; a second ingest into the same folder
    gets OutputError naming the holder. A lock left by a killed process of this host is taken over."""
    path = Path(out_dir) / LOCK
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(path)
            if attempt == 0 and _stale(holder, path):
                path.unlink(missing_ok=True)
                continue
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
            raise OutputError(f"another ingest is writing to this folder ({who})", path=str(out_dir),
                              field=LOCK, hint="wait for it to finish, or choose another --out; if no ingest "
                                               f"runs, delete {LOCK}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, fh)
        yield path
    finally:
        path.unlink(missing_ok=True)
