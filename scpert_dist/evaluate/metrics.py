"""Evaluation metrics: the paper's Table 2 six, plus sound logFC/distribution metrics with bootstrap CIs.

The paper's `mean` metrics correlate predicted with true *mean expression*, which is dominated by baseline
expression (the unchanged 'control' prediction scores ~0.99). The sound metrics compare *changes from vehicle*.

Vehicle cells are split once per cell line, deterministically (`vehicle_halves`: the cells ordered by a hash of their
obs name; the first half FIT, the rest SCORE):
  - FIT vehicle cells are the only controls any method sees: in fit (every training logFC is measured against their
    mean) and as the cells it predicts from. A prediction's change is pred mean - FIT vehicle mean.
  - SCORE vehicle cells are used by the metrics only: an observed change is true mean - SCORE vehicle mean.
So the vehicle mean's noise never sits on both sides of a correlation (with one shared vehicle mean a predictor that
ignores drug and dose scored logFC r 0.04 against a floor of 0.00 on the demo's data).

Metrics per condition (drug, line, dose):
  logfc_pearson / logfc_r2 (all genes, DE50)  predicted vs observed change
  cosine_rank      rank of the predicted change among the observed changes of the conditions of the same line and
                   dose, by cosine (0 = own condition most similar, 0.5 = chance); within a (line, dose) so that the
                   line's or the dose's common response cannot rank a drug
  energy_distance  unbiased (U-statistic) energy distance between predicted and true cells (Euclidean, all genes):
                   ~0 in expectation for two samples of one population (it can be negative)
DE genes: the top genes by |t-test score| of the condition's cells vs the SCORE vehicle cells of its line.
Reference rows (`reference.py`, `split_half_ceiling`): a drug-agnostic null, the simulator's oracle, and the
split-half noise ceiling (Spearman-Brown corrected).
"""
from __future__ import annotations

import hashlib

import numpy as np
from scipy.spatial.distance import cdist

from .. import schema as S
from ..errors import SplitError, ValueRangeError
from ..schema import dense
from ..stats import logfc_pearson, pearson, r2
from .predictor import Condition


def de_genes(adata, cell_line: str, drug: str, n: int = 50, method: str = "t-test") -> np.ndarray:
    """Indices of the top-n DE genes of `drug`'s cells vs the vehicle cells of `cell_line` in `adata` (scanpy
    rank_genes_groups, t-test by default), ranked by |score| (up and down genes alike, CPA's convention)."""
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


def energy_distance_unbiased(x, y) -> float:
    """Unbiased (U-statistic) energy distance: 2 mean|x_i - y_j| - mean_{i!=j}|x_i - x_j| - mean_{i!=j}|y_i - y_j|
    (Euclidean). Its expectation is the population energy distance: 0 for two samples of one population (a value can
    be negative), where the V-statistic (the within means including i=j) is biased upwards (5.6 for two halves of a
    line's vehicle cells on the demo's data). NaN when a sample has fewer than 2 cells. (scipy.stats.energy_distance
    is 1-D only.)"""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        return float("nan")
    return float(2 * cdist(x, y).mean() - cdist(x, x).sum() / (n * (n - 1)) - cdist(y, y).sum() / (m * (m - 1)))


def sound_metrics(true, pred, control, de50, *, pred_control=None) -> dict:
    """logFC Pearson/R2 (all genes, DE50) of predicted vs observed change, and the unbiased energy distance.
    Observed change: true mean - `control` mean (the SCORE vehicle cells); predicted change: pred mean -
    `pred_control` mean (the FIT vehicle cells the method saw; default: `control`)."""
    true = np.asarray(true, float)
    pred = np.asarray(pred, float)
    mu_score = np.asarray(control, float).mean(0)
    mu_fit = mu_score if pred_control is None else np.asarray(pred_control, float).mean(0)
    mt, mp = true.mean(0), pred.mean(0)
    lt, lp = mt - mu_score, mp - mu_fit
    de50 = np.asarray(de50)
    return {"logfc_pearson": logfc_pearson(mt, mp, mu_score, mu_fit), "logfc_r2": r2(lt, lp),
            "logfc_pearson_DE50": logfc_pearson(mt[de50], mp[de50], mu_score[de50], mu_fit[de50]),
            "logfc_r2_DE50": r2(lt[de50], lp[de50]), "energy_distance": energy_distance_unbiased(true, pred)}


def spearman_brown(r: float) -> float:
    """Reliability of the full sample from the correlation r of its two halves: 2r / (1 + r)."""
    return float(2 * r / (1 + r)) if np.isfinite(r) and r > -1 else float("nan")


