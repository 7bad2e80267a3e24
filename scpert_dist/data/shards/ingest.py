"""LINCS L1000 (GCTX / GCT / GCT.GZ / Parquet-or-CSV tables) -> Parquet shards + manifest.json (see schema.py).

Two steps: `plan_ingest` reads the file's metadata (l1000.py), picks the gene panel (genes.py), turns the data level
into signatures (l1000.apply_level), keeps trt_cp + ctl_vehicle and builds the vocabularies; `write_ingest` writes
the shards under an exclusive folder lock, resumably, manifest last (shards.py). GCTX matrices are streamed from
HDF5 in row blocks (level 4/5); a level-3 file is z-scored per plate in memory. With `workers` > 1 a GCTX of
level 4/5 (or as is) is written by worker processes (or Ray tasks), each reopening the file by path and reading,
encoding and writing its own shards; the shards and manifest are the same whatever the worker count.

Public API: ingest_gctx, ingest_table (and, re-exported from shards.py, read_manifest, verify_shards, shard_paths).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ... import schema as S
from ...errors import ConfigError, InputFileError, MetadataError, OutputError, ScpertError, ValueRangeError
from ...paths import ensure_writable_dir, metadata_dir, sha256_file
from ..readers.genes import select_gene_panel
from ..readers.l1000 import (
    LevelInfo,
    MatrixSource,
    _clipping_reader,
    _gctx_open,
    apply_level,
    doses_times,
    file_smiles,
    gctx_block_reader,
    normalize_sig_meta,
    open_source,
    parse_level,
    read_rows,
    sniff_format,
    source_metadata,
    table_source,
)
from ..readers.tables import decode, first, read_table
from . import format as SH
from .format import read_manifest, shard_paths, verify_shards

__all__ = ["ingest_gctx", "ingest_table", "read_manifest", "verify_shards", "shard_paths", "normalize_sig_meta"]

DEFAULT_ROWS_PER_SHARD = 50_000
SEMI_FILE = "SEMI_SYNTHETIC.txt"
KEEP_TYPES = (S.TRT_CP, S.CTL_VEHICLE)
BACKENDS = ("process", "ray")
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
    genes_missing: list[str] = field(default_factory=list)
    """panel genes the file does not hold: NaN in every row (a per-file gene mask), never zero-filled."""
    gene_report: str = ""
    """how the file's rows became genes and what was dropped (genes.FileGenes.report)."""
    no_smiles: dict = field(default_factory=dict)
    """trt_cp compounds without SMILES: {n, of, first}."""
    reopen: tuple[str, bool] | None = None
    """(GCTX path, clip to +-10) when worker processes can reopen the source by path and read their own rows."""
    serial_why: str = ""
    """why not (a table or GCT text is parsed whole into this process; level 3 is z-scored in its memory)."""


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
    smiles_map = _read_compounds(compounds) if compounds is not None else dict(extra_smiles or file_smiles(src))
    if compounds is not None:
        files.append(Path(compounds))
    smiles = [smiles_map.get(p) if t == S.TRT_CP else None for p, t in zip(km["pert_id"], km["pert_type"], strict=True)]
    no_smiles = _without_smiles(km, smiles, compounds is not None or bool(smiles_map), say)
    if panel.missing or src.genes.report():
        say(f"genes: {panel.description}" + (f"; {src.genes.report()}" if src.genes.report() else ""))
    cells = sorted(set(km["cell_id"]))
    drug_tab = km.drop_duplicates("pert_id")[["pert_id", "pert_iname"]].sort_values("pert_id")
    drugs = drug_tab["pert_id"].tolist()
    semi, desc = _semi_and_desc(meta, files, semi_synthetic, sm.desc)
    return IngestPlan(
        src=lsrc, rows=keep, meta=km, gsel=panel.index, gene_ids=panel.ids, gene_syms=panel.symbols, dose=dose,
        tim=tim, smiles=smiles, cell_idx=pd.Index(cells).get_indexer(km["cell_id"]).astype(np.int32),
        drug_idx=pd.Index(drugs).get_indexer(km["pert_id"]).astype(np.int32), cells=cells, drugs=drugs,
        drug_names=drug_tab["pert_iname"].tolist(), files=files, description=f"{desc}; genes: {panel.description}",
        semi=semi, level=info, n_dropped=int(len(meta) - len(keep)), notes=list(sm.notes),
        genes_missing=list(panel.missing), gene_report=src.genes.report(), no_smiles=no_smiles,
        **_reopenable(src, info))


