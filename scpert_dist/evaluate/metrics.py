"""Evaluation metrics: the paper's Table 2 six, plus sound logFC/distribution metrics with bootstrap CIs.

The paper's `mean` metrics correlate predicted with true *mean expression*
that is dominated by baseline
expression (the unchanged 'control' prediction scores ~0.99). The sound metrics compare *changes from vehicle*
(logFC = mean(cells) - mean(control)), rank each drug's predicted change among all drugs' true changes, and
measure the energy distance between predicted and true cells (Euclidean, on all genes given).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from .. import schema as S


def pearson(a, b) -> float:
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def r2(true, pred) -> float:
    """Coefficient of determination of pred for true (1 - SSres/SStot)."""
    true = np.asarray(true, float)
    pred = np.asarray(pred, float)
    sst = ((true - true.mean()) ** 2).sum()
    return float(1 - ((true - pred) ** 2).sum() / sst) if sst > 0 else float("nan")


def de_genes(adata, cell_line: str, drug: str, n: int = 50, method: str = "t-test") -> np.ndarray:
    """Indices of the top-n DE genes of `drug` vs vehicle in `cell_line` (scanpy rank_genes_groups, t-test by
    default, ranked by score)."""
    import scanpy as sc

    obs = adata.obs
    line = (obs[S.OBS_CELL_LINE].astype(str) == cell_line).to_numpy()
    ctl = obs[S.OBS_CONTROL].to_numpy(bool)
    drg = (obs[S.OBS_DRUG].astype(str) == drug).to_numpy() & ~ctl
    sub = adata[line & (ctl | drg)].copy()
    sub.obs["_grp"] = np.where(sub.obs[S.OBS_CONTROL].to_numpy(bool), "ctl", "drug")
    sub.obs["_grp"] = sub.obs["_grp"].astype("category")
    sc.tl.rank_genes_groups(sub, "_grp", groups=["drug"], reference="ctl", method=method,
                            n_genes=sub.n_vars)
    names = [r[0] for r in sub.uns["rank_genes_groups"]["names"]]
    scores = np.abs(np.array([r[0] for r in sub.uns["rank_genes_groups"]["scores"]], float))
    order = np.argsort(-np.nan_to_num(scores), kind="stable")
    idx = adata.var_names.get_indexer([names[i] for i in order])
    return idx[:n]


def _dis(true, pred, rng, n_true, n_pred) -> float:
    t = true[rng.choice(len(true), size=min(n_true, len(true)), replace=False)]
    p = pred[rng.choice(len(pred), size=min(n_pred, len(pred)), replace=False)]
    c = 1 - cdist(t, p, metric="correlation")
    return float(np.nanmean(np.nanmax(c, axis=1)))


def paper_metrics(true, pred, de50, de10, *, n_true: int = 30, n_pred: int = 30, rng) -> dict:
    """The paper's six: Pearson of mean expression (all / DE50 / DE10) and `dis` (mean over n_true sampled true
    cells of the max Pearson to any of n_pred sampled predicted cells; the same samples for all gene sets)."""
    true = np.asarray(true, float)
    pred = np.asarray(pred, float)
    mt, mp = true.mean(0), pred.mean(0)
    ti = rng.choice(len(true), size=min(n_true, len(true)), replace=False)
    pi = rng.choice(len(pred), size=min(n_pred, len(pred)), replace=False)
    out = {}
    for suf, g in (("", slice(None)), ("_DE50", np.asarray(de50)), ("_DE10", np.asarray(de10))):
        out["mean" + suf] = pearson(mt[g], mp[g])
        with np.errstate(invalid="ignore", divide="ignore"):
            c = 1 - cdist(true[ti][:, g], pred[pi][:, g], metric="correlation")
        # a cell constant on the gene set (e.g. all 10 DE genes at 0 in a sparse cell) has no Pearson r: skipped;
        # NaN only when no true cell has one
        best = np.array([np.nanmax(r) if np.isfinite(r).any() else np.nan for r in c])
        out["dis" + suf] = float(np.nanmean(best)) if np.isfinite(best).any() else float("nan")
    return out


def energy_distance(x, y) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean, V-statistic: the within means include i=j)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())


def sound_metrics(true, pred, control, de50) -> dict:
    """logFC Pearson/R2 (all genes, DE50) of predicted vs true change from the vehicle mean; energy distance."""
    true = np.asarray(true, float)
    pred = np.asarray(pred, float)
    control = np.asarray(control, float)
    mu0 = control.mean(0)
    lt, lp = true.mean(0) - mu0, pred.mean(0) - mu0
    de50 = np.asarray(de50)
    return {"logfc_pearson": pearson(lt, lp), "logfc_r2": r2(lt, lp),
            "logfc_pearson_DE50": pearson(lt[de50], lp[de50]), "logfc_r2_DE50": r2(lt[de50], lp[de50]),
            "energy_distance": energy_distance(true, pred)}


def cosine_logfc_rank(true_logfc: dict, pred_logfc: dict) -> dict:
    """For each key, rank its predicted change among all keys' true changes by cosine similarity, normalised to
    [0, 1]: 0 = its own true change is the most similar (best), 1 = the least; a mode-collapsed model ~0.5.
    Ties count half."""
    keys = [k for k in pred_logfc if k in true_logfc]
    T = np.stack([np.asarray(true_logfc[k], float) for k in keys])
    T = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
    out = {}
    for i, k in enumerate(keys):
        p = np.asarray(pred_logfc[k], float)
        s = T @ (p / max(np.linalg.norm(p), 1e-12))
        others = np.delete(s, i)
        if len(others) == 0:
            out[k] = float("nan")
            continue
        out[k] = float(((others > s[i]).sum() + 0.5 * (others == s[i]).sum()) / len(others))
    return out


def evaluate_condition(true_cells, pred_cells, control_cells, de50, de10, rng, n_true=30, n_pred=30) -> dict:
    d = paper_metrics(true_cells, pred_cells, de50, de10, n_true=n_true, n_pred=n_pred, rng=rng)
    d.update(sound_metrics(true_cells, pred_cells, control_cells, de50))
    return d


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, rng=None):
    """(mean, lo, hi): percentile bootstrap CI of the mean over the given values (NaNs dropped)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    return float(v.mean()), float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def resolve_split(adata, split: str) -> str:
    """The obs split column for `split` ('chemcpa_ood' or 'split_chemcpa_ood'); SplitError naming the columns there
    are when neither exists."""
    from ..errors import SplitError

    if split not in adata.obs and f"{S.SPLIT_PREFIX}{split}" in adata.obs:
        split = f"{S.SPLIT_PREFIX}{split}"
    if split not in adata.obs:
        raise SplitError(f"split column {split!r} not in obs", field=split,
                         hint=f"columns: {[c for c in adata.obs if c.startswith(S.SPLIT_PREFIX)]}")
    return split


