"""LINCS L1000 (GCTX / GCT / GCT.GZ / Parquet-or-CSV tables) -> Parquet shards + manifest.json (see schema.py).

Two steps: `plan_ingest` reads the file's metadata (l1000.py), picks the gene panel (genes.py), turns the data level
into signatures (l1000.apply_level), keeps trt_cp + ctl_vehicle and builds the vocabularies; `write_ingest` writes
the shards under an exclusive folder lock, resumably, manifest last (shards.py). GCTX matrices are streamed from
HDF5 in row blocks (level 4/5); a level-3 file is z-scored per plate in memory.

Public API: ingest_gctx, ingest_table (and, re-exported from shards.py, read_manifest, verify_shards, shard_paths).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema as S
from ..errors import ConfigError, InputFileError, MetadataError, ScpertError, ValueRangeError
from ..paths import ensure_writable_dir, metadata_dir, sha256_file
from . import shards as SH
from .genes import select_gene_panel
from .l1000 import (
    LevelInfo,
    MatrixSource,
    apply_level,
    doses_times,
    normalize_sig_meta,
    open_source,
    parse_level,
    read_rows,
    source_metadata,
    table_source,
)
from .shards import parquet_bytes as _parquet_bytes
from .shards import read_manifest, shard_paths, verify_shards
from .tables import first, read_table

_read_rows = read_rows  # the name tests use
__all__ = ["ingest_gctx", "ingest_table", "read_manifest", "verify_shards", "shard_paths", "normalize_sig_meta",
           "_parquet_bytes"]

DEFAULT_ROWS_PER_SHARD = 50_000
SEMI_FILE = "SEMI_SYNTHETIC.txt"
KEEP_TYPES = (S.TRT_CP, S.CTL_VEHICLE)
ShardCallback = Callable[[int, int, int], None]
"""on_shard(shards written by this run, index of the shard just recorded, number of shards)."""


# ---------------------------------------------------------------------------------------------- compounds
def _read_compounds(path) -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise InputFileError("compound table not found", path=str(p), hint="pass an existing --compounds file")
    df = read_table(p, "compound")
    cols = set(df.columns)
    if "pert_id" not in cols:
        first_col = str(df.columns[0])
        if first_col.startswith("BRD-") or len(df.columns) == 2:  # headerless (pert_id, smiles)
            sep = "," if p.name.lower().endswith((".csv", ".csv.gz")) else "\t"
            df = pd.read_csv(p, sep=sep, header=None, dtype=str, keep_default_na=False).iloc[:, :2]
            df.columns = ["pert_id", "smiles"]
            cols = set(df.columns)
        else:
            raise MetadataError("compound table lacks pert_id", path=str(p), field="pert_id",
                                hint="columns: pert_id + canonical_smiles (or smiles)")
    sc = first(cols, "canonical_smiles", "smiles", "SMILES")
    if sc is None:
        raise MetadataError("compound table lacks a SMILES column", path=str(p), field="canonical_smiles",
                            hint="columns: pert_id + canonical_smiles (or smiles)")
    out = {}
    for k, v in zip(df["pert_id"].astype(str).str.strip(), df[sc], strict=True):
        if isinstance(v, str) and v.strip() and v.strip() not in ("-666", "nan", "None") and k not in out:
            out[k] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class IngestPlan:
    """Everything the writer needs: which source rows and genes, their metadata and the vocabularies."""

    src: MatrixSource
    rows: np.ndarray
    """source row index of every kept signature, in output order."""
    meta: pd.DataFrame
    """kept rows: sig_id, cell_id, pert_id, pert_iname, pert_type."""
    gsel: np.ndarray
    gene_ids: list[str]
    gene_syms: list[str]
    dose: np.ndarray
    tim: np.ndarray
    smiles: list
    cell_idx: np.ndarray
    drug_idx: np.ndarray
    cells: list[str]
    drugs: list[str]
    drug_names: list[str]
    files: list[Path]
    description: str
    semi: bool
    level: LevelInfo
    n_dropped: int
    notes: list[str] = field(default_factory=list)


def _keep_rows(meta: pd.DataFrame, source: str, say) -> np.ndarray:
    keep_mask = meta["pert_type"].isin(KEEP_TYPES).to_numpy()
    dropped = meta.loc[~keep_mask, "pert_type"].value_counts()
    if len(dropped):
        say(f"dropped {int((~keep_mask).sum())} signatures that are not trt_cp/ctl_vehicle: "
            + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    keep = np.flatnonzero(keep_mask)
    if len(keep) == 0:
        raise MetadataError("no trt_cp or ctl_vehicle signatures in the input", path=source, field="pert_type",
                            hint="the input must contain compound (trt_cp) or vehicle (ctl_vehicle) signatures")
    return keep


def _semi_and_desc(meta: pd.DataFrame, files: list[Path], semi_synthetic, desc: str) -> tuple[bool, str]:
    if semi_synthetic is not None:  # an explicit flag wins over detection
        semi = bool(semi_synthetic)
    else:
        semi = any((f.parent / SEMI_FILE).is_file() for f in files)
        if "scpert_semi_synthetic" in meta.columns:
            semi = semi or any(str(v).strip() in ("1", "1.0", "True", "true") for v in meta["scpert_semi_synthetic"])
    if "scpert_metadata" in meta.columns:
        vals = [str(v) for v in pd.unique(meta["scpert_metadata"]) if str(v).strip()]
        if vals:
            desc = f"{desc}; {vals[0]}"
    return semi, desc


def plan_ingest(src: MatrixSource, *, siginfo=None, inst_info=None, geneinfo=None, compounds=None,
                all_genes: bool = False, metadata=None, semi_synthetic: bool | None = None, level="auto",
                zscore: str = "plate", extra_smiles: dict | None = None, say=print) -> IngestPlan:
    """Metadata, gene panel, level handling, kept rows, doses, SMILES and vocabularies; reads no shard output and
    raises a named error for any bad input before anything is written."""
    meta_dir = metadata_dir(metadata)
    sm = source_metadata(src, siginfo=siginfo, inst_info=inst_info, strict=True)
    files = list(sm.files) + ([Path(geneinfo)] if geneinfo is not None else [])
    panel = select_gene_panel(src.genes, all_genes=all_genes, geneinfo=geneinfo, meta_dir=meta_dir, source=src.name)
    lsrc, meta, info = apply_level(src, sm.meta, level=level, zscore=zscore)
    keep = _keep_rows(meta, src.name, say)
    km = meta.iloc[keep].reset_index(drop=True)
    dose, tim = doses_times(km, src.name)
    smiles_map = _read_compounds(compounds) if compounds is not None else dict(extra_smiles or {})
    if compounds is not None:
        files.append(Path(compounds))
    smiles = [smiles_map.get(p) if t == S.TRT_CP else None for p, t in zip(km["pert_id"], km["pert_type"], strict=True)]
    cells = sorted(set(km["cell_id"]))
    drug_tab = km.drop_duplicates("pert_id")[["pert_id", "pert_iname"]].sort_values("pert_id")
    drugs = drug_tab["pert_id"].tolist()
    semi, desc = _semi_and_desc(meta, files, semi_synthetic, sm.desc)
    return IngestPlan(
        src=lsrc, rows=keep, meta=km, gsel=panel.index, gene_ids=panel.ids, gene_syms=panel.symbols, dose=dose,
        tim=tim, smiles=smiles, cell_idx=pd.Index(cells).get_indexer(km["cell_id"]).astype(np.int32),
        drug_idx=pd.Index(drugs).get_indexer(km["pert_id"]).astype(np.int32), cells=cells, drugs=drugs,
        drug_names=drug_tab["pert_iname"].tolist(), files=files, description=f"{desc}; genes: {panel.description}",
        semi=semi, level=info, n_dropped=int(len(meta) - len(keep)), notes=list(sm.notes))


# ---------------------------------------------------------------------------------------------- write
def _shard_values(plan: IngestPlan, a: int, b: int, dtype: str) -> tuple[np.ndarray, int]:
    rows = plan.rows[a:b]
    x, nbytes = read_rows(plan.src, rows, plan.gsel)
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueRangeError(
            f"{int(bad.sum())} NaN/Inf values in the matrix (first: signature {plan.src.sig_ids[rows[r]]!r}, "
            f"gene {plan.gene_ids[c]!r})", path=plan.src.name, field="matrix",
            hint="remove or impute non-finite values before ingesting")
    if dtype == "float16":
        x16 = x.astype(np.float16)
        if not np.isfinite(x16).all():
            raise ValueRangeError("values overflow float16", path=plan.src.name, field="matrix",
                                  hint="use --dtype float32")
        x = x16
    return x, nbytes


@dataclass
class _Run:
    """State of one write: shards finished before (resume) and now, pending writes, the progress file."""

    out: Path
    fp: str
    done: dict[int, dict]
    n_shards: int
    on_shard: ShardCallback | None
    bar: object = None
    shard_info: list[dict] = field(default_factory=list)
    written_now: list[Path] = field(default_factory=list)
    pending: list[tuple[int, str, int, Future]] = field(default_factory=list)
    n_new: int = 0

    def record(self, si: int, fname: str, nrows: int, fut: Future) -> None:
        sha, nbytes = fut.result()
        info = {"file": fname, "rows": int(nrows), "sha256": sha, "bytes": nbytes}
        self.shard_info.append(info)
        self.done[si] = info
        SH.write_progress(self.out, self.fp, self.done)
        self.bar.update(nrows)
        self.n_new += 1
        if self.on_shard is not None:
            self.on_shard(self.n_new, si, self.n_shards)

    def flush(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            self.record(*self.pending.pop(0))

    def record_finished_after_crash(self) -> None:
        for si, fname, nrows, fut in self.pending:
            if fut.done() and fut.exception() is None:
                sha, nbytes = fut.result()
                self.done[si] = {"file": fname, "rows": int(nrows), "sha256": sha, "bytes": nbytes}
        SH.write_progress(self.out, self.fp, self.done)


def _write_loop(plan: IngestPlan, run: _Run, bounds, dtype: str, pool: ThreadPoolExecutor, n_writers: int,
                say) -> int:
    """Read, check and write every shard not already done; -> bytes of source matrix read."""
    src_bytes = 0
    for si, (a, b) in enumerate(bounds):
        fname = SH.SHARD_PATTERN.format(si)
        fpath = run.out / fname
        prev = run.done.get(si)
        if prev is not None and fpath.is_file():
            if sha256_file(fpath) == prev["sha256"]:
                run.flush()
                run.shard_info.append(prev)
                run.bar.update(b - a)
                continue
            say(f"shard {fname} fails its sha256 check (corrupt or partial), rebuilding it")
        x, nbytes = _shard_values(plan, a, b, dtype)
        src_bytes += nbytes
        table = SH.shard_table(plan.meta.iloc[a:b], plan.dose[a:b], plan.tim[a:b], plan.smiles[a:b],
                               plan.cell_idx[a:b], plan.drug_idx[a:b], x, dtype)
        run.flush(keep=n_writers - 1)  # earlier shards' writes overlap with this shard's read
        run.written_now.append(fpath)
        run.pending.append((si, fname, b - a, pool.submit(SH.write_shard, table, fpath)))
    run.flush()
    return src_bytes


def _write_shards(plan: IngestPlan, run: _Run, bounds, dtype: str, progress: bool, say) -> int:
    """The shard loop with its failure policy: bad input removes this run's output; a crash keeps what finished."""
    from tqdm.auto import tqdm

    prior_done = set(run.done)
    n_writers = max(2, min(8, os.cpu_count() or 2))
    pool = ThreadPoolExecutor(max_workers=n_writers)  # encode/write shards k-1, k while shard k+1 is read
    run.bar = tqdm(total=len(plan.rows), unit="sig", desc="lincs->parquet", disable=not progress, mininterval=1.0)
    try:
        src_bytes = _write_loop(plan, run, bounds, dtype, pool, n_writers, say)
        run.bar.close()
        return src_bytes
    except ScpertError:
        pool.shutdown(wait=True)
        for p in run.written_now:  # bad input: leave no partial output (shards of this run, progress file)
            p.unlink(missing_ok=True)
        if not prior_done:
            (run.out / SH.PROGRESS).unlink(missing_ok=True)
        raise
    except BaseException:
        pool.shutdown(wait=True)  # a crash: record shards whose write finished, so a re-run resumes after them
        run.record_finished_after_crash()
        raise
    finally:
        pool.shutdown(wait=True)