def _without_smiles(km: pd.DataFrame, smiles: list, had_table: bool, say) -> dict:
    """The trt_cp compounds that got no SMILES (said on the console, kept in the manifest): {n, of, first}."""
    trt = km[km["pert_type"] == S.TRT_CP]
    have = {p for p, s, t in zip(km["pert_id"], smiles, km["pert_type"], strict=True) if t == S.TRT_CP and s}
    lacking = trt.drop_duplicates("pert_id")
    lacking = lacking[~lacking["pert_id"].isin(have)]
    out = {"n": int(len(lacking)), "of": int(trt["pert_id"].nunique()),
           "first": [f"{n} ({p})" if n and n != p else p for p, n in zip(lacking["pert_id"][:10],
                                                                         lacking["pert_iname"][:10], strict=True)]}
    if out["n"]:
        where = ("the compound table (--compounds) or the file's SMILES column" if had_table else
                 "any table: no --compounds given and the file has no SMILES column")
        say(f"{out['n']} of {out['of']} compounds have no SMILES in {where} (first: {', '.join(out['first'][:5])}); "
            "they get no structure features (drug_rep morgan/descriptors skip them)")
    return out


def _reopenable(src: MatrixSource, info: LevelInfo) -> dict:
    """Can worker processes reopen the source by path and read their own rows (a GCTX of level 4/5, or as is)?"""
    if src.genes.columns is not None:
        return {"serial_why": "some rows of the matrix are no gene (or a probe of no gene) and are dropped in this "
                              "process, so worker processes cannot read their own columns of it"}
    if len(src.files) != 1 or sniff_format(src.files[0]) != "gctx":
        return {"serial_why": "a GCT text file, an .h5ad or a table is read by this process only, so worker "
                              "processes cannot read their own rows of it"}
    if info.level == 3:
        return {"serial_why": "level-3 profiles are z-scored per plate in this process's memory, so worker "
                              "processes cannot read their own rows of the signatures"}
    return {"reopen": (str(src.files[0]), info.level in (4, 5))}


# ---------------------------------------------------------------------------------------------- write
def _shard_values(src: MatrixSource, rows: np.ndarray, gsel: np.ndarray, gene_ids: list[str], dtype: str
                  ) -> tuple[np.ndarray, int]:
    """Source rows `rows`, genes `gsel`, checked finite and cast -> (values, bytes of source read)."""
    x, nbytes = read_rows(src, rows, gsel)
    bad = ~np.isfinite(x)
    bad[:, gsel < 0] = False  # panel genes the file lacks: NaN by design (the gene mask)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueRangeError(
            f"{int(bad.sum())} NaN/Inf values in the matrix (first: signature {str(src.sig_ids[rows[r]])!r}, "
            f"gene {gene_ids[c]!r})", path=src.name, field="matrix",
            hint="remove or impute non-finite values before ingesting")
    if dtype == "float16":
        x16 = x.astype(np.float16)
        if not np.isfinite(x16[:, gsel >= 0]).all():
            raise ValueRangeError("values overflow float16", path=src.name, field="matrix",
                                  hint="use --dtype float32")
        x = x16
    return x, nbytes


# ---------------------------------------------------------------------------------------------- parallel workers
@dataclass
class _ShardTask:
    """One shard as a unit of work for a worker process or Ray task: where to read (the GCTX by path) and what to
    write (the rows' metadata; not their values). The worker reads, checks, encodes and writes the shard itself."""

    path: str
    name: str
    stamp: tuple[int, int]
    shape: tuple[int, int]
    """(signatures, genes) of the source: the matrix is stored so, or transposed (genes x signatures)."""
    clip: bool
    rows: np.ndarray
    gsel: np.ndarray
    gene_ids: list[str]
    dtype: str
    meta: pd.DataFrame
    dose: np.ndarray
    tim: np.ndarray
    smiles: list
    cell_idx: np.ndarray
    drug_idx: np.ndarray
    out: str


_OPEN: dict[tuple, MatrixSource] = {}  # in a worker: the GCTX it has open (reused by its next shards)


