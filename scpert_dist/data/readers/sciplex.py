"""Read sci-Plex3-style h5ad files (Srivatsan 2020 / chemCPA / scPerturb / our simulator) into the model-ready
AnnData of schema.py: standard obs columns, log1p(CP10k) X (normalised once), var indexed by landmark Entrez ids.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ... import schema as S
from ...errors import InputFileError, MetadataError, OutputError, SmilesError, ValueRangeError
from ...paths import metadata_dir
from ..drugs import is_valid_smiles
from .genes import landmark_table, map_genes
from .splits import add_splits

log = logging.getLogger(__name__)

DRUG_COLS = ("product_name", "perturbation", "drug", "condition")
DOSE_COLS = ("dose", "dose_value", "dose_val")
CELL_COLS = ("cell_type", "cell_line")
VEHICLE_COLS = ("vehicle", "control")
SMILES_COLS = ("SMILES", "smiles")
VEHICLE_NAMES = {"vehicle", "control", "dmso", "ctrl"}
SYMBOL_COLS = ("gene_short_name", "gene_symbol", "gene_symbols", "symbol")
ENTREZ_COLS = ("entrez_id", "entrez")
DOSE_UNITS = {"nm": 1e-3, "um": 1.0, "µm": 1.0, "μm": 1.0, "mm": 1e3}
NORMALIZED = "log1p_cp10k"


def _pick(obs: pd.DataFrame, explicit: str | None, cands: tuple[str, ...], what: str, flag: str, path: str) -> str:
    if explicit is not None:
        if explicit not in obs.columns:
            raise MetadataError(f"{what} column '{explicit}' not in obs", path=path, field=explicit,
                                hint=f"obs columns are {list(obs.columns)}; pass the right one with {flag}")
        return explicit
    for c in cands:
        if c in obs.columns:
            return c
    raise MetadataError(f"no {what} column in obs (looked for {', '.join(cands)})", path=path, field=what,
                        hint=f"obs columns are {list(obs.columns)}; name the {what} column with {flag}")


def _truthy(v: pd.Series) -> np.ndarray:
    if v.dtype == bool:
        return v.to_numpy()
    s = v.astype(str).str.strip().str.lower()
    return s.isin(["true", "1", "yes", "t", "1.0"]).to_numpy()


def detect_normalization(X, n_rows: int = 2000) -> dict:
    """Look at up to n_rows rows: raw counts (non-negative integers, max > 30 or row sums that vary) vs already
    log-normalised (non-integer values, small max). Returns {'state': 'raw_counts'|'log_normalized', evidence}."""
    import scipy.sparse as sp

    sub = X[: min(n_rows, X.shape[0])]
    dense = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    dense = dense.astype(np.float64)
    if not np.isfinite(dense).all():
        raise ValueRangeError("expression holds NaN or Inf", field="X", hint="remove or fix those cells")
    vmin = float(dense.min()) if dense.size else 0.0
    vmax = float(dense.max()) if dense.size else 0.0
    integer = bool(np.all(dense == np.round(dense)))
    sums = dense.sum(1)
    cv = float(sums.std() / sums.mean()) if sums.size and sums.mean() > 0 else 0.0
    cp10k = np.expm1(dense).sum(1) if vmax < 30 else None
    ev = {"min": vmin, "max": vmax, "integer": integer, "row_sum_cv": cv}
    if vmin < 0:
        ev["state"] = "log_normalized"  # scaled/centered data: not counts; left alone
        ev["note"] = "negative values: treated as already processed, not normalised again"
    elif integer and (vmax > 30 or cv > 0.05 or vmax == 0):
        ev["state"] = "raw_counts"
    else:
        ev["state"] = "log_normalized"
        if cp10k is not None and cp10k.size:
            ev["expm1_row_sum_median"] = float(np.median(cp10k))
    return ev


def read_sciplex(path: str | os.PathLike, *, metadata: str | Path | None = None, manifest: str | Path | None = None,
                 drug_col: str | None = None, dose_col: str | None = None, cell_col: str | None = None,
                 dose_unit: str | None = None, hvg: int | None = None, landmarks_only: bool = False):
    """Read a sci-Plex3-style h5ad and return the standard AnnData (see schema.py); nothing is written.

    Phases: open -> columns -> controls -> doses (uM) -> SMILES -> normalisation -> genes -> gene selection.
    Gene panel: `<metadata>/lincs/l1000_landmark_genes.csv`, or a pretraining manifest.json (`manifest`).
    """
    import anndata as ad

    p = str(path)
    a = _open_h5ad(p)
    table = landmark_table(metadata, manifest)  # fail fast when there is no gene panel
    ours = isinstance(a.uns.get(S.UNS_KEY), dict) and a.uns[S.UNS_KEY].get("normalized") == NORMALIZED
    obs = a.obs
    if ours and all(c in obs.columns for c in (S.OBS_DRUG, S.OBS_DOSE, S.OBS_CELL_LINE, S.OBS_CONTROL)):
        drug_col, dose_col, cell_col, dose_unit = S.OBS_DRUG, S.OBS_DOSE, S.OBS_CELL_LINE, "uM"
    dcol = _pick(obs, drug_col, DRUG_COLS, "drug", "--drug-col", p)
    qcol = _pick(obs, dose_col, DOSE_COLS, "dose", "--dose-col", p)
    ccol = _pick(obs, cell_col, CELL_COLS, "cell line", "--cell-col", p)
    drug = obs[dcol].astype(str).str.strip()
    ctrl = _controls(obs, drug, dcol, ours)
    dose_um, unit = _doses_um(obs, qcol, ctrl, dose_unit, p)
    smiles, scol = _smiles(obs, drug, ctrl, p)
    X, layers, ev = _normalised(a, ours, p)
    newvar, gm = _mapped_var(a.var, ours, table, p)
    newobs = pd.DataFrame({
        S.OBS_DRUG: np.where(ctrl, S.CONTROL_NAME, drug.to_numpy()),
        S.OBS_SMILES: smiles.to_numpy(),
        S.OBS_DOSE: dose_um.astype(float),
        S.OBS_CELL_LINE: obs[ccol].astype(str).to_numpy(),
        S.OBS_CONTROL: ctrl,
    }, index=obs.index.astype(str))
    for c in obs.columns:
        if c not in newobs.columns and c not in (dcol, qcol, ccol, scol):
            newobs[c] = obs[c].to_numpy()
    out = ad.AnnData(X=X, obs=newobs, var=newvar, layers=layers or None)
    out.var_names_make_unique()
    out = _select_genes(out, landmarks_only, hvg)
    prev = dict(a.uns.get(S.UNS_KEY, {})) if ours else {}
    prev.update({
        "normalized": NORMALIZED,
        "input_state": "ours" if ours else ev["state"],
        "normalization_applied": bool(ev["state"] == "raw_counts" and not ours),
        "detection": {k: v for k, v in ev.items() if k != "state"},
        "source": Path(p).name,
        "dose_unit_in": unit,
        "columns": {"drug": dcol, "dose": qcol, "cell_line": ccol, "smiles": scol or ""},
        "gene_mapping": gm.as_dict(),
        "landmarks_only": bool(landmarks_only),
        "hvg": int(hvg) if hvg is not None else -1,
        "metadata": "real" if metadata is not None else ("manifest" if manifest is not None else "none"),
        "semi_synthetic": bool(prev.get("semi_synthetic", a.uns.get("semi_synthetic", False))
                               if not isinstance(a.uns.get("semi_synthetic"), dict) else False),
    })
    out.uns[S.UNS_KEY] = prev
    return out


def _open_h5ad(p: str):
    import anndata as ad

    if not Path(p).is_file():
        raise InputFileError("h5ad file not found", path=p, hint="give the path of a sci-Plex3 .h5ad")
    try:
        a = ad.read_h5ad(p)
    except Exception as e:  # h5py/anndata raise many types for corrupt files
        raise InputFileError(f"cannot read h5ad ({type(e).__name__}: {e})", path=p,
                             hint="give a valid AnnData .h5ad file") from None
    if a.n_obs == 0 or a.n_vars == 0:
        raise InputFileError(f"empty AnnData ({a.n_obs} cells x {a.n_vars} genes)", path=p, hint="give a non-empty file")
    return a


def _controls(obs: pd.DataFrame, drug: pd.Series, dcol: str, ours: bool) -> np.ndarray:
    """Vehicle cells: a vehicle drug name, or a truthy vehicle/control column."""
    ctrl = drug.str.lower().isin(VEHICLE_NAMES).to_numpy()
    for c in VEHICLE_COLS:
        if c in obs.columns and c != dcol:
            ctrl |= _truthy(obs[c])
    if ours and S.OBS_CONTROL in obs.columns:
        ctrl |= obs[S.OBS_CONTROL].to_numpy(bool)
    return ctrl


def _doses_um(obs: pd.DataFrame, qcol: str, ctrl: np.ndarray, dose_unit: str | None, p: str) -> tuple[np.ndarray, str]:
    """Doses in uM (0 for vehicle) and the input unit (--dose-unit, else obs['dose_unit'], else nM)."""
    unit = dose_unit
    if unit is None and "dose_unit" in obs.columns:
        units = obs["dose_unit"].astype(str).str.strip().str.lower().unique()
        if len(units) != 1:
            raise MetadataError(f"several dose units in obs['dose_unit']: {list(units)}", path=p, field="dose_unit",
                                hint="convert to one unit or pass --dose-unit")
        unit = units[0]
    unit = (unit or "nM").strip()
    if unit.lower() not in DOSE_UNITS:
        raise MetadataError(f"unknown dose unit '{unit}'", path=p, field="dose_unit", hint="use nM or uM")
    dose = pd.to_numeric(obs[qcol], errors="coerce").to_numpy(float)
    bad = ~ctrl & (~np.isfinite(dose) | (dose < 0))
    if bad.any():
        raise ValueRangeError(f"{int(bad.sum())} treated cells have a missing/negative dose "
                              f"(first: {obs[qcol].iloc[int(np.flatnonzero(bad)[0])]!r})", path=p, field=qcol,
                              hint="fix the doses or name the dose column with --dose-col")
    return np.where(ctrl, 0.0, dose * DOSE_UNITS[unit.lower()]), unit


def _smiles(obs: pd.DataFrame, drug: pd.Series, ctrl: np.ndarray, p: str) -> tuple[pd.Series, str | None]:
    """Per-cell SMILES ('' for vehicle and unknown), each drug's checked once; the column it came from."""
    scol = next((c for c in SMILES_COLS if c in obs.columns), None)
    if scol:
        smiles = obs[scol].astype(object).where(obs[scol].notna(), "").astype(str).str.strip()
    else:
        smiles = pd.Series("", index=obs.index)
    smiles = smiles.where(~smiles.isin(["nan", "NA", "None"]), "")
    smiles[ctrl] = ""
    for d, s in pd.DataFrame({"d": drug[~ctrl], "s": smiles[~ctrl]}).drop_duplicates().itertuples(index=False):
        if s and not is_valid_smiles(s):
            raise SmilesError(f"invalid SMILES for drug '{d}': '{s}'", path=p, field=scol,
                              hint="correct this drug's SMILES or remove its cells")
    n_nosmi = int(((smiles == "") & ~ctrl).sum())
    if n_nosmi:
        log.warning("%d treated cells have no SMILES", n_nosmi)
    return smiles, scol


