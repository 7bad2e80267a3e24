"""LINCS L1000 (GCTX / GCT 1.3 / Parquet-or-CSV tables) -> Parquet shards + manifest.json (see schema.py).

GCTX is read with h5py, never whole: ids and metadata from `0/META/{ROW,COL}`, the matrix `0/DATA/0/matrix` in
blocks of signatures. In LINCS GCTX the HDF5 matrix is (signatures x genes) (cmapPy shows its transpose); both
orientations are detected from the id lengths. GCT goes through cmapPy's parser (text files are small).

Public API: ingest_gctx, ingest_table, read_manifest, verify_shards, shard_paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema as S
from ..errors import (
    ConfigError,
    GeneMappingError,
    InputFileError,
    MetadataError,
    ScpertError,
    ShardError,
    ValueRangeError,
)
from ..paths import atomic_write_bytes, ensure_writable_dir, metadata_dir, sha256_file
from .doses import parse_dose_um, parse_time_h

DEFAULT_ROWS_PER_SHARD = 50_000
ROW_GROUP_ROWS = 2_048
PROGRESS = "_progress.json"
SHARD_PATTERN = "shard-{:05d}.parquet"
FAIL_ENV = "SCPERT_LINCS_FAIL_AFTER_SHARDS"
SEMI_FILE = "SEMI_SYNTHETIC.txt"
KEEP_TYPES = (S.TRT_CP, S.CTL_VEHICLE)
LANDMARK_TABLE = Path("lincs") / "l1000_landmark_genes.csv"
# embedded GCTX column metadata that normalize_sig_meta can use (GSE92742/GSE70138 and CMap 2020 beta names)
COL_META_USED = {"sig_id", "inst_id", "distil_id", "pert_id", "pert_iname", "cmap_name", "pert_type", "cell_id",
                 "cell_iname", "cell_mfc_name", "pert_idose", "pert_dose", "pert_dose_unit", "pert_itime",
                 "pert_time", "pert_time_unit", "scpert_semi_synthetic", "scpert_metadata"}


# ---------------------------------------------------------------------------------------------- small helpers
def _decode(a) -> np.ndarray:
    """HDF5 byte strings -> str (LINCS files hold latin-1 'µ'); numbers unchanged."""
    a = np.asarray(a)
    if a.dtype.kind in "SO":
        out = []
        for v in a.tolist():
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    v = v.decode("latin-1")
            out.append(v)
        return np.array(out, dtype=object)
    return a


def _read_table(path: str | os.PathLike, what: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{what} file not found", path=str(p), hint=f"pass an existing {what} file")
    try:
        name = p.name.lower()
        if name.endswith(".parquet"):
            return pd.read_parquet(p)
        sep = "," if (name.endswith(".csv") or name.endswith(".csv.gz")) else "\t"
        return pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, low_memory=False)
    except Exception as e:  # pandas/pyarrow parse errors
        raise InputFileError(f"cannot read {what} table ({type(e).__name__}: {e})", path=str(p),
                             hint="give a tab-separated (.txt/.tsv), .csv or .parquet table with a header") from None


def _entrez(v) -> str:
    s = str(v).strip()
    if s.endswith(".0") and s[:-2].isdigit():
        s = s[:-2]
    return s


def _first(cols, *names):
    for n in names:
        if n in cols:
            return n
    return None


# ---------------------------------------------------------------------------------------------- metadata
def normalize_sig_meta(df: pd.DataFrame, *, source: str, id_col_default: str | None = None) -> pd.DataFrame:
    """GSE92742/GSE70138 (sig_info/inst_info) or CMap 2020 beta (siginfo_beta/instinfo_beta) columns ->
    sig_id, pert_id, pert_iname, pert_type, cell_id, dose_raw, dose_unit, time_raw, time_unit (strings)."""
    cols = set(df.columns)
    idc = _first(cols, "sig_id", "inst_id", "distil_id", "cid", "id") or id_col_default
    beta = "cmap_name" in cols or "cell_iname" in cols or "pert_dose" in cols
    want = {
        "sig_id": idc,
        "pert_id": _first(cols, "pert_id"),
        "pert_iname": _first(cols, "cmap_name", "pert_iname"),
        "pert_type": _first(cols, "pert_type"),
        "cell_id": _first(cols, "cell_iname", "cell_id", "cell_mfc_name"),
    }
    if beta:
        want["dose_raw"] = _first(cols, "pert_dose", "pert_idose")
        want["time_raw"] = _first(cols, "pert_time", "pert_itime")
    else:
        want["dose_raw"] = _first(cols, "pert_idose", "pert_dose")
        want["time_raw"] = _first(cols, "pert_itime", "pert_time")
    missing = [k for k, v in want.items() if v is None]
    if missing:
        raise MetadataError(
            f"signature metadata lacks column(s) {missing}", path=source, field=",".join(missing),
            hint="give a GSE92742/GSE70138 sig_info/inst_info (sig_id, pert_id, pert_iname, pert_type, cell_id, "
                 "pert_idose, pert_itime) or a CMap 2020 siginfo_beta (sig_id, pert_id, cmap_name, pert_type, "
                 "cell_iname, pert_dose, pert_dose_unit, pert_time, pert_time_unit)")
    out = pd.DataFrame({k: df[v].to_numpy() for k, v in want.items()})
    for k in ("sig_id", "pert_id", "pert_iname", "pert_type", "cell_id"):
        out[k] = out[k].astype(str).str.strip()
    du = _first(cols, "pert_dose_unit") if want["dose_raw"] == "pert_dose" else None
    tu = _first(cols, "pert_time_unit") if want["time_raw"] == "pert_time" else None
    if beta and want["dose_raw"] == "pert_dose" and du is None:
        raise MetadataError("beta signature metadata has pert_dose but no pert_dose_unit", path=source,
                            field="pert_dose_unit", hint="add the pert_dose_unit column (e.g. 'uM')")
    out["dose_unit"] = df[du].to_numpy() if du else None
    out["time_unit"] = df[tu].to_numpy() if tu else None
    for extra in ("scpert_semi_synthetic", "scpert_metadata"):
        if extra in cols:
            out[extra] = df[extra].to_numpy()
    out.attrs["style"] = "CMap2020-beta" if beta else "GSE92742/GSE70138"
    return out


def _num_or_str(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _doses_times(meta: pd.DataFrame, source: str) -> tuple[np.ndarray, np.ndarray]:
    dose = np.full(len(meta), np.nan, dtype=np.float32)
    tim = np.full(len(meta), np.nan, dtype=np.float32)
    cache: dict = {}
    is_trt = (meta["pert_type"] == S.TRT_CP).to_numpy()
    for i, (d, du, t, tu) in enumerate(zip(meta["dose_raw"], meta["dose_unit"], meta["time_raw"],
                                           meta["time_unit"], strict=True)):
        try:
            if is_trt[i]:
                du_ = None if du is None or (isinstance(du, float) and np.isnan(du)) else du
                key = ("d", d if not isinstance(d, np.ndarray) else str(d), du_)
                if key not in cache:
                    cache[key] = parse_dose_um(_num_or_str(d) if du_ is not None else d, du_)
                dose[i] = cache[key]
            tu_ = None if tu is None or (isinstance(tu, float) and np.isnan(tu)) else tu
            key = ("t", t, tu_)
            if key not in cache:
                cache[key] = parse_time_h(_num_or_str(t) if tu_ is not None else t, tu_)
            tim[i] = cache[key]
        except MetadataError as e:
            raise MetadataError(f"{e.args[0].splitlines()[0]} (signature {meta['sig_id'].iat[i]!r})", path=source,
                                field=e.field, hint=e.hint) from None
    return dose, tim


@dataclass
class _Genes:
    ids: list[str]  # Entrez ids in matrix order
    symbols: list[str]
    landmark: np.ndarray | None  # bool per gene, None when unknown


@dataclass
class _Source:
    """A matrix (signatures x genes, streamed in blocks) with aligned metadata."""
    name: str
    sig_ids: np.ndarray
    meta: pd.DataFrame  # normalized, aligned with matrix rows
    genes: _Genes
    read_block: Callable[[int, int], np.ndarray]  # rows [start, stop) -> float array (n, n_genes_all)
    files: list[Path] = field(default_factory=list)
    meta_desc: str = ""
    close: Callable[[], None] = lambda: None


def _gene_table(path) -> tuple[dict[str, str], set[str] | None, list[str]]:
    """gene_info (pr_gene_id, pr_gene_symbol, pr_is_lm) or geneinfo_beta (gene_id, gene_symbol, feature_space)
    -> ({id: symbol}, landmark ids or None, ids in table order)."""
    df = _read_table(path, "gene info")
    cols = set(df.columns)
    idc = _first(cols, "pr_gene_id", "gene_id")
    sym = _first(cols, "pr_gene_symbol", "gene_symbol")
    if idc is None or sym is None:
        raise MetadataError("gene info lacks the gene id / symbol columns", path=str(path),
                            field="pr_gene_id/pr_gene_symbol or gene_id/gene_symbol",
                            hint="give GSE92742 gene_info or CMap 2020 geneinfo_beta")
    ids = [_entrez(v) for v in df[idc]]
    syms = dict(zip(ids, df[sym].astype(str), strict=True))
    lm = None
    if "pr_is_lm" in cols:
        lm = {i for i, v in zip(ids, df["pr_is_lm"], strict=True) if str(v).strip() in ("1", "1.0", "True", "true")}
    elif "feature_space" in cols:
        lm = {i for i, v in zip(ids, df["feature_space"], strict=True) if str(v).strip() == "landmark"}
    return syms, lm, ids


def _landmark_panel(meta_dir: Path | None) -> tuple[list[str], list[str]] | None:
    if meta_dir is None:
        return None
    p = meta_dir / LANDMARK_TABLE
    if not p.is_file():
        return None
    df = pd.read_csv(p, dtype=str)
    if "position" in df.columns:
        df = df.sort_values("position", key=lambda s: s.astype(int))
    return [_entrez(v) for v in df["gene_id"]], df["gene_symbol"].astype(str).tolist()


def _select_genes(genes: _Genes, *, all_genes: bool, geneinfo, meta_dir: Path | None, source: str
                  ) -> tuple[np.ndarray, list[str], list[str], str]:
    """-> (column indices into the matrix, gene ids, symbols, description of the panel used)."""
    ids = genes.ids
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise GeneMappingError(f"gene id {dup!r} occurs twice in the matrix", path=source, field="gene id",
                               hint="each matrix row/column must be a distinct gene")
    pos = {g: i for i, g in enumerate(ids)}
    symbols = list(genes.symbols)
    landmark = None if genes.landmark is None else {g for g, f in zip(ids, genes.landmark, strict=True) if f}
    desc = "embedded gene metadata"
    if geneinfo is not None:
        syms, lm, _ = _gene_table(geneinfo)
        symbols = [syms.get(g, s) for g, s in zip(ids, symbols, strict=True)]
        if lm is not None:
            landmark, desc = lm, f"gene info {Path(geneinfo).name}"
    panel = _landmark_panel(meta_dir)
    if all_genes:
        sel = np.arange(len(ids))
        return sel, list(ids), [symbols[i] for i in sel], "all genes in the file"
    if landmark is None:
        if panel is None:
            raise GeneMappingError(
                "no landmark gene information: the matrix has no is_lm/pr_is_lm gene metadata", path=source,
                field="pr_is_lm", hint="pass --geneinfo (gene_info with pr_is_lm), --metadata (a folder with "
                                       f"{LANDMARK_TABLE.as_posix()}), or --all-genes")
        landmark, desc = set(panel[0]), f"landmark table {LANDMARK_TABLE.as_posix()}"
    missing = [g for g in landmark if g not in pos]
    if missing:
        raise GeneMappingError(
            f"{len(missing)} of {len(landmark)} landmark genes are not in the matrix (e.g. {sorted(missing)[:5]})",
            path=source, field="gene id", hint="the matrix's genes (Entrez ids) must cover the landmark panel; "
                                               "check the gene id column, or use --all-genes")
    if panel is not None and set(panel[0]) == landmark:
        order = panel[0]  # the public landmark order (position column)
        psym = dict(zip(panel[0], panel[1], strict=True))
        return (np.array([pos[g] for g in order]), order, [psym[g] for g in order], desc + " (landmark order)")
    sel = np.array(sorted(pos[g] for g in landmark))
    return sel, [ids[i] for i in sel], [symbols[i] for i in sel], desc


# ---------------------------------------------------------------------------------------------- sources
def _gctx_source(path: Path) -> _Source:
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise InputFileError(f"not a readable GCTX/HDF5 file ({type(e).__name__}: {e})", path=str(path),
                             hint="the file is truncated or not a GCTX; download it again") from None
    try:
        for k in ("0/DATA/0/matrix", "0/META/ROW/id", "0/META/COL/id"):
            if k not in f:
                raise InputFileError(f"GCTX lacks the dataset {k}", path=str(path), field=k,
                                     hint="a GCTX holds 0/DATA/0/matrix and ids under 0/META/ROW and 0/META/COL")
        mat = f["0/DATA/0/matrix"]
        rid = _decode(f["0/META/ROW/id"][:])
        cid = _decode(f["0/META/COL/id"][:])
        if mat.ndim != 2:
            raise InputFileError("GCTX matrix is not 2-D", path=str(path), field="0/DATA/0/matrix")
        # cmapPy's view: rows = genes (rid), columns = samples (cid). The HDF5 matrix of LINCS is (cid x rid).
        if mat.shape == (len(cid), len(rid)):
            transposed = False
        elif mat.shape == (len(rid), len(cid)):
            transposed = True
        else:
            raise InputFileError(f"GCTX matrix shape {mat.shape} matches neither ({len(cid)} x {len(rid)}) nor its "
                                 "transpose", path=str(path), field="0/DATA/0/matrix",
                                 hint="the file is corrupt; download it again")

        def meta_df(grp: str, n: int, keep: set[str] | None = None) -> pd.DataFrame:
            d = {}
            for k, ds in f[grp].items():
                if keep is not None and k not in keep:
                    continue  # a 720k-signature file carries ~30 columns; decode only the ones used
                if isinstance(ds, h5py.Dataset) and ds.shape == (n,):
                    d[k] = _decode(ds[:])
            return pd.DataFrame(d)

        col = meta_df("0/META/COL", len(cid), COL_META_USED)
        row = meta_df("0/META/ROW", len(rid))
    except ScpertError:
        f.close()
        raise
    except Exception as e:
        f.close()
        raise InputFileError(f"corrupt GCTX ({type(e).__name__}: {e})", path=str(path),
                             hint="the file is truncated or damaged; download it again") from None

    genes = _row_genes(row, rid)

    def read_block(start: int, stop: int) -> np.ndarray:
        try:
            if transposed:
                return np.asarray(mat[:, start:stop]).T
            return np.asarray(mat[start:stop])
        except Exception as e:
            raise InputFileError(f"cannot read GCTX matrix rows {start}:{stop} ({type(e).__name__}: {e})",
                                 path=str(path), hint="the file is truncated or damaged; download it again") from None

    return _Source(name=str(path), sig_ids=cid.astype(str), meta=col, genes=genes, read_block=read_block,
                   files=[path], meta_desc="embedded GCTX column metadata", close=f.close)


def _row_genes(row: pd.DataFrame, rid: np.ndarray) -> _Genes:
    cols = set(row.columns)
    idc = _first(cols, "pr_gene_id", "gene_id")
    ids = [_entrez(v) for v in (row[idc] if idc else rid)]
    symc = _first(cols, "pr_gene_symbol", "gene_symbol")
    syms = row[symc].astype(str).tolist() if symc else [""] * len(ids)
    lmc = _first(cols, "pr_is_lm", "is_lm")
    lm = None
    if lmc:
        lm = np.array([str(v).strip() in ("1", "1.0", "True", "true") for v in row[lmc]])
    elif "feature_space" in cols:
        lm = (row["feature_space"].astype(str) == "landmark").to_numpy()
    return _Genes(ids, syms, lm)


def _check_gct_header(path: Path) -> None:
    with open(path, encoding="utf-8", errors="replace") as fh:
        l1 = fh.readline().strip()
        l2 = fh.readline().strip().split("\t")
    if l1 not in ("#1.3", "#1.2"):
        raise InputFileError(f"GCT first line is {l1[:40]!r}, expected '#1.3' (or '#1.2')", path=str(path),
                             field="version line", hint="the file is not a GCT; check the format")
    want = 4 if l1 == "#1.3" else 2
    if len(l2) < want or not all(x.strip().isdigit() for x in l2[:want]):
        raise InputFileError(f"GCT dimensions line {chr(9).join(l2)[:60]!r} is not {want} integers", path=str(path),
                             field="dimensions line", hint="line 2 of a GCT 1.3 is: rows, columns, row-meta "
                                                          "columns, column-meta columns (tab-separated)")


def _gct_source(path: Path) -> _Source:
    _check_gct_header(path)
    try:
        from cmapPy.pandasGEXpress.parse import parse

        g = parse(str(path))
    except Exception as e:
        raise InputFileError(f"cmapPy cannot parse the GCT ({type(e).__name__}: {e})", path=str(path),
                             hint="the dimensions line must match the table; check the file") from None
    data = g.data_df  # genes x samples
    mat = np.ascontiguousarray(data.to_numpy(dtype=np.float32).T)
    col = g.col_metadata_df.reindex(data.columns).reset_index(drop=True)
    row = g.row_metadata_df.reindex(data.index).reset_index(drop=True)
    genes = _row_genes(row, np.asarray(data.index.astype(str)))
    return _Source(name=str(path), sig_ids=np.asarray(data.columns.astype(str)), meta=col, genes=genes,
                   read_block=lambda a, b: mat[a:b], files=[path], meta_desc="embedded GCT column metadata")


# ---------------------------------------------------------------------------------------------- compounds
def _read_compounds(path) -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise InputFileError("compound table not found", path=str(p), hint="pass an existing --compounds file")
    df = _read_table(p, "compound")
    cols = set(df.columns)
    if "pert_id" not in cols:
        first = str(df.columns[0])
        if first.startswith("BRD-") or len(df.columns) == 2:  # headerless (pert_id, smiles)
            sep = "," if p.name.lower().endswith((".csv", ".csv.gz")) else "\t"
            df = pd.read_csv(p, sep=sep, header=None, dtype=str, keep_default_na=False).iloc[:, :2]
            df.columns = ["pert_id", "smiles"]
            cols = set(df.columns)
        else:
            raise MetadataError("compound table lacks pert_id", path=str(p), field="pert_id",
                                hint="columns: pert_id + canonical_smiles (or smiles)")
    sc = _first(cols, "canonical_smiles", "smiles", "SMILES")
    if sc is None:
        raise MetadataError("compound table lacks a SMILES column", path=str(p), field="canonical_smiles",
                            hint="columns: pert_id + canonical_smiles (or smiles)")
    out = {}
    for k, v in zip(df["pert_id"].astype(str).str.strip(), df[sc], strict=True):
        if isinstance(v, str) and v.strip() and v.strip() not in ("-666", "nan", "None") and k not in out:
            out[k] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------- writing
def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _expr_array(x: np.ndarray, dtype: str):
    import pyarrow as pa

    n, g = x.shape
    flat = pa.array(x.reshape(-1), type=pa.float16() if dtype == "float16" else pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, g)


def _parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # dictionary encoding only for strings (trying it on float lists costs ~40% of the write time);
    # byte-stream-split makes float z-scores compress better under zstd
    strings = [f.name for f in table.schema if str(f.type) == "string"]
    enc = {f"{S.EXPR}.list.element": "BYTE_STREAM_SPLIT"} if S.EXPR in table.column_names else None
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", compression_level=1, row_group_size=ROW_GROUP_ROWS,
                   use_dictionary=strings, column_encoding=enc)
    return buf.getvalue().to_pybytes()


def _write_shard(table, path: Path) -> tuple[str, int]:
    """Serialise, checksum and write one shard atomically (temp + fsync + rename) -> (sha256, bytes)."""
    data = _parquet_bytes(table)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest(), len(data)


def _ingest(src: _Source, out_dir, *, siginfo, geneinfo, compounds, all_genes, rows_per_shard, dtype,
            metadata, semi_synthetic, fail_after_shards, progress, extra_smiles=None) -> dict:
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"unsupported expr dtype {dtype!r}", field="dtype", hint="use float32 or float16")
    if rows_per_shard < 1:
        raise ConfigError("rows_per_shard must be >= 1", field="rows_per_shard", hint="e.g. 50000")
    say = print if progress else (lambda *a, **k: None)
    meta_dir = metadata_dir(metadata)
    # ---- signature metadata, aligned with the matrix rows
    sig_ids = src.sig_ids
    if len(set(sig_ids.tolist())) != len(sig_ids):
        dup = pd.Series(sig_ids)[pd.Series(sig_ids).duplicated()].iloc[0]
        raise MetadataError(f"duplicate signature id {dup!r} in the matrix", path=src.name, field="sig_id",
                            hint="every signature/column id must be unique; de-duplicate the file")
    if siginfo is not None:
        raw = _read_table(siginfo, "signature info")
        meta = normalize_sig_meta(raw, source=str(siginfo))
        if meta["sig_id"].duplicated().any():
            dup = meta["sig_id"][meta["sig_id"].duplicated()].iloc[0]
            raise MetadataError(f"duplicate signature id {dup!r} in the signature table", path=str(siginfo),
                                field="sig_id", hint="each sig_id must occur once")
        meta = meta.set_index("sig_id", drop=False)
        absent = sig_ids[~pd.Index(sig_ids).isin(meta.index)].tolist()
        if absent:
            raise MetadataError(f"{len(absent)} matrix signatures are not in the signature table (e.g. {absent[:3]})",
                                path=str(siginfo), field="sig_id",
                                hint="give the sig_info/inst_info table that belongs to this matrix")
        meta = meta.loc[list(sig_ids)].reset_index(drop=True)
        meta_desc = f"{meta.attrs.get('style', '')} table {Path(siginfo).name}".strip()
        files = [*src.files, Path(siginfo)]
    else:
        m = src.meta.copy()
        m["sig_id"] = sig_ids
        meta = normalize_sig_meta(m, source=src.name + " (embedded column metadata)")
        meta_desc = src.meta_desc
        files = list(src.files)
    if geneinfo is not None:
        files.append(Path(geneinfo))
    # ---- genes
    gsel, gene_ids, gene_syms, gene_desc = _select_genes(src.genes, all_genes=all_genes, geneinfo=geneinfo,
                                                         meta_dir=meta_dir, source=src.name)
    # ---- keep compounds + vehicles
    keep_mask = meta["pert_type"].isin(KEEP_TYPES).to_numpy()
    dropped = meta.loc[~keep_mask, "pert_type"].value_counts()
    if len(dropped):
        say(f"dropped {int((~keep_mask).sum())} signatures that are not trt_cp/ctl_vehicle: "
            + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    keep = np.flatnonzero(keep_mask)
    if len(keep) == 0:
        raise MetadataError("no trt_cp or ctl_vehicle signatures in the input", path=src.name, field="pert_type",
                            hint="the input must contain compound (trt_cp) or vehicle (ctl_vehicle) signatures")
    km = meta.iloc[keep].reset_index(drop=True)
    dose, tim = _doses_times(km, src.name)
    smiles_map = _read_compounds(compounds) if compounds is not None else dict(extra_smiles or {})
    if compounds is not None:
        files.append(Path(compounds))
    smiles = [smiles_map.get(p) if t == S.TRT_CP else None for p, t in zip(km["pert_id"], km["pert_type"], strict=True)]
    # ---- global vocabularies
    cells = sorted(set(km["cell_id"]))
    drug_tab = km.drop_duplicates("pert_id")[["pert_id", "pert_iname"]].sort_values("pert_id")
    drugs = drug_tab["pert_id"].tolist()
    drug_names = drug_tab["pert_iname"].tolist()
    cell_idx = pd.Index(cells).get_indexer(km["cell_id"]).astype(np.int32)
    drug_idx = pd.Index(drugs).get_indexer(km["pert_id"]).astype(np.int32)
    # ---- semi-synthetic flag + metadata description
    if semi_synthetic is not None:  # an explicit flag wins over detection
        semi = bool(semi_synthetic)
    else:
        semi = any((f.parent / SEMI_FILE).is_file() for f in files)
        if "scpert_semi_synthetic" in meta.columns:
            semi = semi or any(str(v).strip() in ("1", "1.0", "True", "true") for v in meta["scpert_semi_synthetic"])
    if "scpert_metadata" in meta.columns:
        vals = [str(v) for v in pd.unique(meta["scpert_metadata"]) if str(v).strip()]
        if vals:
            meta_desc = f"{meta_desc}; {vals[0]}"
    # ---- output folder, sources, resume plan
    out = ensure_writable_dir(out_dir)
    # the sources' sha256 (a full pass over a 35 GB file) runs in a thread beside the ingest; the resume
    # fingerprint uses name + size + mtime so it is known up front
    from concurrent.futures import ThreadPoolExecutor

    hasher = ThreadPoolExecutor(max_workers=1)
    src_sha = [hasher.submit(sha256_file, f) for f in files]
    hasher.shutdown(wait=False)
    sources = [{"name": f.name, "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    n = len(keep)
    bounds = [(a, min(a + rows_per_shard, n)) for a in range(0, n, rows_per_shard)]
    fp = _fingerprint({"sources": sources, "all_genes": all_genes, "rows_per_shard": rows_per_shard,
                       "dtype": dtype, "genes": gene_ids, "semi": semi, "schema": S.SCHEMA_VERSION})
    man_path = out / S.MANIFEST
    prog_path = out / PROGRESS
    done: dict[int, dict] = {}
    if man_path.is_file():
        try:
            old = json.loads(man_path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fp:
            try:
                verify_shards(out)
                say(f"{out}: already complete ({old['n_rows']} rows), nothing to do")
                return old
            except ShardError as e:
                say(f"existing output fails verification, rebuilding what is bad: {e.args[0].splitlines()[0]}")
                done = dict(enumerate(old["shards"]))
        man_path.unlink()  # a stale manifest must not describe shards being rewritten
    if not done and prog_path.is_file():
        try:
            prog = json.loads(prog_path.read_text())
            if prog.get("fingerprint") == fp:
                done = {int(k): v for k, v in prog.get("shards", {}).items()}
        except (OSError, ValueError):
            done = {}
    fail_after = fail_after_shards
    if fail_after is None and os.environ.get(FAIL_ENV):
        fail_after = int(os.environ[FAIL_ENV])
    prior_done = set(done)
    written_now: list[Path] = []
    shard_info: list[dict] = []
    t0 = time.perf_counter()
    src_bytes = 0
    n_writers = max(2, min(8, os.cpu_count() or 2))
    pool = ThreadPoolExecutor(max_workers=n_writers)  # encode/write shards k-1, k while shard k+1 is read
    pending: list = []
    n_new = 0

    def flush(keep: int = 0) -> None:
        nonlocal n_new
        while len(pending) > keep:
            _record(*pending.pop(0))

    def _record(si_, fname_, nrows_, fut) -> None:
        nonlocal n_new
        sha, nbytes = fut.result()
        info = {"file": fname_, "rows": int(nrows_), "sha256": sha, "bytes": nbytes}
        shard_info.append(info)
        done[si_] = info
        atomic_write_bytes(prog_path, json.dumps({"fingerprint": fp, "shards": done}).encode())
        bar.update(nrows_)
        n_new += 1
        if fail_after is not None and n_new >= fail_after and si_ + 1 < len(bounds):
            raise RuntimeError(f"injected failure after {n_new} shard(s) ({FAIL_ENV})")

    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="sig", desc="lincs->parquet", disable=not progress, mininterval=1.0)
        for si, (a, b) in enumerate(bounds):
            fname = SHARD_PATTERN.format(si)
            fpath = out / fname
            prev = done.get(si)
            if prev is not None and fpath.is_file():
                if sha256_file(fpath) == prev["sha256"]:
                    flush()
                    shard_info.append(prev)
                    bar.update(b - a)
                    continue
                say(f"shard {fname} fails its sha256 check (corrupt or partial), rebuilding it")
            rows = keep[a:b]
            x, nbytes = _read_rows(src, rows, gsel)
            src_bytes += nbytes
            bad = ~np.isfinite(x)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise ValueRangeError(
                    f"{int(bad.sum())} NaN/Inf values in the matrix (first: signature {src.sig_ids[rows[r]]!r}, "
                    f"gene {gene_ids[c]!r})", path=src.name, field="matrix",
                    hint="remove or impute non-finite values before ingesting")
            if dtype == "float16":
                x16 = x.astype(np.float16)
                if not np.isfinite(x16).all():
                    raise ValueRangeError("values overflow float16", path=src.name, field="matrix",
                                          hint="use --dtype float32")
                x = x16
            table = _shard_table(km.iloc[a:b], dose[a:b], tim[a:b], smiles[a:b], cell_idx[a:b], drug_idx[a:b],
                                 x, dtype)
            flush(keep=n_writers - 1)  # earlier shards' writes overlap with this shard's read
            written_now.append(fpath)
            pending.append((si, fname, b - a, pool.submit(_write_shard, table, fpath)))
        flush()
        bar.close()
    except ScpertError:
        pool.shutdown(wait=True)
        # bad input: leave no partial output (shards of this run, progress file)
        for p in written_now:
            p.unlink(missing_ok=True)
        if not prior_done:
            prog_path.unlink(missing_ok=True)
        raise
    except BaseException:
        # a crash: record shards whose write finished, so a re-run resumes after them
        pool.shutdown(wait=True)
        for si_, fname_, nrows_, fut in pending:
            if fut.exception() is None:
                sha, nbytes = fut.result()
                done[si_] = {"file": fname_, "rows": int(nrows_), "sha256": sha, "bytes": nbytes}
        atomic_write_bytes(prog_path, json.dumps({"fingerprint": fp, "shards": done}).encode())
        raise
    finally:
        pool.shutdown(wait=True)
        src.close()
    # stale shards from an earlier, larger run
    for p in out.glob("shard-*.parquet"):
        if p.name not in {s["file"] for s in shard_info}:
            p.unlink()
    elapsed = time.perf_counter() - t0
    manifest = {
        "schema_version": S.SCHEMA_VERSION,
        "kind": "lincs",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "genes": gene_ids,
        "gene_symbols": gene_syms,
        "n_genes": len(gene_ids),
        "cells": cells,
        "drugs": drugs,
        "drug_names": drug_names,
        "shards": shard_info,
        "n_rows": int(n),
        "expr_dtype": dtype,
        "sources": [{"name": d["name"], "sha256": h.result(), "bytes": d["bytes"]}
                    for d, h in zip(sources, src_sha, strict=True)],
        "metadata": f"{meta_desc}; genes: {gene_desc}",
        "semi_synthetic": semi,
        "layout": "fixed_size_list",
        "n_dropped": int((~keep_mask).sum()),
        "fingerprint": fp,
    }
    atomic_write_bytes(man_path, json.dumps(manifest, indent=1).encode())
    prog_path.unlink(missing_ok=True)
    if progress and src_bytes:
        say(f"wrote {n} signatures x {len(gene_ids)} genes in {len(shard_info)} shard(s) to {out} "
            f"({src_bytes / elapsed / 1e6:.0f} MB/s of source matrix)")
    return manifest


def _read_rows(src: _Source, rows: np.ndarray, gsel: np.ndarray, block: int = 8192) -> tuple[np.ndarray, int]:
    """Matrix rows `rows` (sorted) restricted to genes `gsel`, read in contiguous slabs of at most `block` rows."""
    parts = []
    nbytes = 0
    i = 0
    while i < len(rows):
        lo = rows[i]
        j = np.searchsorted(rows, lo + block, side="left")
        hi = rows[j - 1] + 1
        slab = src.read_block(int(lo), int(hi))
        nbytes += slab.nbytes
        sub = slab if hi - lo == j - i else slab[rows[i:j] - lo]
        if not (len(gsel) == sub.shape[1] and (gsel == np.arange(len(gsel))).all()):
            sub = sub[:, gsel]
        parts.append(np.asarray(sub, dtype=np.float32))
        i = j
    return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)), nbytes


def _shard_table(m: pd.DataFrame, dose, tim, smiles, cidx, didx, x, dtype):
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
        S.EXPR: _expr_array(x, dtype),
    }
    return pa.table(cols)


# ---------------------------------------------------------------------------------------------- public API
def ingest_gctx(path, out_dir, *, siginfo=None, geneinfo=None, compounds=None, all_genes: bool = False,
                rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, dtype: str = "float32", metadata=None,
                semi_synthetic: bool | None = None, fail_after_shards: int | None = None,
                progress: bool = True) -> dict:
    """A LINCS .gctx (streamed with h5py) or .gct (cmapPy) -> Parquet shards + manifest.json in `out_dir`.

    Metadata from `siginfo` (sig_info/inst_info/siginfo_beta) or the file's embedded column metadata; genes from
    `geneinfo` (gene_info/geneinfo_beta), the embedded row metadata, or the landmark table in `metadata`.
    Keeps trt_cp + ctl_vehicle, 978 landmarks unless `all_genes`. Resumable; the manifest is written last.
    `fail_after_shards` (or $SCPERT_LINCS_FAIL_AFTER_SHARDS) raises after that many shards (crash tests).
    Returns the manifest."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError("input matrix not found", path=str(p), hint="pass an existing .gctx or .gct file")
    name = p.name.lower()
    if name.endswith(".gctx") or name.endswith(".h5"):
        src = _gctx_source(p)
    elif name.endswith(".gct"):
        src = _gct_source(p)
    else:
        raise InputFileError("unknown matrix format (expected .gctx or .gct)", path=str(p),
                             hint="use --table for Parquet/CSV matrices")
    return _ingest(src, out_dir, siginfo=siginfo, geneinfo=geneinfo, compounds=compounds, all_genes=all_genes,
                   rows_per_shard=rows_per_shard, dtype=dtype, metadata=metadata, semi_synthetic=semi_synthetic,
                   fail_after_shards=fail_after_shards, progress=progress)


