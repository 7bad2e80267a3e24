"""LINCS L1000 files -> signatures (a matrix) with canonical metadata.

Sources: GCTX (HDF5, read with h5py in row blocks), GCT 1.2/1.3 and .gct.gz (cmapPy), Parquet/CSV tables. The
format is recognised from the first bytes (HDF5 / gzip / Parquet magic, '#1.3' / '#1.2'), not only the extension.

Metadata: embedded column metadata, or a separate inst_info / sig_info / siginfo_beta table joined on
inst_id / distil_id / sig_id; field names of every public release are accepted (see ALIASES). A file with no
perturbation metadata whose ids follow the LINCS signature id convention (`CPC005_A375_6H:BRD-A85280935-003-01-7:10`)
gets cell, time, compound and dose from the ids.

Data level (detected from the values, then the file name and ids, or given):
  2  unnormalised GEX (bead intensities, tens to ~1e4): refused, with what to give instead;
  3  QNORM/INF log2 expression (~0-16): robust z-scores per plate (median, MAD*1.4826, MAD >= 0.1; cmapPy's
     robust_zscore) against the plate population or the plate's vehicle wells, clipped to +-10, then replicate plates
     (`<brew>_X1`, `_X2`, ... at the same well and compound) collapsed by MODZ (cmapPy's agg_wt_avg);
  4/5  ZSPC / MODZ z-scores: clipped to +-10 as LINCS does.

Public API: read_l1000 -> L1000Table; open_source, source_metadata, apply_level (used by the ingest).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ... import schema as S
from ...errors import (
    ConfigError,
    GeneMappingError,
    InputFileError,
    MetadataError,
    ScpertError,
    ValueRangeError,
)
from ...paths import metadata_dir
from ..drugs import inchikey_block
from .doses import parse_dose_um, parse_time_h
from .genes import FileGenes, is_probe_space, landmark_probes, row_genes
from .h5ad_l1000 import h5ad_source, is_anndata
from .source import MatrixSource, gene_columns
from .tables import decode, entrez, first, read_table

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
CLIP = 10.0
MIN_MAD = 0.1
LEVEL_SAMPLE_ROWS = 2048
# canonical field -> column names across releases, first match wins (GSE92742/GSE70138, CMap 2020 beta, CMap plates)
ALIASES = {
    "pert_id": ("pert_id",),
    "pert_iname": ("cmap_name", "pert_iname", "pert_desc"),
    "pert_type": ("pert_type",),
    "cell_id": ("cell_iname", "cell_id", "cell_mfc_name"),
    "plate": ("rna_plate", "det_plate"),
    "well": ("rna_well", "det_well"),
}
# dose / time: (value column, unit column or None); strings like '10 uM' need no unit column
DOSE_COLS = (("pert_dose", "pert_dose_unit"), ("pert_idose", None), ("exp_pert_dose", "exp_pert_dose_unit"))
TIME_COLS = (("pert_time", "pert_time_unit"), ("pert_itime", None), ("exp_pert_time", "exp_pert_time_unit"))
ID_COLS = ("sig_id", "inst_id", "distil_id", "cid", "id")
SMILES_COLS = ("canonical_smiles", "SMILES", "smiles", "x_smiles")
"""column metadata that carries each profile's SMILES (an .h5ad's obs, CMap plates' x_smiles)."""
# embedded GCTX column metadata worth decoding (a 720k-signature file carries ~30 columns)
COL_META_USED = ({c for v in ALIASES.values() for c in v} | {c for pair in DOSE_COLS + TIME_COLS for c in pair if c}
                 | set(ID_COLS) | {"scpert_semi_synthetic", "scpert_metadata"} | set(SMILES_COLS))
SIGID_RE = re.compile(r"^(?P<brew>[^:]+?)_(?P<cell>[^_:]+)_(?P<time>\d+)H(?:_[^:]*)?:"
                      r"(?P<pert>BRD-[A-Z]\d{8})[^:]*:(?P<dose>\d+(?:\.\d+)?)$")
WELL_RE = re.compile(r"^[A-P]\d{2}$")
REPLICATE_RE = re.compile(r"^(?P<brew>.+?)_X\d+(?:_.*)?$")