def split_half_ceiling(true, score_control) -> dict:
    """The noise ceiling of one condition: the condition's cells and its line's SCORE vehicle cells are each split
    in two (alternate rows); r_half = Pearson of the two halves' observed changes (half 1 - vehicle half 1 vs
    half 2 - vehicle half 2: no shared cells); logfc_pearson = its Spearman-Brown correction, the expected r of two
    independent replicates of this condition's size. A noiseless prediction of the true change is expected to reach
    about the square root of it (so the oracle can lie above the ceiling)."""
    true = np.asarray(true, float)
    ctl = np.asarray(score_control, float)
    if len(true) < 2 or len(ctl) < 2:
        return {"split_half_r": float("nan"), "logfc_pearson": float("nan")}
    a = true[0::2].mean(0) - ctl[0::2].mean(0)
    b = true[1::2].mean(0) - ctl[1::2].mean(0)
    r = pearson(a, b)
    return {"split_half_r": r, "logfc_pearson": spearman_brown(r)}


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


def cosine_rank_within(true_logfc: dict, pred_logfc: dict) -> dict:
    """`cosine_logfc_rank` within each (cell line, dose) group of keys (drug, line, dose)."""
    groups: dict[tuple, list] = {}
    for k in pred_logfc:
        if k in true_logfc:
            groups.setdefault((k[1], k[2]), []).append(k)
    out = {}
    for keys in groups.values():
        out.update(cosine_logfc_rank({k: true_logfc[k] for k in keys}, {k: pred_logfc[k] for k in keys}))
    return out


def evaluate_condition(true_cells, pred_cells, control_cells, de50, de10, rng, n_true=30, n_pred=30, *,
                       pred_control=None) -> dict:
    d = paper_metrics(true_cells, pred_cells, de50, de10, n_true=n_true, n_pred=n_pred, rng=rng)
    d.update(sound_metrics(true_cells, pred_cells, control_cells, de50, pred_control=pred_control))
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
    if split not in adata.obs and f"{S.SPLIT_PREFIX}{split}" in adata.obs:
        split = f"{S.SPLIT_PREFIX}{split}"
    if split not in adata.obs:
        raise SplitError(f"split column {split!r} not in obs", field=split,
                         hint=f"columns: {[c for c in adata.obs if c.startswith(S.SPLIT_PREFIX)]}")
    return split


def held_out_conditions(adata, split_col: str, which: str = "test"):
    """Conditions (drug, smiles, line, dose) of the non-control cells whose split_col == which."""
    o = adata.obs
    m = (o[split_col].astype(str) == which).to_numpy() & ~o[S.OBS_CONTROL].to_numpy(bool)
    g = o[m].groupby([S.OBS_DRUG, S.OBS_CELL_LINE, S.OBS_DOSE], observed=True)
    conds = []
    for (drug, line, dose), sub in g:
        conds.append(Condition(str(drug), str(sub[S.OBS_SMILES].iloc[0]), str(line), float(dose)))
    return conds


METRICS = ["mean", "mean_DE50", "mean_DE10", "dis", "dis_DE50", "dis_DE10", "logfc_pearson", "logfc_r2",
           "logfc_pearson_DE50", "logfc_r2_DE50", "cosine_rank", "energy_distance"]
VEHICLE_SPLIT_SALT = "scpert-vehicle-split-v1"
"""Part of the hash that orders each line's vehicle cells; changing it changes every benchmark number."""