def _table_source(path: Path) -> _Source:
    df = _read_table(path, "expression")
    gene_cols = [c for c in df.columns if str(c).strip().isdigit()]
    if not gene_cols:
        raise GeneMappingError("no gene columns (columns named by Entrez id) in the table", path=str(path),
                               field="columns", hint="name the expression columns by Entrez gene id, e.g. '5720'")
    other = [c for c in df.columns if c not in set(gene_cols)]
    meta = df[other].copy()
    try:
        mat = np.ascontiguousarray(df[gene_cols].to_numpy(dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise ValueRangeError(f"non-numeric values in gene columns ({e})", path=str(path), field="gene columns",
                              hint="gene columns must hold numbers") from None
    cols = set(meta.columns)
    # signature ids
    idc = _first(cols, "sig_id", "signature", "sig", "inst_id")
    if idc is not None:
        sig = meta[idc].astype(str)
        if sig.duplicated().any() and "profile" in cols:  # e.g. TranSiGen control/treated pairs share a key
            sig = sig + ":" + meta["profile"].astype(str)
    else:
        sig = pd.Series([f"{path.stem}:{i}" for i in range(len(meta))])
    meta["sig_id"] = sig.to_numpy()
    if "cell_id" not in cols:
        raise MetadataError("table lacks cell_id", path=str(path), field="cell_id", hint="add a cell_id column")
    if "pert_type" not in cols:
        if "profile" in cols:  # TranSiGen: x1_control (basal) / x2_treated
            meta["pert_type"] = np.where(meta["profile"].astype(str).str.contains("control"), S.CTL_VEHICLE, S.TRT_CP)
        elif not ({"pert_id", "pert_iname", "canonical_smiles", "smiles"} & cols):
            meta["pert_type"] = S.CTL_VEHICLE  # basal profiles: no perturbagen at all
        else:
            raise MetadataError("table lacks pert_type", path=str(path), field="pert_type",
                                hint="add pert_type (trt_cp / ctl_vehicle)")
    veh = meta["pert_type"].astype(str) == S.CTL_VEHICLE
    smc = _first(cols, "canonical_smiles", "smiles")
    if "pert_id" not in cols:
        if "pert_iname" in cols:
            meta["pert_id"] = meta["pert_iname"].astype(str)
        elif smc is not None:
            from .drugs import inchikey_block

            keys = {s: inchikey_block(s) for s in pd.unique(meta[smc].astype(str))}
            meta["pert_id"] = [f"IK-{keys[s]}" for s in meta[smc].astype(str)]
        else:
            meta["pert_id"] = "DMSO"
        meta.loc[veh, "pert_id"] = "DMSO"
    if "pert_iname" not in cols:
        meta["pert_iname"] = meta["pert_id"]
        meta.loc[veh, "pert_iname"] = "DMSO"
    if not ({"pert_idose", "pert_dose"} & cols):
        meta["pert_idose"] = "-666"
    if not ({"pert_itime", "pert_time"} & cols):
        meta["pert_itime"] = "-666"
    src = _Source(name=str(path), sig_ids=np.asarray(meta["sig_id"].astype(str)), meta=meta,
                  genes=_Genes([_entrez(c) for c in gene_cols], [""] * len(gene_cols), None),
                  read_block=lambda a, b: mat[a:b], files=[path], meta_desc=f"table columns of {path.name}")
    src.meta.attrs["smiles_col"] = smc
    return src


def ingest_table(path, out_dir, *, siginfo=None, geneinfo=None, compounds=None, all_genes: bool = False,
                 rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, dtype: str = "float32", metadata=None,
                 semi_synthetic: bool | None = None, fail_after_shards: int | None = None,
                 progress: bool = True) -> dict:
    """A Parquet/CSV matrix (metadata columns + gene columns named by Entrez id) -> shards + manifest.

    Landmark selection needs `geneinfo` or the landmark table in `metadata` (else pass all_genes=True).
    SMILES come from `compounds`, else from a canonical_smiles/smiles column of the table."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError("input table not found", path=str(p), hint="pass an existing .parquet or .csv file")
    src = _table_source(p)
    smc = src.meta.attrs.get("smiles_col")
    if compounds is None and smc is not None:
        # the table carries its own SMILES: write them as a (pert_id, smiles) side table in memory
        table_smiles = dict(zip(src.meta["pert_id"].astype(str), src.meta[smc].astype(str), strict=True))
    else:
        table_smiles = None
    man = _ingest(src, out_dir, siginfo=siginfo, geneinfo=geneinfo, compounds=compounds, all_genes=all_genes,
                  rows_per_shard=rows_per_shard, dtype=dtype, metadata=metadata, semi_synthetic=semi_synthetic,
                  fail_after_shards=fail_after_shards, progress=progress, extra_smiles=table_smiles)
    return man


def read_manifest(out_dir) -> dict:
    """The manifest.json of a shard folder; ShardError when absent or unreadable."""
    p = Path(out_dir) / S.MANIFEST
    if not p.is_file():
        raise ShardError("no manifest.json: the folder is not a finished shard folder", path=str(p),
                         hint="run `scpert data lincs` (again) to finish the ingest")
    try:
        man = json.loads(p.read_text())
    except ValueError as e:
        raise ShardError(f"manifest.json is not valid JSON ({e})", path=str(p), hint="re-run the ingest") from None
    for k in ("schema_version", "genes", "cells", "drugs", "shards", "n_rows", "expr_dtype"):
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