# ---------------------------------------------------------------------------------------------- sources
def sniff_format(path: Path) -> str:
    """'gctx' | 'h5ad' | 'gct' | 'gct.gz' | 'parquet' | 'text' from the first bytes (an HDF5 file with AnnData's
    X/obs/var is 'h5ad'); the extension only where the bytes say
    nothing (delimited text). InputFileError for an empty file or one that matches no known format."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise InputFileError("the file is empty", path=str(path), hint="download it again")
    if head.startswith(HDF5_MAGIC):
        return "h5ad" if is_anndata(path) else "gctx"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.open(path, "rb") as fh:
                first_line = fh.readline(64)
        except Exception as e:  # OSError / EOFError / zlib.error of a damaged stream
            raise InputFileError(f"corrupt gzip file ({type(e).__name__}: {e})", path=str(path),
                                 hint="the file is truncated or damaged; download it again") from None
        if first_line.strip() in (b"#1.3", b"#1.2"):
            return "gct.gz"
        if path.name.lower().endswith((".csv.gz", ".tsv.gz", ".txt.gz")):
            return "text"
        raise InputFileError(f"gzip file whose content starts with {first_line[:20]!r}, not a GCT header",
                             path=str(path), hint="give a .gct.gz (first line '#1.3'), .gctx, .gct or a table")
    if head.startswith((b"#1.3", b"#1.2")):
        return "gct"
    name = path.name.lower()
    if name.endswith((".gctx", ".h5", ".hdf5")):
        raise InputFileError(f"not an HDF5/GCTX file: it starts with {head!r}", path=str(path), field="file type",
                             hint="the file is truncated, damaged or not a GCTX; download it again")
    if name.endswith((".gct", ".gct.gz")):
        return "gct"  # the GCT reader names the bad header line
    if name.endswith(".parquet"):
        raise InputFileError(f"not a Parquet file: it starts with {head!r}", path=str(path), field="file type",
                             hint="the file is truncated or not Parquet")
    if name.endswith((".csv", ".tsv", ".txt")):
        return "text"
    raise InputFileError(f"unknown matrix format (starts with {head!r})", path=str(path), field="file type",
                         hint="give a .gctx, .gct, .gct.gz, .parquet or .csv/.tsv matrix")


def _gctx_meta(f, grp: str, n: int, keep: set[str] | None) -> pd.DataFrame:
    import h5py

    d = {}
    for k, ds in f[grp].items():
        if keep is not None and k not in keep:
            continue
        if isinstance(ds, h5py.Dataset) and ds.shape == (n,):
            d[k] = decode(ds[:])
    return pd.DataFrame(d)


def _gctx_open(path: Path):
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise InputFileError(f"not a readable GCTX/HDF5 file ({type(e).__name__}: {e})", path=str(path),
                             hint="the file is truncated or not a GCTX; download it again") from None
    for k in ("0/DATA/0/matrix", "0/META/ROW/id", "0/META/COL/id"):
        try:
            present = k in f
        except Exception as e:  # h5py RuntimeError/KeyError on a damaged heap or B-tree
            f.close()
            raise InputFileError(f"corrupt GCTX: cannot look up {k} ({type(e).__name__}: {e})", path=str(path),
                                 field=k, hint="the file is truncated or damaged; download it again") from None
        if not present:
            f.close()
            raise InputFileError(f"GCTX lacks the dataset {k}", path=str(path), field=k,
                                 hint="a GCTX holds 0/DATA/0/matrix and ids under 0/META/ROW and 0/META/COL")
    return f


def _check_sizes(f, path: Path) -> None:
    """Refuse a damaged header that claims far more data than the file can hold (reading it would exhaust memory):
    id arrays (read whole) above 256x the file size, matrix chunks above 1 GiB."""
    limit = max(256 * path.stat().st_size, 64 << 20)
    for k in ("0/META/ROW/id", "0/META/COL/id"):
        ds = f[k]
        if ds.ndim != 1 or ds.size * ds.dtype.itemsize > limit:
            raise InputFileError(f"GCTX {k} claims shape {ds.shape} of {ds.dtype}: more than the file holds",
                                 path=str(path), field=k, hint="the file is damaged; download it again")
    mat = f["0/DATA/0/matrix"]
    if mat.chunks is not None and int(np.prod(mat.chunks, dtype=np.float64)) * mat.dtype.itemsize > (1 << 30):
        raise InputFileError(f"GCTX matrix chunks {mat.chunks} exceed 1 GiB", path=str(path), field="0/DATA/0/matrix",
                             hint="the file is damaged, or rewrite it with smaller chunks")


def gctx_source(path: Path, meta_dir: Path | None = None) -> MatrixSource:
    """GCTX via h5py; the matrix stays on disk. LINCS stores (signatures x genes); cmapPy's view is the transpose.
    Both orientations are detected from the id lengths. Rows that are no gene are left out (genes.row_genes);
    Affymetrix probe ids are mapped through the landmark table of `meta_dir` and the file's pr_gene_id."""
    f = _gctx_open(path)
    try:
        _check_sizes(f, path)
        mat = f["0/DATA/0/matrix"]
        rid = decode(f["0/META/ROW/id"][:]).astype(str)
        cid = decode(f["0/META/COL/id"][:]).astype(str)
        if mat.ndim != 2:
            raise InputFileError("GCTX matrix is not 2-D", path=str(path), field="0/DATA/0/matrix")
        if mat.shape == (len(cid), len(rid)):
            transposed = False
        elif mat.shape == (len(rid), len(cid)):
            transposed = True
        else:
            raise InputFileError(f"GCTX matrix shape {mat.shape} matches neither ({len(cid)} x {len(rid)}) nor its "
                                 "transpose", path=str(path), field="0/DATA/0/matrix",
                                 hint="the file is corrupt; download it again")
        col = _gctx_meta(f, "0/META/COL", len(cid), COL_META_USED)
        row = _gctx_meta(f, "0/META/ROW", len(rid), None)
    except ScpertError:
        f.close()
        raise
    except Exception as e:
        f.close()
        raise InputFileError(f"corrupt GCTX ({type(e).__name__}: {e})", path=str(path),
                             hint="the file is truncated or damaged; download it again") from None

    try:
        genes = _file_genes(row, rid, meta_dir, path)
    except ScpertError:
        f.close()
        raise
    return MatrixSource(name=str(path), sig_ids=cid, meta=col, genes=genes,
                        read_block=gene_columns(gctx_block_reader(mat, transposed, str(path)), genes), files=[path],
                        meta_desc="embedded GCTX column metadata", close=f.close)


def _file_genes(row: pd.DataFrame, rid, meta_dir: Path | None, path: Path) -> FileGenes:
    probes = landmark_probes(meta_dir) if is_probe_space(rid) else None
    return row_genes(row, rid, probes, str(path))


def gctx_block_reader(mat, transposed: bool, name: str) -> Callable[[int, int], np.ndarray]:
    """read_block(start, stop) -> signatures start:stop of an h5py GCTX matrix as rows (signatures x genes), for
    either storage orientation; a failed read is an InputFileError naming the file."""

    def read_block(start: int, stop: int) -> np.ndarray:
        try:
            return np.asarray(mat[:, start:stop]).T if transposed else np.asarray(mat[start:stop])
        except Exception as e:
            raise InputFileError(f"cannot read GCTX matrix rows {start}:{stop} ({type(e).__name__}: {e})",
                                 path=name, hint="the file is truncated or damaged; download it again") from None

    return read_block


def _check_gct_header(path: Path, opener=open) -> None:
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            l1 = fh.readline().strip()
            l2 = fh.readline().strip().split("\t")
    except Exception as e:  # OSError / EOFError / zlib.error of a damaged stream
        raise InputFileError(f"cannot read the GCT header ({type(e).__name__}: {e})", path=str(path),
                             hint="the file is truncated or damaged; download it again") from None
    if l1 not in ("#1.3", "#1.2"):
        raise InputFileError(f"GCT first line is {l1[:40]!r}, expected '#1.3' (or '#1.2')", path=str(path),
                             field="version line", hint="the file is not a GCT; check the format")
    want = 4 if l1 == "#1.3" else 2
    if len(l2) < want or not all(x.strip().isdigit() for x in l2[:want]):
        raise InputFileError(f"GCT dimensions line {chr(9).join(l2)[:60]!r} is not {want} integers", path=str(path),
                             field="dimensions line", hint="line 2 of a GCT 1.3 is: rows, columns, row-meta "
                                                          "columns, column-meta columns (tab-separated)")


