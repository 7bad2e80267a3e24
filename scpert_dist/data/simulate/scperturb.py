"""The simulator's sci-Plex3 side as scPerturb summarises the real screen: E-distances and pseudobulk correlations
between compounds (cells pooled per compound over lines and doses), and the statistics `scpert data calibrate`
compares with scPerturb's real 189 x 189 tables.

scPerturb's processing (its repository: revision/snakemake/Snakefile `prepare_data`, `e_distance`,
`pseudobulk_correlations`; scperturb/edistance.py), applied here to the simulated raw counts: cells with >= 1,000
UMIs; every perturbation sub-sampled to the size of the smallest one (groups under 50 cells dropped); counts
normalised per cell, genes in >= 50 cells, log1p; 2,000 highly variable genes (Seurat v3 on counts when
scikit-misc is installed, else scanpy's 'seurat' flavour on the log values; the simulation has 1,178 genes, so
either keeps all of them); PCA, 50 components. E-distance between groups X and Y = 2 mean d(x, y) - mean
d(x, x') - mean d(y, y') over distinct cells (d: squared Euclidean in PCA space), computed in closed form:
2 |mean X - mean Y|^2 - 2 s_X / (n_X - 1) - 2 s_Y / (n_Y - 1), s = mean squared distance to the group mean.
Pseudobulk correlation: the mean log-normalised profile per group, normalised per cell and log1p again, PCA (up to
50 components), Pearson r of the groups' PCA coordinates.

The statistics (table_stats) are scale-free, because the real tables live in another PCA space (~20,000 genes,
real cells) than the simulated ones: shapes of the E-distance-to-control distribution, shares of compounds with an
effect relative to the table's own noise level, and pseudobulk correlations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ... import schema as S
from ..readers.scperturb import CORRELATION, EDISTANCE, DrugTable

MIN_COUNTS = 1000
MIN_GROUP = 50
MIN_CELLS_PER_GENE = 50
N_HVG = 2000
N_PCS = 50
NOISE_K = 3.0
"""a compound has an effect when its E-distance to control exceeds NOISE_K x the table's noise level."""
STRONG_K = 3.0
"""a strong effect: E-distance to control above STRONG_K x the median compound's."""
R_HIGH = 0.5


def edistances(Z: np.ndarray, groups: np.ndarray) -> tuple[list[str], np.ndarray]:
    """scPerturb's E-distance between every pair of groups of rows of Z (squared Euclidean, distinct cells), in
    closed form -> (group names in order of first occurrence, [k, k] with a zero diagonal)."""
    names = list(pd.unique(groups))
    Z = np.asarray(Z, dtype=np.float64)
    mu = np.stack([Z[groups == g].mean(0) for g in names])
    n = np.array([(groups == g).sum() for g in names], dtype=np.float64)
    s = np.array([((Z[groups == g] - m) ** 2).sum(1).mean() for g, m in zip(names, mu, strict=True)])
    sq = (mu ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * mu @ mu.T, 0.0)
    within = 2 * s / np.maximum(n - 1, 1)
    e = 2 * d2 - within[:, None] - within[None]
    np.fill_diagonal(e, 0.0)
    return names, (e + e.T) / 2


def _equal_subsample(obs: pd.DataFrame, key: str, rng: np.random.Generator) -> np.ndarray:
    counts = obs[key].value_counts()
    keep = counts.index[counts >= MIN_GROUP]
    n = max(MIN_GROUP, int(counts.min()))
    idx = [rng.choice(np.flatnonzero((obs[key] == g).to_numpy()), size=n, replace=False) for g in keep]
    return np.sort(np.concatenate(idx))


def _hvg(a, n_top: int) -> str:
    import scanpy as sc

    if a.n_vars <= n_top:
        a.var["highly_variable"] = True
        return f"all {a.n_vars} genes (fewer than {n_top})"
    try:
        import skmisc  # noqa: F401  (scanpy's seurat_v3 flavour needs it)

        sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat_v3", layer="counts")
        return f"{n_top} HVGs (seurat_v3)"
    except ImportError:
        sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat")
        return f"{n_top} HVGs (seurat flavour: scikit-misc is not installed)"