def _normalised(a, ours: bool, p: str) -> tuple:
    """(log1p(CP10k) X, layers with the raw counts when X held them, detection record)."""
    import anndata as ad
    import scipy.sparse as sp

    X = a.X
    if X is None:
        raise InputFileError("h5ad has no X matrix", path=p, field="X", hint="store the expression in X")
    if ours:
        ev = {"state": "log_normalized", "note": f"uns['{S.UNS_KEY}'] marks it {NORMALIZED}: not normalised again"}
    else:
        ev = detect_normalization(X)
    if ev["state"] != "raw_counts" or ours:
        layers = {"counts": a.layers["counts"]} if ours and "counts" in a.layers else {}
        log.info("X is already log-normalised (max %.2f): left as is", ev.get("max", float("nan")))
        return X.astype(np.float32), layers, ev
    import scanpy as sc

    counts = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    neg = np.flatnonzero(np.asarray((counts < 0).sum(axis=1)).ravel()) if sp.issparse(counts) else \
        np.flatnonzero((counts < 0).any(axis=1))
    if len(neg):  # detection looks at the first rows only; counts must be >= 0 everywhere
        raise ValueRangeError(f"X holds raw counts but {len(neg)} cells have negative counts "
                              f"(first: {str(a.obs_names[neg[0]])!r}; an integer overflow upstream?)",
                              path=p, field="X", hint="fix or drop those cells before normalisation")
    tmp = ad.AnnData(X=counts.astype(np.float32))
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    log.info("X holds raw counts (integers, max %.0f, row-sum CV %.2f): normalised to log1p(CP10k)",
             ev["max"], ev["row_sum_cv"])
    return tmp.X, {"counts": counts}, ev


