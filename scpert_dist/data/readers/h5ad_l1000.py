"""L1000 profiles stored as AnnData (.h5ad; PRnet's and chemCPA's layout) -> a MatrixSource like any GCTX.

obs: one row per well. GSE92742-era column names (`pert_id`, `pert_iname`, `pert_type`, `cell_id`, `pert_dose` +
`pert_dose_unit`, `pert_time` + `pert_time_unit`, `rna_plate`, `rna_well`) are used as they are; chemCPA-style
names fill in where those are absent (`cell_type` -> cell_id, `condition` / `product_name` -> pert_iname,
`control` 0/1 -> pert_type trt_cp / ctl_vehicle). The obs names are the LINCS inst ids (`<plate>:<well>`), with the
'-1' that AnnData's concatenation appends removed where every name carries it.
var: gene symbols (index) mapped to Entrez ids through the landmark table (LINCS2020 `gene_symbol`, then the older
`gene_symbol_gse92742`), or a `pr_gene_id` / `gene_id` column where the file has one; landmark flag `pr_is_lm`.
A `SMILES` / `canonical_smiles` obs column is kept (l1000.file_smiles reads it).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ... import schema as S
from ...errors import GeneMappingError, InputFileError, MetadataError
from .genes import LANDMARK_CSV, LANDMARK_FLAGS, FileGenes, is_flag_true, landmark_symbols, row_genes
from .source import MatrixSource
from .tables import first

CHEMCPA_OBS = {"cell_id": ("cell_type", "cell_line"), "pert_iname": ("condition", "product_name", "drug")}
"""canonical GCT name -> chemCPA-style obs columns that stand in for it when the GCT name is absent."""
CONCAT_SUFFIX = re.compile(r"-\d+$")


def is_anndata(path: Path) -> bool:
    """An HDF5 file with AnnData's top-level X, obs and var (and no GCTX '0' group)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
    except Exception:  # not readable as HDF5: the GCTX reader names the fault
        return False
    return {"X", "obs", "var"} <= keys and "0" not in keys


def _read(path: Path):
    import anndata as ad

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # non-unique names: named by the reader's own check
            return ad.read_h5ad(path, backed="r")
    except Exception as e:  # h5py/anndata errors of a truncated or damaged file
        raise InputFileError(f"not a readable AnnData file ({type(e).__name__}: {str(e)[:200]})", path=str(path),
                             hint="the .h5ad is truncated or damaged; download it again") from None


def obs_ids(names: pd.Index) -> tuple[np.ndarray, str]:
    """Profile ids as in GCT metadata: AnnData's concatenation suffix '-1' dropped where every name has one and
    the names stay unique. -> (ids, a note or '')."""
    names = pd.Index(names.astype(str))
    stripped = names.str.replace(CONCAT_SUFFIX, "", regex=True)
    if len(names) and names.str.contains(CONCAT_SUFFIX).all() and stripped.is_unique:
        return np.asarray(stripped), "obs names without AnnData's '-1' suffix (LINCS inst ids)"
    return np.asarray(names), ""


def obs_meta(obs: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, list[str]]:
    """obs -> column metadata under the GCT names the L1000 reader uses (see CHEMCPA_OBS); -> (meta, notes)."""
    meta = pd.DataFrame({c: (obs[c].astype(object) if isinstance(obs[c].dtype, pd.CategoricalDtype) else obs[c])
                         for c in obs.columns}).reset_index(drop=True)
    cols, notes = set(meta.columns), []
    for canon, alts in CHEMCPA_OBS.items():
        if canon not in cols and not (canon == "pert_iname" and {"cmap_name", "pert_desc"} & cols):
            alt = first(cols, *alts)
            if alt is not None:
                meta[canon] = meta[alt].astype(str)
                notes.append(f"obs {alt} -> {canon}")
    if "pert_type" not in cols and "control" in cols:
        ctl = meta["control"].astype(str).str.strip().isin(["1", "1.0", "True", "true"])
        meta["pert_type"] = np.where(ctl, S.CTL_VEHICLE, S.TRT_CP)
        notes.append("obs control (1 = vehicle) -> pert_type")
    for c in ("pert_dose", "pert_time"):  # numeric columns with a unit column: strings as the GCT reader reads them
        if c in meta.columns and pd.api.types.is_float_dtype(meta[c]):
            meta[c] = [f"{v:g}" if np.isfinite(v) else "-666" for v in meta[c]]
    if meta.empty and not len(obs.columns):
        raise MetadataError("the .h5ad has no obs columns", path=str(path), field="obs",
                            hint="obs needs pert_id, pert_iname, pert_type, cell_id, pert_dose(+_unit), pert_time")
    return meta, notes