def vehicle_halves(obs) -> np.ndarray:
    """Boolean mask over obs: True for the SCORE half of each line's vehicle cells (used by the metrics only); the
    other vehicle cells are the FIT half. Deterministic and independent of row order: each line's vehicle cells are
    ordered by blake2b(VEHICLE_SPLIT_SALT + obs name); the first floor(n/2) are FIT."""
    ctl = obs[S.OBS_CONTROL].to_numpy(bool)
    lines = obs[S.OBS_CELL_LINE].astype(str).to_numpy()
    names = obs.index.astype(str)
    score = np.zeros(len(obs), bool)
    for line in np.unique(lines[ctl]):
        rows = np.flatnonzero(ctl & (lines == line))
        h = [int.from_bytes(hashlib.blake2b(f"{VEHICLE_SPLIT_SALT}:{names[r]}".encode(), digest_size=8).digest(),
                            "big") for r in rows]
        order = rows[np.argsort(np.asarray(h, np.uint64), kind="stable")]
        score[order[len(order) // 2:]] = True
    return score


def condition_mask(obs, cond) -> np.ndarray:
    """The treated cells of one Condition (drug, line, dose)."""
    return ((obs[S.OBS_CELL_LINE].astype(str) == cond.cell_line).to_numpy()
            & (obs[S.OBS_DRUG].astype(str) == cond.drug).to_numpy()
            & np.isclose(obs[S.OBS_DOSE].to_numpy(float), cond.dose_um) & ~obs[S.OBS_CONTROL].to_numpy(bool))


class ScoringCells:
    """The cells one evaluation scores against, computed once per dataset and split: the held-out conditions, the
    FIT / SCORE vehicle halves, each condition's true cells and DE genes (vs the SCORE vehicle cells)."""

    def __init__(self, adata, split_col: str, conditions="test"):
        self.adata, self.split_col = adata, split_col
        o = adata.obs
        self.conds = (held_out_conditions(adata, split_col, conditions) if isinstance(conditions, str)
                      else list(conditions))
        ctl = o[S.OBS_CONTROL].to_numpy(bool)
        self.score = vehicle_halves(o)
        self.fit_ctl = ctl & ~self.score
        lines = o[S.OBS_CELL_LINE].astype(str).to_numpy()
        self.fit_controls = {ln: adata[self.fit_ctl & (lines == ln)] for ln in np.unique(lines[ctl])}
        few = sorted({c.cell_line for c in self.conds if int((ctl & (lines == c.cell_line)).sum()) < 4})
        if few:
            raise ValueRangeError(f"cell lines {few} have fewer than 4 vehicle cells", field=S.OBS_CONTROL,
                                  hint="the benchmark splits each line's vehicle cells into a FIT and a SCORE half "
                                       "(2+ each); add vehicle cells or drop those lines' conditions")
        self.score_X = {ln: dense(adata.X[np.flatnonzero(self.score & (lines == ln))]) for ln in self.fit_controls}
        self.fit_X = {ln: dense(a.X) for ln, a in self.fit_controls.items()}
        self.true, self.de = {}, {}
        for c in self.conds:
            cm = condition_mask(o, c)
            self.true[self.key(c)] = dense(adata.X[np.flatnonzero(cm)])
            self.de[self.key(c)] = de_genes(adata[cm | (self.score & (lines == c.cell_line))], c.cell_line, c.drug, n=50)

    @staticmethod
    def key(c) -> tuple:
        return (c.drug, c.cell_line, c.dose_um)

    def train(self):
        """What every method is fitted on: the 'train' treated cells and the FIT vehicle cells."""
        o = self.adata.obs
        return self.adata[self.fit_ctl | ((o[self.split_col].astype(str) == "train").to_numpy()
                                          & ~o[S.OBS_CONTROL].to_numpy(bool))]

    def without_score_vehicle(self):
        """The data with the SCORE vehicle cells removed (for methods that read the whole file themselves)."""
        return self.adata[~self.score].copy()


def evaluate_predictor(predictor, adata, split_col: str, *, ctx, seeds=(0,), conditions="test", n_cells=None,
                       cells: ScoringCells | None = None):
    """Fit on the 'train' treated cells + the FIT vehicle cells, predict each held-out condition from its line's FIT
    vehicle cells, score it against the SCORE vehicle cells (module docstring). One row per (condition, seed).
    `cells`: a ScoringCells to reuse across methods (DE genes are computed once)."""
    from dataclasses import replace

    import pandas as pd

    sc = cells if cells is not None else ScoringCells(adata, split_col, conditions)
    train = sc.train()
    rows = []
    for seed in seeds:
        predictor.fit(train, replace(ctx, seed=seed, query=sc.conds))
        rng = np.random.default_rng(seed)
        t_lfc, p_lfc, per = {}, {}, []
        for c in sc.conds:
            key = sc.key(c)
            true, de = sc.true[key], sc.de[key]
            pred = predictor.predict(sc.fit_controls[c.cell_line], c, n_cells or len(true), rng)
            d = evaluate_condition(true, pred, sc.score_X[c.cell_line], de[:50], de[:10], rng,
                                   pred_control=sc.fit_X[c.cell_line])
            t_lfc[key] = true.mean(0) - sc.score_X[c.cell_line].mean(0)
            p_lfc[key] = pred.mean(0) - sc.fit_X[c.cell_line].mean(0)
            per.append((key, d))
        ranks = cosine_rank_within(t_lfc, p_lfc)
        for key, d in per:
            rows.append({"method": predictor.name, "seed": seed, "drug": key[0], "cell_line": key[1],
                         "dose_um": key[2], **d, "cosine_rank": ranks.get(key, float("nan"))})
    return pd.DataFrame(rows)


def ceiling_rows(cells: ScoringCells):
    """The 'ceiling' rows: `split_half_ceiling` of every held-out condition (no prediction; other metrics NaN)."""
    import pandas as pd

    rows = []
    for c in cells.conds:
        d = split_half_ceiling(cells.true[cells.key(c)], cells.score_X[c.cell_line])
        rows.append({"method": "ceiling", "seed": 0, "drug": c.drug, "cell_line": c.cell_line, "dose_um": c.dose_um,
                     **d})
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


def summarize_by_dose(df, metric: str = "logfc_pearson", n_boot: int = 1000, seed: int = 0):
    """[method x dose] of `metric`: mean over drugs (of each drug's mean over seeds and lines at that dose) with a
    bootstrap CI over drugs. Long format: method, dose_um, value, lo, hi, n_drugs."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    out = []
    for (method, dose), g in df.groupby(["method", "dose_um"], sort=False):
        v = g.groupby("drug")[metric].mean().to_numpy()
        m, lo, hi = bootstrap_ci(v, n_boot=n_boot, rng=rng)
        out.append({"method": method, "dose_um": float(dose), "value": m, "lo": lo, "hi": hi, "n_drugs": len(v)})
    return pd.DataFrame(out)


def paired_differences(df, reference: str, metric: str = "logfc_pearson", n_boot: int = 1000, seed: int = 0):
    """Every method minus `reference` on `metric`: per-drug means (over seeds and conditions), differences on the
    drugs both have, mean over drugs with a paired percentile bootstrap CI (the same drug resamples for every
    method). Columns: method, reference, metric, diff, lo, hi, n_drugs."""
    import pandas as pd

    pd_ = df.groupby(["drug", "method"], sort=False)[metric].mean().unstack("method")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pd_), size=(n_boot, len(pd_)))
    out = []
    for method in pd_.columns:
        d = (pd_[method] - pd_[reference]).to_numpy()
        ok = np.isfinite(d)
        if not ok.any():
            continue
        boot = np.nanmean(np.where(ok[idx], d[idx], np.nan), axis=1)
        out.append({"method": method, "reference": reference, "metric": metric, "diff": float(np.nanmean(d)),
                    "lo": float(np.nanquantile(boot, 0.025)), "hi": float(np.nanquantile(boot, 0.975)),
                    "n_drugs": int(ok.sum())})
    return pd.DataFrame(out)


def fraction_of(df, reference: str = "ceiling", metric: str = "logfc_pearson", n_boot: int = 1000, seed: int = 0):
    """Every method's mean `metric` over drugs divided by `reference`'s, with a paired bootstrap CI over drugs.
    Columns: method, fraction, lo, hi."""
    import pandas as pd

    pd_ = df.groupby(["drug", "method"], sort=False)[metric].mean().unstack("method")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pd_), size=(n_boot, len(pd_)))
    ref = pd_[reference].to_numpy()
    out = []
    for method in pd_.columns:
        v = pd_[method].to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = np.nanmean(v[idx], axis=1) / np.nanmean(ref[idx], axis=1)
            frac = np.nanmean(v) / np.nanmean(ref)
        out.append({"method": method, "fraction": float(frac), "lo": float(np.nanquantile(boot, 0.025)),
                    "hi": float(np.nanquantile(boot, 0.975))})
    return pd.DataFrame(out)


def _fmt(v, lo, hi) -> str:
    return "-" if not np.isfinite(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(summary) -> str:
    """Markdown table: the paper's six, then the sound metrics, each 'mean [lo, hi]' (95% bootstrap over drugs)."""
    cols = [m for m in METRICS if m in summary.columns]
    lines = ["| method | n_drugs | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for _, r in summary.iterrows():
        cells = [_fmt(r[m], r[m + "_lo"], r[m + "_hi"]) for m in cols]
        lines.append(f"| {r['method']} | {int(r['n_drugs'])} | " + " | ".join(cells) + " |")
    lines.append("\nmean/dis*: paper's Table 2 (Pearson of mean expression; max-Pearson distribution match). "
                 "logfc_*: predicted change (vs the FIT vehicle half) against observed change (vs the SCORE "
                 "vehicle half, which no method sees). cosine_rank: within each (line, dose), 0 best, 0.5 chance. "
                 "energy_distance: unbiased U-statistic, all genes, lower is better, ~0 for one population. "
                 "[lo, hi]: 95% bootstrap CI over drugs. '-': not defined for that row.")
    return "\n".join(lines)


def markdown_by_dose(by_dose, metric: str = "logfc_pearson") -> str:
    """The `summarize_by_dose` table as markdown: one row per method, one column per dose."""
    doses = sorted(by_dose["dose_um"].unique())
    lines = ["| method | " + " | ".join(f"{metric} at {d:g} uM" for d in doses) + " |",
             "|---" * (len(doses) + 1) + "|"]
    for method, g in by_dose.groupby("method", sort=False):
        g = g.set_index("dose_um")
        cells = [_fmt(g.at[d, "value"], g.at[d, "lo"], g.at[d, "hi"]) if d in g.index else "-" for d in doses]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