def _mapped_var(var: pd.DataFrame, ours: bool, table, p: str) -> tuple[pd.DataFrame, object]:
    """var indexed by Entrez id where the gene maps to the panel (else its own id), with symbol/Ensembl/landmark."""
    ids = [str(v) for v in (var["id"] if "id" in var.columns and not ours else var.index)]
    symc = next((c for c in SYMBOL_COLS if c in var.columns), None)
    entc = next((c for c in ENTREZ_COLS if c in var.columns), None)
    symbols = var[symc].astype(str).tolist() if symc else None
    entrez = list(var.index) if ours else (var[entc].tolist() if entc else None)
    gm = map_genes(ids, symbols, entrez, table=table, path=p)
    log.info(gm.report())
    new_index = [e if e else i for e, i in zip(gm.entrez, ids, strict=False)]
    lm_sym = dict(zip(table["gene_id"], table["gene_symbol"], strict=False))
    lm_ens = dict(zip(table["gene_id"], table["ensembl_id"], strict=False))
    gsym = [lm_sym.get(e, "") if e else (symbols[k] if symbols else "") for k, e in enumerate(gm.entrez)]
    gens = [lm_ens.get(e, "") if e else (i if i.upper().startswith("ENS") else "")
            for e, i in zip(gm.entrez, ids, strict=False)]
    if S.VAR_ENSEMBL in var.columns:
        gens = [g or str(v) for g, v in zip(gens, var[S.VAR_ENSEMBL], strict=False)]
    return pd.DataFrame({S.VAR_SYMBOL: gsym, S.VAR_ENSEMBL: gens, S.VAR_LANDMARK: gm.mapped}, index=new_index), gm