def held_out_conditions(adata, split_col: str, which: str = "test"):
    """Conditions (drug, smiles, line, dose) of the non-control cells whose split_col == which."""
    from .predictor import Condition

    o = adata.obs
    m = (o[split_col].astype(str) == which).to_numpy() & ~o[S.OBS_CONTROL].to_numpy(bool)
    g = o[m].groupby([S.OBS_DRUG, S.OBS_CELL_LINE, S.OBS_DOSE], observed=True)
    conds = []
    for (drug, line, dose), sub in g:
        conds.append(Condition(str(drug), str(sub[S.OBS_SMILES].iloc[0]), str(line), float(dose)))
    return conds


METRICS = ["mean", "mean_DE50", "mean_DE10", "dis", "dis_DE50", "dis_DE10", "logfc_pearson", "logfc_r2",
           "logfc_pearson_DE50", "logfc_r2_DE50", "cosine_rank", "energy_distance"]


def evaluate_predictor(predictor, adata, split_col: str, *, ctx, seeds=(0,), conditions="test", n_cells=None):
    """Fit on cells whose split_col == 'train' (plus all controls), predict each test condition, score it.
    One row per (condition, seed); DE genes are computed once per condition on the true cells."""
    import pandas as pd

    from ..schema import dense

    o = adata.obs
    ctl = o[S.OBS_CONTROL].to_numpy(bool)
    train = adata[ctl | (o[split_col].astype(str) == "train").to_numpy()]
    conds = held_out_conditions(adata, split_col, conditions) if isinstance(conditions, str) else list(conditions)
    X = adata.X
    rows = []
    for seed in seeds:
        from dataclasses import replace
        predictor.fit(train, replace(ctx, seed=seed, query=conds))
        rng = np.random.default_rng(seed)
        t_lfc, p_lfc, per = {}, {}, []
        for c in conds:
            line = (o[S.OBS_CELL_LINE].astype(str) == c.cell_line).to_numpy()
            cm = line & (o[S.OBS_DRUG].astype(str) == c.drug).to_numpy() & np.isclose(o[S.OBS_DOSE].to_numpy(float), c.dose_um) & ~ctl
            true = dense(X[np.flatnonzero(cm)])
            ctrl_ad = adata[line & ctl]
            control = dense(ctrl_ad.X)
            sub = adata[line & (ctl | (o[S.OBS_DRUG].astype(str) == c.drug).to_numpy() & cm)]
            de = de_genes(sub, c.cell_line, c.drug, n=50)
            pred = predictor.predict(ctrl_ad, c, n_cells or len(true), rng)
            d = evaluate_condition(true, pred, control, de[:50], de[:10], rng)
            key = (c.drug, c.cell_line, c.dose_um)
            t_lfc[key] = true.mean(0) - control.mean(0)
            p_lfc[key] = pred.mean(0) - control.mean(0)
            per.append((key, d))
        ranks = cosine_logfc_rank(t_lfc, p_lfc)
        for key, d in per:
            rows.append({"method": predictor.name, "seed": seed, "drug": key[0], "cell_line": key[1],
                         "dose_um": key[2], **d, "cosine_rank": ranks.get(key, float("nan"))})
    return pd.DataFrame(rows)