class _IdsOnDemand:
    """A GCTX's signature ids read one at a time (a worker needs one only to name a bad value; decoding all of
    them and the column metadata, as gctx_source does, costs a worker ~1 s per 100k signatures)."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, i) -> str:
        return str(decode(self.ds[int(i):int(i) + 1])[0])


def _worker_source(t: _ShardTask) -> MatrixSource:
    """The GCTX's matrix, opened once per worker process (the same reads as gctx_source, clipped as apply_level
    clips level 4/5); the stamp (size, mtime) guards against a file replaced since the plan."""
    key = (t.path, t.stamp, t.shape, t.clip)
    src = _OPEN.get(key)
    if src is not None:
        return src
    for old in _OPEN.values():
        old.close()
    _OPEN.clear()
    st = os.stat(t.path)
    f = _gctx_open(Path(t.path))
    mat = f["0/DATA/0/matrix"]
    if (st.st_size, st.st_mtime_ns) != t.stamp or mat.shape not in (t.shape, t.shape[::-1]):
        f.close()
        raise InputFileError("the GCTX changed after the ingest read its metadata", path=t.name,
                             hint="re-run the ingest once the file is complete")
    ids = f["0/META/COL/id"]  # the signatures are the columns' ids in either orientation (as in gctx_source)
    read_block = gctx_block_reader(mat, mat.shape != t.shape, t.name)
    src = MatrixSource(name=t.name, sig_ids=_IdsOnDemand(ids), meta=pd.DataFrame(), genes=None,  # type: ignore
                       read_block=_clipping_reader(read_block) if t.clip else read_block, files=[Path(t.path)],
                       close=f.close)
    _OPEN[key] = src
    return src


def _run_shard_task(t: _ShardTask) -> tuple[str, int, int, float]:
    """In a worker: read rows `t.rows` of the GCTX, check them, build and write the shard -> (sha256, bytes of
    the shard, bytes of source matrix read, CPU seconds). The same steps as the serial path, so the same bytes."""
    cpu0 = time.process_time()
    x, nbytes = _shard_values(_worker_source(t), t.rows, t.gsel, t.gene_ids, t.dtype)
    table = SH.shard_table(t.meta, t.dose, t.tim, t.smiles, t.cell_idx, t.drug_idx, x, t.dtype)
    sha, size = SH.write_shard(table, Path(t.out))
    return sha, size, nbytes, time.process_time() - cpu0


def _shard_task(plan: IngestPlan, a: int, b: int, dtype: str, fpath: Path) -> _ShardTask:
    path, clip = plan.reopen
    st = os.stat(path)
    return _ShardTask(path=os.path.abspath(path), name=plan.src.name, stamp=(st.st_size, st.st_mtime_ns),
                      shape=(len(plan.src.sig_ids), len(plan.src.genes.ids)), clip=clip,
                      rows=plan.rows[a:b], gsel=plan.gsel, gene_ids=plan.gene_ids, dtype=dtype,
                      meta=plan.meta.iloc[a:b], dose=plan.dose[a:b], tim=plan.tim[a:b], smiles=plan.smiles[a:b],
                      cell_idx=plan.cell_idx[a:b], drug_idx=plan.drug_idx[a:b], out=str(fpath))


def _mp_context():
    """forkserver where the platform has it (a worker starts in ~10 ms, forked from a server that imported this module
    once per parent process), else spawn (~1-8 s per worker: a fresh interpreter imports pandas, pyarrow, h5py).
    Never fork: the parent runs threads (the sources' sha256, tqdm)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # no effect once the server runs (the workers then import it)
        return ctx
    return multiprocessing.get_context("spawn")


class _Workers:
    """`n` worker processes (forkserver or spawn, see _mp_context) or Ray tasks (num_cpus=1 each, on the Ray
    cluster this process is connected to, else a local one of `n` CPUs) behind one submit(task) -> Future whose
    exception is the worker's own (a ScpertError stays that ScpertError); a lost worker gives BrokenExecutor."""

    def __init__(self, n: int, backend: str):
        self.backend = backend
        self.ray_started = False
        self.futures: list[Future] = []
        if backend == "process":
            self.pool = ProcessPoolExecutor(max_workers=n, mp_context=_mp_context())
            return
        import ray

        if not ray.is_initialized():
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=False)
            else:
                ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
            self.ray_started = True
        self.remote = ray.remote(num_cpus=1)(_run_shard_task)

    def submit(self, task: _ShardTask) -> Future:
        if self.backend == "process":
            return self.pool.submit(_run_shard_task, task)
        out: Future = Future()
        out.set_running_or_notify_cancel()

        def done(f: Future) -> None:
            try:
                out.set_result(f.result())
            except BaseException as e:  # noqa: BLE001 - handed on to whoever waits for the shard
                out.set_exception(_from_ray(e))

        self.remote.remote(task).future().add_done_callback(done)
        self.futures.append(out)
        return out

    def shutdown(self) -> None:
        """Wait for the shards being written (so a cleanup can follow); shards not started are cancelled."""
        if self.backend == "process":
            self.pool.shutdown(wait=True, cancel_futures=True)
            return
        wait_futures(self.futures)
        if self.ray_started:
            import ray

            ray.shutdown()
            self.ray_started = False