def _select_genes(out, landmarks_only: bool, hvg: int | None):
    """The landmark panel only, or the panel + `hvg` highly variable other genes (exactly that many)."""
    if landmarks_only:
        return out[:, out.var[S.VAR_LANDMARK].to_numpy()].copy()
    if hvg is None:
        return out
    import scanpy as sc

    other = ~out.var[S.VAR_LANDMARK].to_numpy()
    n_other = int(other.sum())
    keep = out.var[S.VAR_LANDMARK].to_numpy().copy()
    if hvg > 0 and n_other > 0:
        sub = out[:, other].copy()
        n_top = min(hvg, n_other)
        sc.pp.highly_variable_genes(sub, n_top_genes=n_top, flavor="seurat")
        # scanpy's seurat flavour flags every gene tied at the cut-off (seen: 13 for n_top_genes=10); keep
        # exactly n_top by normalised dispersion, ties broken by gene order
        disp = np.nan_to_num(sub.var["dispersions_norm"].to_numpy(dtype=float), nan=-np.inf)
        top = np.argsort(-disp, kind="stable")[:n_top]
        keep[np.flatnonzero(other)[top]] = True
    return out[:, keep].copy()


def check_output(out: str | os.PathLike) -> Path:
    """Raise OutputError unless `out` can be created (folder exists and is writable, not a folder itself)."""
    o = Path(out)
    if o.is_dir():
        raise OutputError("output path is a folder", path=str(o), hint="give a file name ending in .h5ad")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError("output folder does not exist or is not writable", path=str(o),
                          hint="choose a writable location for --out")
    return o


def write_h5ad_atomic(adata, out: str | os.PathLike) -> Path:
    """Write to a temp file beside `out`, then rename: `out` is either complete or absent."""
    o = check_output(out)
    tmp = o.with_name(f".{o.name}.tmp-{os.getpid()}.h5ad")
    try:
        adata.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, o)
    except OSError as e:
        raise OutputError(f"cannot write output ({e.strerror})", path=str(o), hint="choose a writable location") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return o


def prepare_sciplex(h5ad: str | os.PathLike, out: str | os.PathLike, *, split: str = "chemcpa_ood", folds: int = 5,
                    seed: int = 0, metadata: str | Path | None = None, manifest: str | Path | None = None,
                    **read_kw) -> dict:
    """read_sciplex + splits + atomic write. Output is checked for writability first; nothing is written on error.
    Returns a summary dict (cells, genes, mapping, split info)."""
    check_output(out)
    meta = metadata_dir(metadata)
    a = read_sciplex(h5ad, metadata=meta, manifest=manifest, **read_kw)
    info = add_splits(a, split, seed=seed, folds=folds, metadata=meta)
    a.uns[S.UNS_KEY]["splits"] = {k: (v if not isinstance(v, dict) else {kk: list(vv) for kk, vv in v.items()})
                                  for k, v in info.items()}
    write_h5ad_atomic(a, out)
    u = a.uns[S.UNS_KEY]
    return {"n_obs": a.n_obs, "n_vars": a.n_vars, "input_state": u["input_state"],
            "normalization_applied": u["normalization_applied"], "gene_mapping": u["gene_mapping"], "split": info}


# --- layouts and real single-cell statistics ------------------------------------------------------------------

LAYOUTS = {
    "scpert": ("drug", "dose_um", "cell_line", "is_control"),
    "chemcpa": ("product_name", "dose", "cell_type", "SMILES", "control"),
    "srivatsan": ("product_name", "dose", "cell_type", "vehicle"),
    "scperturb": ("perturbation", "dose_value", "cell_line"),
}