def sim_tables(raw_adata, *, seed: int = 0) -> tuple[DrugTable, DrugTable, dict]:
    """scPerturb's E-distance and pseudobulk-correlation tables of a simulated sci-Plex3 AnnData of raw counts
    (`sciplex/sciplex3_sim.h5ad`): cells pooled per compound (product_name; 'Vehicle' -> 'control')."""
    import anndata as ad
    import scanpy as sc
    from scipy import sparse

    o = raw_adata.obs
    pert = o[S.OBS_DRUG if S.OBS_DRUG in o else "product_name"].astype(str).replace({"Vehicle": "control"})
    lib = pd.to_numeric(o["n_counts"]).to_numpy() if "n_counts" in o else np.asarray(raw_adata.X.sum(1)).ravel()
    ok = np.flatnonzero(lib >= MIN_COUNTS)
    rng = np.random.default_rng([seed, 7])
    obs = pd.DataFrame({"perturbation": pert.to_numpy()[ok]})
    sel = ok[_equal_subsample(obs, "perturbation", rng)]
    X = raw_adata.X[sel]
    a = ad.AnnData(X=sparse.csr_matrix(X, dtype=np.float32),
                   obs=pd.DataFrame({"perturbation": pert.to_numpy()[sel]}, index=[str(i) for i in range(len(sel))]))
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a)
    sc.pp.filter_genes(a, min_cells=MIN_CELLS_PER_GENE)
    sc.pp.log1p(a)
    hvg = _hvg(a, N_HVG)
    n_pcs = min(N_PCS, a.n_vars - 1, a.n_obs - 1)
    sc.pp.pca(a, n_comps=n_pcs, mask_var="highly_variable", random_state=seed)
    names, e = edistances(a.obsm["X_pca"], a.obs["perturbation"].to_numpy())
    groups = a.obs["perturbation"].to_numpy()
    X = a.X.toarray() if sparse.issparse(a.X) else np.asarray(a.X)
    pb = np.stack([X[groups == g].mean(0) for g in names])
    b = ad.AnnData(X=pb.astype(np.float32))
    sc.pp.normalize_total(b)
    sc.pp.log1p(b)
    sc.pp.pca(b, n_comps=min(N_PCS, len(names) - 1, b.n_vars - 1), random_state=seed)
    r = np.corrcoef(b.obsm["X_pca"])
    info = {"cells_per_group": int((groups == names[0]).sum()), "groups": len(names), "genes": int(a.n_vars),
            "hvg": hvg, "pcs": int(n_pcs), "cells_dropped_min_counts": int(len(lib) - len(ok))}
    return (DrugTable(e, names, EDISTANCE, "control", source="simulated"),
            DrugTable(r, names, CORRELATION, "control", source="simulated"), info)


def noise_level(edist: DrugTable) -> float:
    """The table's own noise level: the root mean square of its negative E-distances between compounds (an
    E-distance estimate is centred on 0 for two groups that do not differ, so only noise makes it negative)."""
    a = edist.among_drugs()
    neg = a[a < 0]
    return float(np.sqrt((neg ** 2).mean())) if len(neg) else float("nan")


def table_stats(edist: DrugTable, corr: DrugTable) -> dict[str, float]:
    """Scale-free statistics of a pair of scPerturb tables (real or simulated, computed the same way)."""
    ec = edist.to_control()
    med = float(ec.median())
    s0 = noise_level(edist)
    among = edist.among_drugs()
    r = corr.among_drugs()
    strong = list(ec.index[ec > STRONG_K * med])
    idx = [corr.names.index(n) for n in strong if n in corr.names]
    sub = corr.values[np.ix_(idx, idx)][np.triu_indices(len(idx), 1)] if len(idx) > 1 else np.array([np.nan])
    rc = corr.to_control()
    return {
        f"share of compounds with an effect (E to control > {NOISE_K:g} x noise level)": float((ec > NOISE_K * s0).mean()),
        f"share of compounds with a strong effect (E to control > {STRONG_K:g} x median)": float(len(strong) / len(ec)),
        "median E to control / noise level": med / s0,
        "E to control p90 / p50": float(np.percentile(ec, 90) / med),
        "E to control max / p50": float(ec.max() / med),
        "median E between compounds / median E to control": float(np.median(among) / med),
        "pseudobulk r between compounds p5": float(np.percentile(r, 5)),
        "pseudobulk r between compounds p50": float(np.median(r)),
        "pseudobulk r between compounds p95": float(np.percentile(r, 95)),
        f"share of compound pairs with pseudobulk r > {R_HIGH:g}": float((r > R_HIGH).mean()),
        "mean pseudobulk r among the strong responders": float(np.nanmean(sub)),
        "mean pseudobulk r of a compound with control": float(rc.mean()),
    }