def _resume_state(out: Path, fp: str, say) -> tuple[dict | None, dict[int, dict]]:
    """(the finished manifest when the folder already holds this exact ingest, shards reusable from before)."""
    man_path = out / S.MANIFEST
    done: dict[int, dict] = {}
    if man_path.is_file():
        try:
            old = SH.read_manifest(out)
        except ScpertError:
            old = {}
        if old.get("fingerprint") == fp:
            try:
                verify_shards(out)
                say(f"{out}: already complete ({old['n_rows']} rows), nothing to do")
                return old, {}
            except ScpertError as e:
                say(f"existing output fails verification, rebuilding what is bad: {e.args[0].splitlines()[0]}")
                done = dict(enumerate(old["shards"]))
        man_path.unlink()  # a stale manifest must not describe shards being rewritten
    return None, done or SH.read_progress(out, fp)


def _manifest(plan: IngestPlan, run: _Run, sources: list[dict], src_sha: list[Future], dtype: str) -> dict:
    return {
        "schema_version": S.SCHEMA_VERSION, "kind": "lincs",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "genes": plan.gene_ids, "gene_symbols": plan.gene_syms, "n_genes": len(plan.gene_ids),
        "cells": plan.cells, "drugs": plan.drugs, "drug_names": plan.drug_names,
        "shards": run.shard_info, "n_rows": int(len(plan.rows)), "expr_dtype": dtype,
        "sources": [{"name": d["name"], "sha256": h.result(), "bytes": d["bytes"]}
                    for d, h in zip(sources, src_sha, strict=True)],
        "metadata": plan.description, "semi_synthetic": plan.semi, "layout": "fixed_size_list",
        "level": plan.level.level, "transform": plan.level.transform, "level_detection": plan.level.reason,
        "notes": plan.notes, "n_dropped": plan.n_dropped, "fingerprint": run.fp,
    }