def var_genes(var: pd.DataFrame, meta_dir: Path | None, path: Path) -> FileGenes:
    """var -> FileGenes: a pr_gene_id / gene_id column as the GCT reader reads it, else the symbols of the index
    mapped through the landmark table (symbols not in it are dropped with their count)."""
    names = [str(v) for v in var.index]
    if first(set(var.columns), "pr_gene_id", "gene_id", "entrez_id"):
        v = var.rename(columns={"entrez_id": "gene_id"})
        return row_genes(v.reset_index(drop=True).assign(pr_gene_symbol=names), names, None, str(path))
    table = landmark_symbols(meta_dir)
    if table is None:
        raise GeneMappingError(
            f"the var index holds gene symbols (e.g. {names[:3]}) and no Entrez id column (pr_gene_id / gene_id)",
            path=str(path), field="var_names",
            hint=f"pass --metadata (a folder with {LANDMARK_CSV}): its gene_symbol and gene_symbol_gse92742 columns "
                 "map the symbols to Entrez ids")
    lmc = first(set(var.columns), *LANDMARK_FLAGS)
    flags = np.array([is_flag_true(v) for v in var[lmc]]) if lmc else None
    hits = [table.get(n.strip().upper()) for n in names]
    seen: dict[str, int] = {}
    keep, dropped = [], {"symbols not in the landmark table": [], "second symbols of one gene": []}
    for k, h in enumerate(hits):
        if h is None:
            dropped["symbols not in the landmark table"].append(names[k])
        elif h[0] in seen:
            dropped["second symbols of one gene"].append(names[k])
        else:
            seen[h[0]] = k
            keep.append(k)
    if not keep:
        raise GeneMappingError(f"none of {len(names)} var symbols is a landmark symbol (first: {names[:3]})",
                               path=str(path), field="var_names",
                               hint=f"the var index must hold gene symbols of {LANDMARK_CSV}, or add pr_gene_id")
    n_old = sum(1 for k in keep if names[k].upper() != hits[k][1].upper())
    mapping = (f"gene symbols -> Entrez ids through {LANDMARK_CSV}: {len(keep)} of {len(names)} mapped ("
               f"{len(keep) - n_old} by gene_symbol, {n_old} only by gene_symbol_gse92742)")
    cols = np.array(keep, dtype=np.int64)
    return FileGenes([hits[k][0] for k in keep], [hits[k][1] for k in keep],
                     None if flags is None else flags[cols], lmc or "",
                     columns=None if len(keep) == len(names) else cols,
                     dropped={k: v for k, v in dropped.items() if v}, mapping=mapping)


def h5ad_source(path: Path, meta_dir: Path | None = None) -> MatrixSource:
    """An L1000 .h5ad (X: profiles x genes, dense or sparse) read in row blocks from the backed file."""
    a = _read(path)
    try:
        if len(a.shape) != 2 or a.n_obs == 0 or a.n_vars == 0:
            raise InputFileError(f"the .h5ad holds a {a.shape} matrix", path=str(path), field="X",
                                 hint="X must be profiles x genes")
        ids, id_note = obs_ids(a.obs_names)
        meta, notes = obs_meta(a.obs, path)
        genes = var_genes(a.var, meta_dir, path)
    except BaseException:
        a.file.close()
        raise
    cols = genes.columns
    name = str(path)

    def read_block(lo: int, hi: int) -> np.ndarray:
        try:
            x = a.X[lo:hi]
            x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        except Exception as e:
            raise InputFileError(f"cannot read X rows {lo}:{hi} ({type(e).__name__}: {e})", path=name, field="X",
                                 hint="the .h5ad is truncated or damaged; download it again") from None
        x = x.astype(np.float32, copy=False)
        return x if cols is None else x[:, cols]

    src = MatrixSource(name=name, sig_ids=ids, meta=meta, genes=genes, read_block=read_block, files=[path],
                       meta_desc="AnnData obs of " + path.name + (f" ({', '.join([id_note, *notes])})"
                                                                   if id_note or notes else ""),
                       close=a.file.close)
    return src