def detect_layout(obs: pd.DataFrame) -> str:
    """Name of the obs layout: 'scpert' (ours), 'chemcpa' (chemCPA's published h5ad: product_name, dose in nM,
    cell_type, SMILES, control 0/1), 'srivatsan' (the GEO cell annotation), 'scperturb', or 'unknown'."""
    for name, cols in LAYOUTS.items():
        if all(c in obs.columns for c in cols):
            return name
    return "unknown"


def panel_coverage(adata) -> dict:
    """How many panel genes a read_sciplex output holds: {'panel_size', 'present', 'missing' (symbols)}."""
    gm = adata.uns[S.UNS_KEY]["gene_mapping"]
    return {"panel_size": int(gm["panel_size"]), "present": int(gm["n_mapped"]),
            "missing": list(gm["unmapped_panel"])}


def _expm1_dense(X) -> np.ndarray:
    import scipy.sparse as sp

    return np.expm1((X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float64))


def cell_stats(adata, genes=None, *, counts_col: str = "n_counts") -> pd.DataFrame:
    """Per cell line: cells, library size (median and 5-95% of obs[counts_col], else of the raw-counts layer), genes
    detected per cell, zero fraction, and the mean-variance relation of the normalised values (expm1 of X) over
    genes: slope of log10 variance on log10 mean (Poisson 1, quadratic 2) and the median squared coefficient of
    variation (both free of the normalisation's scale).
    `genes` (var names) restricts the gene-wise statistics, e.g. to the genes two datasets share."""
    cols = np.arange(adata.n_vars) if genes is None else adata.var_names.get_indexer(list(genes))
    if (cols < 0).any():
        raise MetadataError(f"{int((cols < 0).sum())} requested genes are not in var", field="var_names",
                            hint="pass genes present in the AnnData")
    rows = []
    for line in sorted(adata.obs[S.OBS_CELL_LINE].astype(str).unique()):
        m = (adata.obs[S.OBS_CELL_LINE].astype(str) == line).to_numpy()
        Y = _expm1_dense(adata.X[np.flatnonzero(m)][:, cols])
        if counts_col in adata.obs.columns:
            lib = pd.to_numeric(adata.obs.loc[m, counts_col], errors="coerce").to_numpy(float)
        elif "counts" in adata.layers:
            lib = np.asarray(adata.layers["counts"][np.flatnonzero(m)].sum(1)).ravel().astype(float)
        else:
            lib = np.full(int(m.sum()), np.nan)
        mu, var = Y.mean(0), Y.var(0)
        ok = (mu > 0) & (var > 0)
        slope = float(np.polyfit(np.log10(mu[ok]), np.log10(var[ok]), 1)[0]) if ok.sum() > 2 else float("nan")
        rows.append({"cell_line": line, "cells": int(m.sum()), "lib_median": float(np.nanmedian(lib)),
                     "lib_p5": float(np.nanpercentile(lib, 5)), "lib_p95": float(np.nanpercentile(lib, 95)),
                     "genes_detected_median": float(np.median((Y > 0).sum(1))),
                     "zero_fraction": float((Y == 0).mean()), "mv_slope": slope,
                     "cv2_median": float(np.median(var[ok] / mu[ok] ** 2)) if ok.any() else float("nan"),
                     "n_genes": len(cols)})
    return pd.DataFrame(rows)


def compare_cell_stats(real_h5ad, sim_h5ad, metadata) -> pd.DataFrame:
    """cell_stats of a real and a simulated sci-Plex3 h5ad (both read with read_sciplex) on the panel genes both
    hold, one row per (source, cell line); only lines present in both are compared."""
    real = read_sciplex(real_h5ad, metadata=metadata)
    sim = read_sciplex(sim_h5ad, metadata=metadata)
    lm_r = set(real.var_names[real.var[S.VAR_LANDMARK].to_numpy(bool)])
    shared = [g for g in sim.var_names[sim.var[S.VAR_LANDMARK].to_numpy(bool)] if g in lm_r]
    lines = sorted(set(real.obs[S.OBS_CELL_LINE].astype(str)) & set(sim.obs[S.OBS_CELL_LINE].astype(str)))
    out = []
    for src, a in (("real", real), ("simulated", sim)):
        a = a[a.obs[S.OBS_CELL_LINE].astype(str).isin(lines).to_numpy()]
        t = cell_stats(a, shared)
        t.insert(0, "source", src)
        out.append(t)
    return pd.concat(out, ignore_index=True)