def _from_ray(e: BaseException) -> BaseException:
    """A Ray task's error -> the task's own exception (a RayTaskError wraps it); a lost worker -> BrokenExecutor."""
    from ray.exceptions import RayError, RayTaskError

    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, Exception) else BrokenExecutor(str(e))
    if isinstance(e, RayError):
        return BrokenExecutor(f"a Ray ingest task was lost ({type(e).__name__}: {e})")
    return e


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
    src_bytes: int = 0
    worker_cpu_s: float = 0.0

    def record(self, si: int, fname: str, nrows: int, fut: Future) -> None:
        try:
            res = fut.result()
        except ScpertError as e:  # a worker's named error, without the worker's traceback attached
            e.__cause__ = None
            raise
        sha, nbytes = res[0], res[1]
        if len(res) > 2:  # from a worker: (sha256, bytes, source bytes read, its CPU seconds)
            self.src_bytes += res[2]
            self.worker_cpu_s += res[3]
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
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                sha, nbytes = fut.result()[:2]
                self.done[si] = {"file": fname, "rows": int(nrows), "sha256": sha, "bytes": nbytes}
        SH.write_progress(self.out, self.fp, self.done)


def _reuse(run: _Run, si: int, rows: int, fpath: Path, say) -> bool:
    """Shard `si` finished before (resume) and intact: keep it (recorded in order) -> True."""
    prev = run.done.get(si)
    if prev is not None and fpath.is_file():
        if sha256_file(fpath) == prev["sha256"]:
            run.flush()
            run.shard_info.append(prev)
            run.bar.update(rows)
            return True
        say(f"shard {fpath.name} fails its sha256 check (corrupt or partial), rebuilding it")
    return False


def _write_loop(plan: IngestPlan, run: _Run, bounds, dtype: str, pool: ThreadPoolExecutor, n_writers: int,
                say) -> None:
    """One process: read and check every shard not already done here, encode/write it in a thread."""
    for si, (a, b) in enumerate(bounds):
        fname = SH.SHARD_PATTERN.format(si)
        fpath = run.out / fname
        if _reuse(run, si, b - a, fpath, say):
            continue
        x, nbytes = _shard_values(plan.src, plan.rows[a:b], plan.gsel, plan.gene_ids, dtype)
        run.src_bytes += nbytes
        table = SH.shard_table(plan.meta.iloc[a:b], plan.dose[a:b], plan.tim[a:b], plan.smiles[a:b],
                               plan.cell_idx[a:b], plan.drug_idx[a:b], x, dtype)
        run.flush(keep=n_writers - 1)  # earlier shards' writes overlap with this shard's read
        run.written_now.append(fpath)
        run.pending.append((si, fname, b - a, pool.submit(SH.write_shard, table, fpath)))
    run.flush()


def _parallel_loop(plan: IngestPlan, run: _Run, bounds, dtype: str, pool: _Workers, window: int, say) -> None:
    """Worker processes / Ray tasks: each shard not already done is one task (read its rows from the GCTX, check,
    encode, write); at most `window` in flight; recorded in shard order, as the serial loop does."""
    for si, (a, b) in enumerate(bounds):
        fname = SH.SHARD_PATTERN.format(si)
        fpath = run.out / fname
        if _reuse(run, si, b - a, fpath, say):
            continue
        run.flush(keep=window - 1)
        run.written_now.append(fpath)
        run.pending.append((si, fname, b - a, pool.submit(_shard_task(plan, a, b, dtype, fpath))))
    run.flush()