def write_ingest(plan: IngestPlan, out_dir, *, rows_per_shard: int, dtype: str, all_genes: bool,
                 progress: bool = True, on_shard: ShardCallback | None = None, say=print) -> dict:
    """Write the plan's shards + manifest into `out_dir` under an exclusive lock; resumable. -> the manifest."""
    out = ensure_writable_dir(out_dir)
    with SH.ingest_lock(out):
        # the sources' sha256 (a full pass over a 35 GB file) runs in a thread beside the ingest; the resume
        # fingerprint uses name + size + mtime so it is known up front
        hasher = ThreadPoolExecutor(max_workers=1)
        src_sha = [hasher.submit(sha256_file, f) for f in plan.files]
        hasher.shutdown(wait=False)
        sources = [{"name": f.name, "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in plan.files]
        n = len(plan.rows)
        bounds = [(a, min(a + rows_per_shard, n)) for a in range(0, n, rows_per_shard)]
        fp = SH.fingerprint({"sources": sources, "all_genes": all_genes, "rows_per_shard": rows_per_shard,
                             "dtype": dtype, "genes": plan.gene_ids, "semi": plan.semi, "schema": S.SCHEMA_VERSION,
                             "level": plan.level.level, "transform": plan.level.transform})
        finished, done = _resume_state(out, fp, say)
        if finished is not None:
            return finished
        run = _Run(out=out, fp=fp, done=done, n_shards=len(bounds), on_shard=on_shard)
        t0 = time.perf_counter()
        src_bytes = _write_shards(plan, run, bounds, dtype, progress, say)
        for p in out.glob("shard-*.parquet"):  # stale shards from an earlier, larger run
            if p.name not in {s["file"] for s in run.shard_info}:
                p.unlink()
        manifest = _manifest(plan, run, sources, src_sha, dtype)
        SH.write_manifest(out, manifest)
        (out / SH.PROGRESS).unlink(missing_ok=True)
    if progress and src_bytes:
        say(f"wrote {n} signatures x {len(plan.gene_ids)} genes in {len(run.shard_info)} shard(s) to {out} "
            f"({src_bytes / (time.perf_counter() - t0) / 1e6:.0f} MB/s of source matrix); {plan.level.transform}")
    return manifest


# ---------------------------------------------------------------------------------------------- public API
def _check_settings(dtype: str, rows_per_shard: int, level, zscore: str) -> None:
    parse_level(level)
    if zscore not in ("plate", "vehicle"):
        raise ConfigError(f"unknown z-score reference {zscore!r}", field="zscore", hint="use plate or vehicle")
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"unsupported expr dtype {dtype!r}", field="dtype", hint="use float32 or float16")
    if rows_per_shard < 1:
        raise ConfigError("rows_per_shard must be >= 1", field="rows_per_shard", hint="e.g. 50000")


def _ingest(src: MatrixSource, out_dir, *, rows_per_shard, dtype, progress, on_shard, all_genes, **plan_kw) -> dict:
    say = print if progress else (lambda *a, **k: None)
    try:
        _check_settings(dtype, rows_per_shard, plan_kw.get("level", "auto"), plan_kw.get("zscore", "plate"))
        plan = plan_ingest(src, all_genes=all_genes, say=say, **plan_kw)
        return write_ingest(plan, out_dir, rows_per_shard=rows_per_shard, dtype=dtype, all_genes=all_genes,
                            progress=progress, on_shard=on_shard, say=say)
    finally:
        src.close()


def ingest_gctx(path, out_dir, *, siginfo=None, inst_info=None, geneinfo=None, compounds=None,
                all_genes: bool = False, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, dtype: str = "float32",
                metadata=None, semi_synthetic: bool | None = None, level="auto", zscore: str = "plate",
                progress: bool = True, on_shard: ShardCallback | None = None) -> dict:
    """A LINCS matrix file (.gctx streamed with h5py; .gct / .gct.gz via cmapPy; the format is read from the first
    bytes) -> Parquet shards + manifest.json in `out_dir`.

    Metadata from `inst_info` (wells) or `siginfo` (sig_info / siginfo_beta), else the file's embedded column
    metadata; genes from `geneinfo`, the embedded row metadata, or the landmark table in `metadata`. The data level
    is detected (or given): 2 is refused, 3 z-scored per plate (`zscore`: plate | vehicle), 4/5 clipped to +-10.
    Keeps trt_cp + ctl_vehicle, 978 landmarks unless `all_genes`. Resumable; the manifest is written last.
    `on_shard(n_written, shard_index, n_shards)` is called after each shard is recorded. Returns the manifest."""
    return _ingest(open_source(path), out_dir, siginfo=siginfo, inst_info=inst_info, geneinfo=geneinfo,
                   compounds=compounds, all_genes=all_genes, rows_per_shard=rows_per_shard, dtype=dtype,
                   metadata=metadata, semi_synthetic=semi_synthetic, level=level, zscore=zscore, progress=progress,
                   on_shard=on_shard)


def ingest_table(path, out_dir, *, siginfo=None, geneinfo=None, compounds=None, all_genes: bool = False,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, dtype: str = "float32", metadata=None,
                 semi_synthetic: bool | None = None, level="asis", progress: bool = True,
                 on_shard: ShardCallback | None = None) -> dict:
    """A Parquet/CSV matrix (metadata columns + gene columns named by Entrez id) -> shards + manifest.

    Values are taken as given unless `level` says otherwise (model-ready tables, e.g. TranSiGen's expression
    pairs, are not plate z-scores). SMILES come from `compounds`, else from a canonical_smiles/smiles column."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError("input table not found", path=str(p), hint="pass an existing .parquet or .csv file")
    src = table_source(p)
    smc = src.meta.attrs.get("smiles_col")
    table_smiles = None
    if compounds is None and smc is not None:  # the table carries its own SMILES
        table_smiles = dict(zip(src.meta["pert_id"].astype(str), src.meta[smc].astype(str), strict=True))
    return _ingest(src, out_dir, siginfo=siginfo, geneinfo=geneinfo, compounds=compounds, all_genes=all_genes,
                   rows_per_shard=rows_per_shard, dtype=dtype, metadata=metadata, semi_synthetic=semi_synthetic,
                   level=level, progress=progress, on_shard=on_shard, extra_smiles=table_smiles)
