"""Pseudobulk profile tables (mean expression per drug x cell line, truth and predictions alike), e.g. the real
sci-Plex3 pseudobulk in ../shared/data or biolord's released predictions.

Format: a Parquet/CSV/TSV table with columns `drug`, `cell_line`, optionally `profile` (`treated_pseudobulk` |
`control_pseudobulk`; absent = treated), and one numeric column per gene (gene symbols); or an h5ad with obs `drug`,
`cell_line` (optional `profile`) and var_names = genes. Values are mean log-normalised expression. Scoring is
`scpert_dist.evaluate.pseudobulk`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputFileError, MetadataError
from ...paths import atomic_write_bytes

TREATED, CONTROL = "treated_pseudobulk", "control_pseudobulk"
KEYS = ["drug", "cell_line"]


@dataclass
class Profiles:
    """Pseudobulk profiles: keys (drug, cell_line[, profile]) and values [n, genes]."""

    keys: pd.DataFrame
    values: np.ndarray
    genes: list[str]

    def select(self, profile: str) -> Profiles:
        m = (self.keys["profile"] == profile).to_numpy()
        return Profiles(self.keys[m].reset_index(drop=True), self.values[m], self.genes)


def _read_table(p: Path) -> pd.DataFrame:
    suf = "".join(p.suffixes[-2:]).lower()
    try:
        if p.suffix.lower() == ".parquet":
            return pd.read_parquet(p)
        if p.suffix.lower() == ".h5ad":
            import anndata as ad

            a = ad.read_h5ad(p)
            X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
            df = pd.DataFrame(X, columns=[str(g) for g in a.var_names])
            for c in ("profile", "cell_line", "drug"):
                if c in a.obs.columns:
                    df.insert(0, c, a.obs[c].astype(str).to_numpy())
            return df
        sep = "\t" if suf.endswith((".tsv", ".tsv.gz", ".txt")) else ","
        return pd.read_csv(p, sep=sep)
    except (OSError, ValueError, KeyError) as e:
        raise InputFileError(f"cannot read profile table ({type(e).__name__}: {e})", path=str(p),
                             hint="give a Parquet/CSV/TSV table or an h5ad (see scpert_dist.data.readers.pseudobulk)") from None


def read_profiles(path: str | Path) -> Profiles:
    """A profile table (see the module docstring) -> Profiles; named errors for a missing file or column."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError("profile table not found", path=str(p), hint="give a Parquet/CSV/TSV table or h5ad")
    df = _read_table(p)
    miss = [c for c in KEYS if c not in df.columns]
    if miss:
        raise MetadataError(f"profile table lacks columns {miss}", path=str(p), field=",".join(miss),
                            hint="name the columns drug and cell_line; one further column per gene")
    keys = df[KEYS].astype(str).copy()
    keys["profile"] = df["profile"].astype(str).to_numpy() if "profile" in df.columns else TREATED
    genes = [c for c in df.columns if c not in (*KEYS, "profile")]
    vals = df[genes].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not genes or not np.isfinite(vals).all():
        raise MetadataError("gene columns missing or holding non-numeric / NaN values", path=str(p),
                            field="genes", hint="one numeric column per gene, no missing values")
    if keys.duplicated().any():
        raise MetadataError(f"duplicate rows for {keys[keys.duplicated()].iloc[0].tolist()}", path=str(p),
                            field="drug,cell_line,profile", hint="give one row per drug, cell line and profile")
    return Profiles(keys.reset_index(drop=True), vals, [str(g) for g in genes])


def biolord_table(pred_dir: str | Path, genes: list[str], out: str | Path | None = None) -> pd.DataFrame:
    """biolord's released pseudobulk predictions (`pred_treated_pb.npy` [n, G], rows in `meta.csv` order, columns in
    the order of `genes`) -> a profile table; written atomically to `out` (.parquet or .csv) when given."""
    d = Path(pred_dir)
    for f in ("pred_treated_pb.npy", "meta.csv"):
        if not (d / f).is_file():
            raise InputFileError(f"{f} not found", path=str(d / f), hint="give biolord's prediction folder")
    pred = np.load(d / "pred_treated_pb.npy")
    meta = pd.read_csv(d / "meta.csv")
    if pred.shape != (len(meta), len(genes)):
        raise MetadataError(f"predictions {pred.shape} do not match meta.csv ({len(meta)} rows) x {len(genes)} genes",
                            path=str(d), field="pred_treated_pb.npy", hint="give the gene order of the arrays")
    df = pd.concat([meta[KEYS].astype(str).assign(profile=TREATED),
                    pd.DataFrame(pred, columns=genes)], axis=1)
    if out is not None:
        o = Path(out)
        if o.suffix == ".parquet":
            import io

            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            atomic_write_bytes(o, buf.getvalue())
        else:
            atomic_write_bytes(o, df.to_csv(index=False).encode())
    return df