def _write_shards(plan: IngestPlan, run: _Run, bounds, dtype: str, progress: bool, say, workers: int = 1,
                  backend: str = "process") -> int:
    """The shard loop with its failure policy: bad input removes this run's output; a crash (or a lost worker)
    keeps what finished. -> bytes of source matrix read."""
    from tqdm.auto import tqdm

    prior_done = set(run.done)
    if workers > 1:
        pool = _Workers(workers, backend)
        stop = pool.shutdown
    else:
        n_writers = max(2, min(8, os.cpu_count() or 2))
        pool = ThreadPoolExecutor(max_workers=n_writers)  # encode/write shards k-1, k while shard k+1 is read
        stop = lambda: pool.shutdown(wait=True)  # noqa: E731
    run.bar = tqdm(total=len(plan.rows), unit="sig", desc="lincs->parquet", disable=not progress, mininterval=1.0)
    try:
        if workers > 1:
            _parallel_loop(plan, run, bounds, dtype, pool, 2 * workers, say)
        else:
            _write_loop(plan, run, bounds, dtype, pool, n_writers, say)
        run.bar.close()
        return run.src_bytes
    except ScpertError:
        stop()
        for p in run.written_now:  # bad input: leave no partial output (shards of this run, progress file)
            p.unlink(missing_ok=True)
        if not prior_done:
            (run.out / SH.PROGRESS).unlink(missing_ok=True)
        raise
    except BrokenExecutor as e:  # a worker process died (killed, out of memory): a crash, resumable
        stop()
        run.record_finished_after_crash()
        raise OutputError(f"an ingest worker was lost ({type(e).__name__}: {e})", path=str(run.out),
                          field="workers", hint="the shards finished before it are kept: re-run the same command to "
                                                "resume; if it was killed for memory, use fewer --workers or a "
                                                "smaller --rows-per-shard") from None
    except BaseException:
        stop()  # a crash: record shards whose write finished, so a re-run resumes after them
        run.record_finished_after_crash()
        raise
    finally:
        stop()


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
        "row_group_rows": SH.row_group_rows(len(plan.gene_ids), dtype),
        "sources": [{"name": d["name"], "sha256": h.result(), "bytes": d["bytes"]}
                    for d, h in zip(sources, src_sha, strict=True)],
        "metadata": plan.description, "semi_synthetic": plan.semi, "layout": "fixed_size_list",
        "level": plan.level.level, "transform": plan.level.transform, "level_detection": plan.level.reason,
        "notes": plan.notes, "n_dropped": plan.n_dropped, "fingerprint": run.fp,
        "n_genes_measured": len(plan.gene_ids) - len(plan.genes_missing), "genes_missing": plan.genes_missing,
        "gene_mapping": plan.gene_report, "compounds_without_smiles": plan.no_smiles,
    }


def write_ingest(plan: IngestPlan, out_dir, *, rows_per_shard: int, dtype: str, all_genes: bool,
                 progress: bool = True, on_shard: ShardCallback | None = None, say=print, workers: int = 1,
                 backend: str = "process", stats: dict | None = None) -> dict:
    """Write the plan's shards + manifest into `out_dir` under an exclusive lock; resumable. -> the manifest.
    `workers` > 1: that many worker processes (or Ray tasks) read and write the shards; same shards and manifest.
    `stats` (a dict, optional) receives src_bytes, wall_s and worker_cpu_s (CPU seconds spent in the workers)."""
    _check_workers(workers, backend, plan)
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
        src_bytes = _write_shards(plan, run, bounds, dtype, progress, say, workers=workers, backend=backend)
        if stats is not None:
            stats.update(src_bytes=src_bytes, wall_s=time.perf_counter() - t0, worker_cpu_s=run.worker_cpu_s)
        for p in out.glob("shard-*.parquet"):  # stale shards from an earlier, larger run
            if p.name not in {s["file"] for s in run.shard_info}:
                p.unlink()
        manifest = _manifest(plan, run, sources, src_sha, dtype)
        SH.write_manifest(out, manifest)
        (out / SH.PROGRESS).unlink(missing_ok=True)
    if progress and src_bytes:
        say(f"wrote {n} signatures x {len(plan.gene_ids)} genes in {len(run.shard_info)} shard(s) to {out} "
            f"({src_bytes / (time.perf_counter() - t0) / 1e6:.0f} MB/s of source matrix"
            + (f", {workers} {'Ray tasks' if backend == 'ray' else 'worker processes'}" if workers > 1 else "")
            + f"); {plan.level.transform}")
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


