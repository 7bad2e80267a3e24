"""Figures for the benchmark (matplotlib Agg): predicted vs true logFC per held-out drug, UMAP of true vs
predicted cells for one condition. Each function writes a PNG and returns its path."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def logfc_scatter_grid(true_lfc: dict, pred_lfc: dict, out: str | Path, title: str = "") -> Path:
    """Grid of scatter plots, one per key (e.g. drug or (drug, line, dose)), x = true logFC, y = predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in true_lfc if k in pred_lfc]
    n = max(len(keys), 1)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax, k in zip(axes.ravel(), keys, strict=False):
        t, p = np.asarray(true_lfc[k]), np.asarray(pred_lfc[k])
        ax.scatter(t, p, s=4, alpha=0.6)
        lim = float(np.nanmax(np.abs(np.concatenate([t, p])))) or 1.0
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.6)
        r = np.corrcoef(t, p)[0, 1] if t.std() > 0 and p.std() > 0 else float("nan")
        ax.set_title(f"{k if isinstance(k, str) else ' '.join(map(str, k))}\nr={r:.2f}", fontsize=8)
        ax.set_xlabel("true logFC", fontsize=7)
        ax.set_ylabel("predicted logFC", fontsize=7)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, out, dpi=100)


def umap_true_vs_pred(true: np.ndarray, pred: np.ndarray, out: str | Path, control: np.ndarray | None = None,
                      title: str = "", seed: int = 0) -> Path:
    """scanpy PCA -> neighbours -> UMAP of the union of true, predicted (and control) cells, coloured by origin."""
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    parts = [("true", true), ("predicted", pred)] + ([("control", control)] if control is not None else [])
    X = np.concatenate([np.asarray(p, np.float32) for _, p in parts])
    a = ad.AnnData(X)
    a.obs["origin"] = np.concatenate([[n] * len(p) for n, p in parts])
    sc.pp.pca(a, n_comps=min(20, X.shape[1] - 1, X.shape[0] - 1), random_state=seed)
    sc.pp.neighbors(a, n_neighbors=min(15, X.shape[0] - 1), random_state=seed)
    sc.tl.umap(a, random_state=seed)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for n, _ in parts:
        m = (a.obs["origin"] == n).to_numpy()
        ax.scatter(*a.obsm["X_umap"][m].T, s=5, alpha=0.7, label=n)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, out, dpi=100)


def methods_bar(summary, out: str | Path, metric: str = "logfc_pearson") -> Path:
    """All methods on one axis: `metric` with its 95% CI, best on top (the MLflow UI would draw one chart per
    method, each on its own scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary.sort_values(metric)
    y = np.arange(len(s))
    v = s[metric].to_numpy(float)
    lo = s.get(metric + "_lo", s[metric]).to_numpy(float)
    hi = s.get(metric + "_hi", s[metric]).to_numpy(float)
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(s) + 1.2))
    ax.barh(y, v, xerr=[v - lo, hi - v], color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(y, s["method"].astype(str))
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel(f"{metric} (95% bootstrap CI over drugs)")
    return _save(fig, out, dpi=110)


def _save(fig, out: str | Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