def summarize(df, n_boot: int = 1000, seed: int = 0):
    """Per method: each metric averaged over seeds and conditions within a drug, then mean over drugs with a
    bootstrap CI over drugs (columns <metric>, <metric>_lo, <metric>_hi, n_drugs)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    cols = [m for m in METRICS if m in df.columns]
    out = []
    for method, g in df.groupby("method", sort=False):
        per_drug = g.groupby("drug")[cols].mean()
        row = {"method": method, "n_drugs": len(per_drug)}
        for m in cols:
            row[m], row[m + "_lo"], row[m + "_hi"] = bootstrap_ci(per_drug[m].to_numpy(), n_boot=n_boot, rng=rng)
        out.append(row)
    return pd.DataFrame(out)


def markdown_table(summary) -> str:
    """Markdown table: the paper's six, then the sound metrics, each 'mean [lo, hi]' (95% bootstrap over drugs)."""
    cols = [m for m in METRICS if m in summary.columns]
    lines = ["| method | n_drugs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for _, r in summary.iterrows():
        cells = [f"{r[m]:.3f} [{r[m + '_lo']:.3f}, {r[m + '_hi']:.3f}]" for m in cols]
        lines.append(f"| {r['method']} | {int(r['n_drugs'])} | " + " | ".join(cells) + " |")
    lines.append("\nmean/dis*: paper's Table 2 (Pearson of mean expression; "
                 "max-Pearson distribution match). "
                 "logfc_*: change from vehicle. cosine_rank: 0 best, 0.5 chance. energy_distance: all genes, "
                 "lower is better. [lo, hi]: 95% bootstrap CI over drugs.")
    return "\n".join(lines)