def _check_workers(workers, backend: str, plan: IngestPlan | None = None) -> None:
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}", field="workers",
                          hint="1 (one process) or the number of worker processes, e.g. 4")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown ingest backend {backend!r}", field="backend", hint="use process or ray")
    if plan is not None and workers > 1 and plan.reopen is None:
        raise ConfigError(f"--workers {workers} needs a GCTX of level 4/5 signatures: {plan.serial_why}",
                          path=plan.src.name, field="workers",
                          hint="use --workers 1 for this input (or give the release's level-4/5 .gctx)")


def _ingest(src: MatrixSource, out_dir, *, rows_per_shard, dtype, progress, on_shard, all_genes, workers=1,
            backend="process", **plan_kw) -> dict:
    say = print if progress else (lambda *a, **k: None)
    try:
        _check_settings(dtype, rows_per_shard, plan_kw.get("level", "auto"), plan_kw.get("zscore", "plate"))
        _check_workers(workers, backend)
        plan = plan_ingest(src, all_genes=all_genes, say=say, **plan_kw)
        return write_ingest(plan, out_dir, rows_per_shard=rows_per_shard, dtype=dtype, all_genes=all_genes,
                            progress=progress, on_shard=on_shard, say=say, workers=int(workers), backend=backend)
    finally:
        src.close()


def ingest_gctx(path, out_dir, *, siginfo=None, inst_info=None, geneinfo=None, compounds=None,
                all_genes: bool = False, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, dtype: str = "float32",
                metadata=None, semi_synthetic: bool | None = None, level="auto", zscore: str = "plate",
                progress: bool = True, on_shard: ShardCallback | None = None, workers: int = 1,
                backend: str = "process") -> dict:
    """A LINCS matrix file (.gctx streamed with h5py; .gct / .gct.gz via cmapPy; the format is read from the first
    bytes) -> Parquet shards + manifest.json in `out_dir`.

    Metadata from `inst_info` (wells) or `siginfo` (sig_info / siginfo_beta), else the file's embedded column
    metadata; genes from `geneinfo`, the embedded row metadata, or the landmark table in `metadata`. The data level
    is detected (or given): 2 is refused, 3 z-scored per plate (`zscore`: plate | vehicle), 4/5 clipped to +-10.
    Keeps trt_cp + ctl_vehicle, 978 landmarks unless `all_genes`. Resumable; the manifest is written last.
    `on_shard(n_written, shard_index, n_shards)` is called after each shard is recorded. Returns the manifest.

    `workers` > 1 (a .gctx of level 4/5 or as is): each shard is one unit of work for `workers` worker processes
    (`backend="process"`, forkserver or spawn) or Ray tasks (`backend="ray"`, num_cpus=1 each, on the Ray cluster this process
    is connected to, else a local one; on several nodes the .gctx and `out_dir` must be on a shared file system at
    the same path). Every worker opens the .gctx itself and reads, checks, encodes and writes its own shards; the
    shards and manifest are identical to workers=1 (only `created` differs). A worker's error is raised as the same
    named error as with one process. A script calling this with workers > 1 needs `if __name__ == "__main__":`
    (the workers import the main module, as multiprocessing's forkserver/spawn do)."""
    return _ingest(open_source(path, metadata), out_dir, siginfo=siginfo, inst_info=inst_info, geneinfo=geneinfo,
                   compounds=compounds, all_genes=all_genes, rows_per_shard=rows_per_shard, dtype=dtype,
                   metadata=metadata, semi_synthetic=semi_synthetic, level=level, zscore=zscore, progress=progress,
                   on_shard=on_shard, workers=workers, backend=backend)


def ingest_table(path, out_dir, *, siginfo=None, geneinfo=None, compounds=None, all_genes: bool = False,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, dtype: str = "float32", metadata=None,
                 semi_synthetic: bool | None = None, level="asis", progress: bool = True,
                 on_shard: ShardCallback | None = None, workers: int = 1) -> dict:
    """A Parquet/CSV matrix (metadata columns + gene columns named by Entrez id) -> shards + manifest.

    Values are taken as given unless `level` says otherwise (model-ready tables, e.g. TranSiGen's expression
    pairs, are not plate z-scores). SMILES come from `compounds`, else from a canonical_smiles/smiles column.
    One process only (`workers` must be 1): a table is read whole into memory, so its rows cannot be split."""
    p = Path(path)
    _check_workers(workers, "process")
    if workers > 1:
        raise ConfigError(f"--workers {workers} needs a GCTX: a table is read whole into this process's memory, so "
                          "worker processes cannot read their own rows of it", path=str(p), field="workers",
                          hint="use --workers 1 with --table (or ingest the .gctx of the same data)")
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