def _cmappy_parse(path: Path):
    """cmapPy's GCT parser with its pandas FutureWarnings kept off the console."""
    from cmapPy.pandasGEXpress.parse_gct import parse

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return parse(str(path))


def gct_source(path: Path, gz: bool = False, meta_dir: Path | None = None) -> MatrixSource:
    """GCT 1.2/1.3 (or its gzip) through cmapPy's parser (text files are small)."""
    _check_gct_header(path, gzip.open if gz else open)
    try:
        if gz or not path.name.lower().endswith(".gct"):
            # cmapPy (pandas) would infer compression from the name: give it a plain .gct
            with tempfile.TemporaryDirectory() as tmp:
                plain = Path(tmp) / "matrix.gct"
                with (gzip.open if gz else open)(path, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                g = _cmappy_parse(plain)
        else:
            g = _cmappy_parse(path)
        data = g.data_df  # genes x samples
        mat = np.ascontiguousarray(data.to_numpy(dtype=np.float32).T)
    except Exception as e:  # cmapPy raises bare Exception/AssertionError; gzip raises EOFError/BadGzipFile
        raise InputFileError(f"cannot parse the GCT ({type(e).__name__}: {str(e)[:200]})", path=str(path),
                             hint="the dimensions line must match the table; the file may be truncated") from None
    _check_unique(np.asarray(data.columns.astype(str)), str(path), "signature")
    if data.index.duplicated().any():
        raise GeneMappingError(f"row id {data.index[data.index.duplicated()][0]!r} occurs twice in the GCT",
                               path=str(path), field="id", hint="each GCT row must be a distinct gene")
    try:
        col = g.col_metadata_df.reindex(data.columns).reset_index(drop=True)
        row = g.row_metadata_df.reindex(data.index).reset_index(drop=True)
    except ValueError as e:  # metadata ids that do not match the data ids
        raise InputFileError(f"GCT metadata does not match its data ({e})", path=str(path),
                             hint="the file is damaged; download it again") from None
    genes = _file_genes(row, [str(v) for v in data.index], meta_dir, path)
    if genes.columns is not None:
        mat = np.ascontiguousarray(mat[:, genes.columns])
    return MatrixSource(name=str(path), sig_ids=np.asarray(data.columns.astype(str)), meta=col, genes=genes,
                        read_block=lambda a, b: mat[a:b], files=[path], meta_desc="embedded GCT column metadata")


def _table_pert_fields(meta: pd.DataFrame, cols: set[str], path: Path) -> None:
    """Fill pert_type / pert_id / pert_iname / dose / time of a model-ready table where they are implied."""
    if "pert_type" not in cols:
        if "profile" in cols:  # TranSiGen: x1_control (basal) / x2_treated
            meta["pert_type"] = np.where(meta["profile"].astype(str).str.contains("control"), S.CTL_VEHICLE, S.TRT_CP)
        elif not ({"pert_id", "pert_iname", "canonical_smiles", "smiles"} & cols):
            meta["pert_type"] = S.CTL_VEHICLE  # basal profiles: no perturbagen at all
        else:
            raise MetadataError("table lacks pert_type", path=str(path), field="pert_type",
                                hint="add pert_type (trt_cp / ctl_vehicle)")
    veh = meta["pert_type"].astype(str) == S.CTL_VEHICLE
    smc = first(cols, "canonical_smiles", "smiles")
    if "pert_id" not in cols:
        if "pert_iname" in cols:
            meta["pert_id"] = meta["pert_iname"].astype(str)
        elif smc is not None:
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
    meta.attrs["smiles_col"] = smc


def table_source(path: Path) -> MatrixSource:
    """A Parquet/CSV matrix: metadata columns + gene columns named by Entrez id."""
    df = read_table(path, "expression")
    gene_cols = [c for c in df.columns if str(c).strip().isdigit()]
    if not gene_cols:
        raise GeneMappingError("no gene columns (columns named by Entrez id) in the table", path=str(path),
                               field="columns", hint="name the expression columns by Entrez gene id, e.g. '5720'")
    meta = df[[c for c in df.columns if c not in set(gene_cols)]].copy()
    try:
        mat = np.ascontiguousarray(df[gene_cols].to_numpy(dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise ValueRangeError(f"non-numeric values in gene columns ({e})", path=str(path), field="gene columns",
                              hint="gene columns must hold numbers") from None
    cols = set(meta.columns)
    idc = first(cols, "sig_id", "signature", "sig", "inst_id")
    if idc is not None:
        sig = meta[idc].astype(str)
        if sig.duplicated().any() and "profile" in cols:  # e.g. TranSiGen control/treated pairs share a key
            sig = sig + ":" + meta["profile"].astype(str)
    else:
        sig = pd.Series([f"{path.stem}:{i}" for i in range(len(meta))])
    meta["sig_id"] = sig.to_numpy()
    if "cell_id" not in cols:
        raise MetadataError("table lacks cell_id", path=str(path), field="cell_id", hint="add a cell_id column")
    _table_pert_fields(meta, cols, path)
    return MatrixSource(name=str(path), sig_ids=np.asarray(meta["sig_id"].astype(str)), meta=meta,
                        genes=FileGenes([entrez(c) for c in gene_cols], [""] * len(gene_cols), None),
                        read_block=lambda a, b: mat[a:b], files=[path], meta_desc=f"table columns of {path.name}")


def open_source(path, metadata=None) -> MatrixSource:
    """Any L1000 matrix file, recognised by its first bytes (GCTX, AnnData .h5ad, GCT, .gct.gz, table).
    `metadata`: the public metadata folder (default $SCPERT_METADATA), whose landmark table maps gene symbols
    (.h5ad) and Affymetrix probe ids to Entrez ids."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError("input matrix not found", path=str(p), hint="pass an existing .gctx, .gct or table")
    kind = sniff_format(p)
    if kind == "gctx":
        return gctx_source(p, metadata_dir(metadata))
    if kind == "h5ad":
        return h5ad_source(p, metadata_dir(metadata))
    if kind in ("gct", "gct.gz"):
        return gct_source(p, gz=kind == "gct.gz", meta_dir=metadata_dir(metadata))
    return table_source(p)


# ---------------------------------------------------------------------------------------------- metadata
def _pick_dose_time(cols: set[str], beta: bool) -> tuple[tuple[str | None, str | None], tuple[str | None, str | None]]:
    order = (0, 1, 2) if beta else (1, 0, 2)
    out = []
    for pairs in (DOSE_COLS, TIME_COLS):
        pick = (None, None)
        for i in order:
            v, u = pairs[i]
            if v in cols:
                pick = (v, u)
                break
        out.append(pick)
    return out[0], out[1]


def normalize_sig_meta(df: pd.DataFrame, *, source: str, id_col_default: str | None = None,
                       strict: bool = True) -> pd.DataFrame:
    """Column metadata of any release -> sig_id, pert_id, pert_iname, pert_type (lower case), cell_id, dose_raw,
    dose_unit, time_raw, time_unit, plate, well. `strict`: a missing field raises MetadataError naming it;
    otherwise it is left empty and listed in `.attrs['missing']`."""
    cols = set(df.columns)
    beta = "cmap_name" in cols or "cell_iname" in cols or "pert_dose" in cols
    want = {"sig_id": first(cols, *ID_COLS) or id_col_default}
    want.update({k: first(cols, *ALIASES[k]) for k in ("pert_id", "pert_iname", "pert_type", "cell_id")})
    (dv, du), (tv, tu) = _pick_dose_time(cols, beta)
    want["dose_raw"], want["time_raw"] = dv, tv
    missing = [k for k, v in want.items() if v is None]
    if missing and strict:
        raise MetadataError(
            f"signature metadata lacks column(s) {missing}", path=source, field=",".join(missing),
            hint="give a GSE92742/GSE70138 sig_info/inst_info (sig_id, pert_id, pert_iname, pert_type, cell_id, "
                 "pert_idose, pert_itime) or a CMap 2020 siginfo_beta (sig_id, pert_id, cmap_name, pert_type, "
                 "cell_iname, pert_dose, pert_dose_unit, pert_time, pert_time_unit)")
    n = len(df)
    out = pd.DataFrame({k: (df[v].to_numpy() if v is not None else np.full(n, "", dtype=object))
                        for k, v in want.items()})
    for k in ("sig_id", "pert_id", "pert_iname", "pert_type", "cell_id"):
        out[k] = out[k].astype(str).str.strip().replace({"nan": "", "None": ""})
    out["pert_type"] = out["pert_type"].str.lower()
    for k in ("dose_raw", "time_raw"):
        if out[k].dtype == np.float32:  # HDF5 float32 11.1 -> '11.1', not 11.100000381
            out[k] = out[k].astype(str)
    for v, u, key in ((dv, du, "dose_unit"), (tv, tu, "time_unit")):
        if v is not None and u is not None and u not in cols:
            raise MetadataError(f"metadata has {v} but no {u}", path=source, field=u,
                                hint=f"add the {u} column (e.g. 'uM' / 'h')")
        out[key] = df[u].to_numpy() if (v is not None and u is not None) else None
    for extra in ("scpert_semi_synthetic", "scpert_metadata"):
        if extra in cols:
            out[extra] = df[extra].to_numpy()
    _plate_well(out, df, cols)
    out.attrs["style"] = "CMap2020-beta" if beta else "GSE92742/GSE70138"
    out.attrs["missing"] = missing
    return out


def _plate_well(out: pd.DataFrame, df: pd.DataFrame, cols: set[str]) -> None:
    ids = out["sig_id"].astype(str)
    pc, wc = first(cols, *ALIASES["plate"]), first(cols, *ALIASES["well"])
    out["plate"] = (df[pc].astype(str).to_numpy() if pc else
                    np.array([s.rsplit(":", 1)[0] if ":" in s else "" for s in ids], dtype=object))
    tail = [s.rsplit(":", 1)[1] if ":" in s else "" for s in ids]
    out["well"] = df[wc].astype(str).to_numpy() if wc else np.array(
        [t if WELL_RE.match(t) else "" for t in tail], dtype=object)


def meta_from_sig_ids(sig_ids: np.ndarray) -> pd.DataFrame | None:
    """GSE92742-style signature ids (`<plate>_<cell>_<time>H:<BRD id>:<dose uM>`) -> column metadata, or None
    when any id does not follow the convention."""
    rows = []
    for s in sig_ids:
        m = SIGID_RE.match(str(s))
        if m is None:
            return None
        rows.append({"pert_id": m["pert"], "pert_iname": m["pert"], "pert_type": S.TRT_CP, "cell_id": m["cell"],
                     "pert_idose": f"{m['dose']} uM", "pert_itime": f"{m['time']} h"})
    return pd.DataFrame(rows) if rows else None


def _check_unique(ids: np.ndarray, source: str, what: str) -> None:
    s = pd.Series(ids)
    if s.duplicated().any():
        raise MetadataError(f"duplicate {what} id {s[s.duplicated()].iloc[0]!r} in the matrix", path=source,
                            field="sig_id", hint="every signature/column id must be unique; de-duplicate the file")


def join_table(sig_ids: np.ndarray, path, what: str) -> tuple[pd.DataFrame, str, list[str]]:
    """Rows of an inst_info / sig_info table aligned with the matrix ids -> (rows, key column, notes).
    The key is whichever of sig_id/inst_id/distil_id matches the most ids. Matrix profiles absent from the table
    raise MetadataError with their count; table rows absent from the matrix are counted in the notes."""
    raw = read_table(path, what)
    keys = [c for c in ID_COLS if c in raw.columns]
    if not keys:
        raise MetadataError(f"the {what} table has no id column", path=str(path), field="/".join(ID_COLS[:3]),
                            hint="inst_info joins on inst_id or distil_id, sig_info on sig_id")
    ids = pd.Index(sig_ids.astype(str))
    key = max(keys, key=lambda c: int(ids.isin(raw[c].astype(str).str.strip()).sum()))
    tab_ids = raw[key].astype(str).str.strip()
    if tab_ids.duplicated().any():
        raise MetadataError(f"duplicate signature id {tab_ids[tab_ids.duplicated()].iloc[0]!r} in the {what} table",
                            path=str(path), field=key, hint=f"each {key} must occur once")
    absent = ids[~ids.isin(tab_ids)]
    if len(absent):
        raise MetadataError(f"{len(absent)} of {len(ids)} matrix profiles are not in the {what} table (joined on "
                            f"{key}; e.g. {absent[:3].tolist()})", path=str(path), field=key,
                            hint=f"give the {what} table that belongs to this matrix")
    extra = int((~tab_ids.isin(ids)).sum())
    notes = [f"{what} {Path(path).name}: joined {len(ids)} profiles on {key}"
             + (f"; {extra} table rows have no profile in the matrix (not used)" if extra else "")]
    rows = raw.set_index(tab_ids).loc[ids.tolist()].reset_index(drop=True)
    return rows, key, notes


@dataclass
class SourceMeta:
    """Normalised metadata aligned with the matrix rows, where it came from, and the files it used."""

    meta: pd.DataFrame
    desc: str
    files: list[Path]
    notes: list[str] = field(default_factory=list)


def source_metadata(src: MatrixSource, *, siginfo=None, inst_info=None, strict: bool = True) -> SourceMeta:
    """The matrix's metadata: a joined inst_info / sig_info table, else the embedded column metadata, else the
    LINCS signature-id convention. `strict=False` leaves absent fields empty instead of raising."""
    _check_unique(src.sig_ids, src.name, "signature")
    if siginfo is not None and inst_info is not None:
        raise ConfigError("give either --inst-info or --siginfo, not both", field="--inst-info/--siginfo",
                          hint="inst_info describes wells (levels 3/4), sig_info signatures (level 5)")
    table, what = (inst_info, "inst_info") if inst_info is not None else (siginfo, "signature info")
    if table is not None:
        rows, key, notes = join_table(src.sig_ids, table, what)
        rows = rows.drop(columns=[c for c in ("sig_id",) if c in rows.columns])
        rows.insert(0, "sig_id", src.sig_ids)
        meta = normalize_sig_meta(rows, source=str(table), strict=strict)
        desc = f"{meta.attrs.get('style', '')} {what} table {Path(table).name}".strip()
        return SourceMeta(meta, desc, [*src.files, Path(table)], notes)
    m = src.meta.copy()
    desc = src.meta_desc
    if "pert_type" not in m.columns:
        parsed = meta_from_sig_ids(src.sig_ids)
        if parsed is not None:
            m = pd.concat([m.reset_index(drop=True), parsed.drop(columns=[c for c in parsed if c in m])], axis=1)
            desc = "metadata parsed from the LINCS signature ids (<plate>_<cell>_<time>H:<pert_id>:<dose>)"
    m["sig_id"] = src.sig_ids
    try:
        meta = normalize_sig_meta(m, source=src.name + f" ({desc})", strict=strict)
    except MetadataError as e:
        raise MetadataError(e.args[0].splitlines()[0], path=e.path, field=e.field,
                            hint="pass the file's metadata table: --inst-info (wells: inst_info, joined on inst_id/"
                                 "distil_id) or --siginfo (signatures: sig_info / siginfo_beta); " + (e.hint or "")
                            ) from None
    return SourceMeta(meta, desc, list(src.files))


def doses_times(meta: pd.DataFrame, source: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """dose (uM, trt_cp rows only; NaN otherwise) and time (h) per row; MetadataError naming the signature."""
    dose = np.full(len(meta), np.nan, dtype=dtype)
    tim = np.full(len(meta), np.nan, dtype=dtype)
    cache: dict = {}
    is_trt = (meta["pert_type"] == S.TRT_CP).to_numpy()

    def unit(u):
        return None if u is None or (isinstance(u, float) and np.isnan(u)) else u

    def num_or_str(v):
        if isinstance(v, np.floating):
            v = str(v)  # float32 10.1 -> '10.1', not 10.100000381
        try:
            return float(v)
        except (TypeError, ValueError):
            return v

    for i, (d, du, t, tu) in enumerate(zip(meta["dose_raw"], meta["dose_unit"], meta["time_raw"],
                                           meta["time_unit"], strict=True)):
        try:
            if is_trt[i]:
                du_ = unit(du)
                key = ("d", str(d), du_)
                if key not in cache:
                    cache[key] = parse_dose_um(num_or_str(d) if du_ is not None else d, du_)
                dose[i] = cache[key]
            tu_ = unit(tu)
            key = ("t", str(t), tu_)
            if key not in cache:
                cache[key] = parse_time_h(num_or_str(t) if tu_ is not None else t, tu_)
            tim[i] = cache[key]
        except MetadataError as e:
            raise MetadataError(f"{e.args[0].splitlines()[0]} (signature {meta['sig_id'].iat[i]!r})", path=source,
                                field=e.field, hint=e.hint) from None
    return dose, tim


# ---------------------------------------------------------------------------------------------- data level
@dataclass
class LevelInfo:
    level: int | None
    """2..5, or None for a table taken as given."""
    transform: str
    reason: str


_NAME_LEVELS = ((5, re.compile(r"modz|level_?5|consensus", re.I)),
                (4, re.compile(r"zspc|(^|[_.-])zs([_.-]|$)|zscore|level_?4", re.I)),
                (2, re.compile(r"(^|[_.-])gex([_.-]|$)|level_?2", re.I)),
                (3, re.compile(r"qnorm|level_?3|(^|[_.-])inf([_.-]|$)", re.I)))


def level_from_name(name: str) -> int | None:
    for lvl, rx in _NAME_LEVELS:
        if rx.search(name):
            return lvl
    return None


def detect_level(sample: np.ndarray, name: str, sig_ids: np.ndarray) -> tuple[int, str]:
    """(level, why) from a block of values, the file name and the ids."""
    fin = sample[np.isfinite(sample)]
    if fin.size == 0:
        raise ValueRangeError("no finite values in the matrix", path=name, field="matrix",
                              hint="the file holds only NaN/Inf; download it again")
    lo, hi, med = float(fin.min()), float(fin.max()), float(np.median(fin))
    by_name = level_from_name(Path(name).name)
    rng = f"values {lo:.3g}..{hi:.3g}, median {med:.3g}"
    if lo >= 0 and (hi > 100 or med > 30):
        return 2, f"{rng}: unnormalised bead intensities"
    if lo >= 0:
        return 3, f"{rng}: log2 expression" + (f" (file name suggests level {by_name})" if by_name not in (3, None)
                                               else "")
    if by_name in (4, 5):
        return by_name, f"{rng}: z-scores; file name says level {by_name}"
    wells = np.mean([bool(WELL_RE.match(str(s).rsplit(":", 1)[-1])) for s in sig_ids[:500]]) > 0.5
    return (4, f"{rng}: z-scores of single wells (ids end in a well)") if wells else \
        (5, f"{rng}: z-scores of signatures (ids are not wells)")


def parse_level(level) -> int | str:
    """'auto' | 'asis' | 2..5 (int or str); ConfigError otherwise."""
    if level in ("auto", "asis"):
        return level
    try:
        lv = int(level)
    except (TypeError, ValueError):
        lv = None
    if lv not in (2, 3, 4, 5):
        raise ConfigError(f"unknown data level {level!r}", field="level", hint="use auto, 3, 4 or 5")
    return lv


def _finite_or_raise(x: np.ndarray, src: MatrixSource, rows: np.ndarray | None = None, gene_ids=None) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        sid = src.sig_ids[r if rows is None else rows[r]]
        gid = (gene_ids or src.genes.ids)[c]
        raise ValueRangeError(f"{int(bad.sum())} NaN/Inf values in the matrix (first: signature {sid!r}, "
                              f"gene {gid!r})", path=src.name, field="matrix",
                              hint="remove or impute non-finite values before ingesting")


def plate_zscores(x: np.ndarray, meta: pd.DataFrame, mode: str, source: str) -> np.ndarray:
    """Robust z-scores per plate and gene (cmapPy robust_zscore: median, MAD*1.4826, MAD >= 0.1) against the plate
    population ('plate') or the plate's ctl_vehicle wells ('vehicle')."""
    from cmapPy.math.robust_zscore import robust_zscore

    if mode not in ("plate", "vehicle"):
        raise ConfigError(f"unknown z-score reference {mode!r}", field="zscore", hint="use plate or vehicle")
    out = np.empty_like(x, dtype=np.float32)
    plates = meta["plate"].astype(str).to_numpy()
    veh = (meta["pert_type"] == S.CTL_VEHICLE).to_numpy()
    for p in pd.unique(plates):
        idx = np.flatnonzero(plates == p)
        mat = pd.DataFrame(x[idx].T.astype(np.float64))
        ctrl = None
        if mode == "vehicle":
            v = veh[idx]
            if not v.any():
                raise MetadataError(f"plate {p!r} has no ctl_vehicle wells to z-score against", path=source,
                                    field="pert_type", hint="use --zscore plate (the plate population)")
            ctrl = mat.loc[:, v]
        out[idx] = robust_zscore(mat, ctrl_mat=ctrl, min_mad=MIN_MAD).to_numpy(np.float32).T
    return out


def collapse_replicates(z: np.ndarray, meta: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame, int]:
    """Wells of replicate plates (`<brew>_X<k>...`, same well, same compound) -> one MODZ signature each (cmapPy
    agg_wt_avg, Spearman weights). -> (values, metadata, number of groups with >1 replicate). No replicates:
    unchanged."""
    from cmapPy.math.agg_wt_avg import agg_wt_avg

    brew = [m["brew"] if (m := REPLICATE_RE.match(str(p))) else "" for p in meta["plate"]]
    key = pd.Series([f"{b}:{w}" if b and w else "" for b, w in zip(brew, meta["well"], strict=True)])
    key = key.where(key == "", key + "|" + meta["pert_id"].astype(str))
    groups = pd.Series(range(len(key))).groupby(key.to_numpy(), sort=False).apply(list)
    multi = [g for k, g in groups.items() if k and len(g) > 1]
    if not multi:
        m = meta.copy()
        m["n_replicates"] = 1
        return z, m, 0
    order: list[list[int]] = []
    for k, g in groups.items():
        order.extend([g] if (k and len(g) > 1) else [[i] for i in g])
    order.sort(key=lambda m: m[0])  # output in the order of each signature's first well
    vals = []
    for mem in order:
        if len(mem) == 1:
            vals.append(z[mem[0]])
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sig = agg_wt_avg(pd.DataFrame(z[mem].T.astype(np.float64)))[0]
        vals.append(np.asarray(sig, dtype=np.float32))
    rows = meta.iloc[[m[0] for m in order]].reset_index(drop=True).copy()
    rows["n_replicates"] = [len(m) for m in order]
    for j, m in enumerate(order):
        if len(m) > 1:
            b = brew[m[0]]
            rows.loc[j, "sig_id"] = f"{b}:{meta['well'].iat[m[0]]}"
            rows.loc[j, "plate"] = b
    return np.vstack(vals).astype(np.float32), rows, len(multi)


def _clipping_reader(read_block: Callable[[int, int], np.ndarray]) -> Callable[[int, int], np.ndarray]:
    limit = CLIP * (1 + 1e-6)  # beyond +-10 by more than float32 rounding (published files hold 10.000001)

    def read(a: int, b: int) -> np.ndarray:
        x = np.asarray(read_block(a, b), dtype=np.float32)
        if x.size == 0 or not (x.max() > limit or x.min() < -limit):  # NaN compares False: left for the check
            return x
        x = np.array(x)  # never write into a source held in memory
        with np.errstate(invalid="ignore"):
            over = np.isfinite(x) & (np.abs(x) > limit)  # NaN/Inf stay visible to the finiteness check
        x[over] = np.sign(x[over]) * CLIP
        return x
    return read


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _level3_fits_in_memory(src: MatrixSource, n: int) -> None:
    """Level 3 is z-scored one replicate set at a time (its values, z-scores and signatures: ~3 copies); refuse a
    set that cannot fit rather than be killed by the OOM killer."""
    need = 3 * n * len(src.genes.ids) * 4
    avail = _available_memory()
    if need > avail:
        raise InputFileError(
            f"a level-3 replicate set of {n} profiles x {len(src.genes.ids)} genes needs ~{need / 2**30:.1f} GiB to "
            f"z-score in memory; {avail / 2**30:.1f} GiB are available", path=src.name, field="data level",
            hint="give the plate of every profile (rna_plate / det_plate, or ids '<plate>:<well>'; with none the "
                 "file is one plate), or the level-4 (ZSPC) / level-5 (MODZ) file of the same release")


def apply_level(src: MatrixSource, meta: pd.DataFrame, *, level="auto", zscore: str = "plate",
                replicates: str = "collapse") -> tuple[MatrixSource, pd.DataFrame, LevelInfo]:
    """Turn the source into signatures by its data level -> (source of signatures, their metadata, LevelInfo).
    `replicates` (level 3): 'collapse' replicate plates by MODZ, or 'keep' one signature per well."""
    lv = parse_level(level)
    if replicates not in ("collapse", "keep"):
        raise ConfigError(f"unknown replicate handling {replicates!r}", field="replicates", hint="collapse or keep")
    if zscore not in ("plate", "vehicle"):
        raise ConfigError(f"unknown z-score reference {zscore!r}", field="zscore", hint="use plate or vehicle")
    if lv == "asis":
        return src, meta, LevelInfo(None, "none (values taken as given)", "table taken as given")
    n = len(src.sig_ids)
    if lv == "auto":
        lv, why = detect_level(np.asarray(src.read_block(0, min(n, LEVEL_SAMPLE_ROWS)), dtype=np.float32),
                               src.name, src.sig_ids)
    else:
        why = "given"
    if lv == 2:
        raise InputFileError(f"level-2 data (unnormalised GEX: {why}) cannot be used as signatures",
                             path=src.name, field="data level",
                             hint="give the plate's level-3 QNORM/INF file (z-scored here), its level-4 ZSPC "
                                  "file, or level-5 MODZ signatures")
    if lv in (4, 5):
        clipped = MatrixSource(**{**src.__dict__, "read_block": _clipping_reader(src.read_block)})
        return clipped, meta, LevelInfo(lv, f"level {lv}: clipped to +-{CLIP:g} as LINCS does", why)
    return _level3_signatures(src, meta, zscore, why, collapse=replicates == "collapse")


def _replicate_sets(meta: pd.DataFrame) -> list[np.ndarray]:
    """Row indices of each replicate set (plates <brew>_X1, <brew>_X2, ... together; any other plate alone), in
    the order the sets first occur in the file."""
    key = [m["brew"] if (m := REPLICATE_RE.match(p)) else p for p in meta["plate"].astype(str)]
    return [np.asarray(ix) for ix in pd.Series(np.arange(len(key))).groupby(key, sort=False).apply(list)]


def _signature_store(n: int, g: int) -> tuple[np.ndarray, Callable[[], None]]:
    """An [n, g] float32 array for the level-3 signatures: in memory when it fits in a quarter of the available
    memory, else a memory-mapped file in the temporary folder ($TMPDIR), removed on close."""
    if n * g * 4 <= _available_memory() // 4:
        return np.empty((n, g), dtype=np.float32), lambda: None
    tmp = tempfile.mkdtemp(prefix="scpert-level3-")
    arr = np.lib.format.open_memmap(Path(tmp) / "signatures.npy", mode="w+", dtype=np.float32, shape=(n, g))
    return arr, lambda: shutil.rmtree(tmp, ignore_errors=True)


def _level3_signatures(src: MatrixSource, meta: pd.DataFrame, zscore: str, why: str, collapse: bool = True
                       ) -> tuple[MatrixSource, pd.DataFrame, LevelInfo]:
    """Level 3, one replicate set at a time (only one set's wells are in memory): robust z per plate, clip, MODZ
    over replicate plates, clip."""
    meta = meta.copy()
    meta["plate"] = meta["plate"].where(meta["plate"].astype(str) != "", Path(src.name).name)
    sets = _replicate_sets(meta)
    _level3_fits_in_memory(src, max(len(ix) for ix in sets))
    store, cleanup = _signature_store(len(meta), len(src.genes.ids))
    metas, k, n_multi = [], 0, 0
    try:
        for ix in sets:
            x, _ = read_rows(src, ix)
            _finite_or_raise(x, src, rows=ix)
            part = meta.iloc[ix].reset_index(drop=True)
            z = np.clip(plate_zscores(x, part, zscore, src.name), -CLIP, CLIP)
            zc, mc, nm = collapse_replicates(z, part) if collapse else (z, part.assign(n_replicates=1), 0)
            store[k:k + len(zc)] = np.clip(zc, -CLIP, CLIP)  # cmapPy rounds MODZ weights: their sum can be 1.0001
            k, n_multi = k + len(zc), n_multi + nm
            metas.append(mc)
    except BaseException:
        cleanup()
        raise
    z, meta2 = store[:k], pd.concat(metas, ignore_index=True)
    ref = "plate population" if zscore == "plate" else "plate vehicle wells"
    transform = (f"level 3: robust z-score per plate vs the {ref} (median, MAD*1.4826, MAD >= {MIN_MAD}; "
                 f"{meta['plate'].nunique()} plate(s)), clipped to +-{CLIP:g}"
                 + (f", MODZ over replicate plates ({n_multi} signatures from >1 well; {k} in all)"
                    if n_multi else ", no replicate plates" if collapse else ", replicate plates kept apart"))

    def close() -> None:
        src.close()
        cleanup()

    out = MatrixSource(name=src.name, sig_ids=meta2["sig_id"].astype(str).to_numpy(), meta=meta2, genes=src.genes,
                       read_block=lambda a, b: z[a:b], files=src.files, meta_desc=src.meta_desc, close=close)
    return out, meta2, LevelInfo(3, transform, why)


def read_rows(src: MatrixSource, rows: np.ndarray, gsel: np.ndarray | None = None, block: int = 8192
              ) -> tuple[np.ndarray, int]:
    """Matrix rows `rows` (sorted) restricted to genes `gsel` (all when None; -1 = a panel gene the file lacks:
    NaN in every row, never 0), read in contiguous slabs of at most `block` rows -> (float32 [len(rows), genes],
    bytes read)."""
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
        if gsel is not None and not (len(gsel) == sub.shape[1] and (gsel == np.arange(len(gsel))).all()):
            sub = _take_genes(np.asarray(sub), gsel)
        parts.append(np.asarray(sub, dtype=np.float32))
        i = j
    if not parts:
        return np.empty((0, len(src.genes.ids) if gsel is None else len(gsel)), dtype=np.float32), 0
    return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)), nbytes


def _take_genes(x: np.ndarray, gsel: np.ndarray) -> np.ndarray:
    if (gsel >= 0).all():
        return x[:, gsel]
    out = np.full((x.shape[0], len(gsel)), np.nan, dtype=np.float32)
    ok = gsel >= 0
    out[:, ok] = x[:, gsel[ok]]
    return out


# ---------------------------------------------------------------------------------------------- public reader
CANONICAL = ["sig_id", "pert_id", "pert_iname", "pert_type", "cell_id", "dose_um", "time_h", "plate"]


@dataclass
class L1000Table:
    """One L1000 file as signatures: values[i] is the profile of meta.iloc[i] over `genes`."""

    values: np.ndarray
    """float32 [n_profiles, n_genes], after the level handling."""
    genes: list[str]
    """gene ids (Entrez as str where the file gives them)."""
    meta: pd.DataFrame
    """one row per profile: sig_id, pert_id, pert_iname, pert_type (lower case), cell_id, dose_um, time_h, plate
    (+ n_replicates)."""
    level: int
    transform: str
    source: str
    symbols: list[str] = field(default_factory=list)
    landmark: np.ndarray | None = None
    """bool per gene from the file's landmark flag (None when it has none)."""
    notes: list[str] = field(default_factory=list)
    """how the level was detected, joins, what was left empty."""
    smiles: dict[str, str] = field(default_factory=dict)
    """pert_id -> SMILES from the file's own column metadata (an .h5ad's SMILES, a plate's x_smiles); {} if none."""


def canonical_meta(meta: pd.DataFrame, source: str) -> pd.DataFrame:
    dose, tim = doses_times(meta, source, dtype=np.float64)
    out = meta[["sig_id", "pert_id", "pert_iname", "pert_type", "cell_id"]].copy().reset_index(drop=True)
    out["dose_um"] = dose
    out["time_h"] = tim
    out["plate"] = meta["plate"].astype(str).to_numpy()
    if "n_replicates" in meta.columns:
        out["n_replicates"] = meta["n_replicates"].to_numpy()
    return out


def read_l1000(path, *, inst_info=None, siginfo=None, level="auto", zscore: str = "plate",
               replicates: str = "collapse", metadata=None) -> L1000Table:
    """An L1000 file (GCTX / .h5ad / GCT / GCT.GZ / table; format from its first bytes) as signatures with canonical
    metadata. Level 2 raises InputFileError; level 3 is z-scored per plate (`zscore`: 'plate' population or
    'vehicle' wells) and replicate plates collapsed by MODZ (`replicates="keep"`: one signature per well, z-scored
    per plate, not collapsed); levels 4/5 are clipped to +-10. `metadata`: the public metadata folder (default
    $SCPERT_METADATA) whose landmark table maps gene symbols and probe ids. Every fault raises a ScpertError
    subclass naming the file and field."""
    p = Path(path)
    src = open_source(p, metadata)
    try:
        sm = source_metadata(src, siginfo=siginfo, inst_info=inst_info, strict=False)
        _check_genes(src)
        lsrc, meta, info = apply_level(src, sm.meta, level="auto" if level == "asis" else level, zscore=zscore,
                                       replicates=replicates)
        x = np.asarray(lsrc.read_block(0, len(lsrc.sig_ids)), dtype=np.float32)
        _finite_or_raise(x, lsrc)
        cmeta = canonical_meta(meta, src.name)
        smiles = file_smiles(src)
    finally:
        src.close()
    notes = [f"level {info.level}: {info.reason}", *sm.notes]
    if src.genes.report():
        notes.append(f"genes: {src.genes.report()}")
    if sm.meta.attrs.get("missing"):
        notes.append(f"absent metadata fields (left empty): {sm.meta.attrs['missing']}")
    return L1000Table(values=np.ascontiguousarray(x), genes=list(src.genes.ids), meta=cmeta, level=int(info.level),
                      transform=info.transform, source=f"{p.name} ({sm.desc})", symbols=list(src.genes.symbols),
                      landmark=src.genes.landmark, notes=notes, smiles=smiles)


def file_smiles(src: MatrixSource) -> dict[str, str]:
    """pert_id -> SMILES from the file's own column metadata (SMILES_COLS), else {}."""
    smc = first(set(src.meta.columns), *SMILES_COLS)
    pid = first(set(src.meta.columns), *ALIASES["pert_id"])
    if smc is None or pid is None:
        return {}
    out: dict[str, str] = {}
    for p, v in zip(src.meta[pid].astype(str), src.meta[smc], strict=True):
        if isinstance(v, str) and v.strip() and v.strip().lower() not in ("-666", "nan", "none", "restricted"):
            out.setdefault(p.strip(), v.strip())
    return out


def _check_genes(src: MatrixSource) -> None:
    ids = pd.Series(src.genes.ids)
    if ids.duplicated().any():
        raise GeneMappingError(f"gene id {ids[ids.duplicated()].iloc[0]!r} occurs twice in the matrix",
                               path=src.name, field="gene id", hint="each matrix row/column must be a distinct gene")
