"""Score pseudobulk (mean expression per drug x cell line) predictions against REAL sci-Plex3 pseudobulk, and a
leave-one-drug-out benchmark on those real responses.

Profile table format (truth and predictions alike): a Parquet/CSV/TSV table with columns `drug`, `cell_line`,
optionally `profile` (`treated_pseudobulk` | `control_pseudobulk`; absent = treated), and one numeric column per gene
(gene symbols, the truth's names); or an h5ad with obs `drug`, `cell_line` (optional `profile`) and var_names = genes.
Values are mean log-normalised expression (the truth's scale). Every (drug, cell line) of the truth must be
predicted; extra predicted rows are ignored. The vehicle profile of each condition comes from the truth file.

Metrics per condition (v = the truth's vehicle pseudobulk of that line, t = true treated, p = predicted):
  logfc_pearson / logfc_r2       Pearson / R2 of p - v vs t - v over all genes
  logfc_pearson_DE50 / _DE20     the same on the 50 / 20 genes with the largest |t - v|
  precision_up50 / _down50 (20)  fraction of the true top-k up (down) genes among the predicted top-k up (down)
  mean / mean_DE50 / mean_DE20   the paper's metric: Pearson of p vs t (mean expression; ~0.99 for p = v)
  cosine_rank                    rank of p - v among all conditions' true changes (0 best, 0.5 chance)
A prediction with no change on a gene set (p - v constant there, e.g. the null 'predict the vehicle') has no
Pearson r: it scores 0 (no association predicted), precision k/G (chance) and cosine_rank 0.5.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.drugs import morgan_fingerprints, tanimoto
from ..data.readers.compounds import name_keys, sciplex_compounds
from ..data.readers.pseudobulk import CONTROL, KEYS, TREATED, Profiles, read_profiles
from ..errors import GeneMappingError, MetadataError
from ..finetune.readout import Readout, ReadoutConfig
from .metrics import cosine_logfc_rank, pearson, r2

DE_SIZES = (50, 20)
METRICS = ["logfc_pearson", "logfc_r2", "logfc_pearson_DE50", "logfc_pearson_DE20", "precision_up50",
           "precision_down50", "precision_up20", "precision_down20", "mean", "mean_DE50", "mean_DE20", "cosine_rank"]


def align(pred: Profiles, truth: Profiles, path: str = "predictions") -> np.ndarray:
    """Predicted treated profiles in the order of truth's treated rows and genes ([n_cond, G])."""
    col = pd.Index(pred.genes).get_indexer(truth.genes)
    if (col < 0).any():
        miss = [g for g, c in zip(truth.genes, col, strict=True) if c < 0]
        raise GeneMappingError(f"{len(miss)} truth genes missing from the predictions (first: {miss[:3]})",
                               path=path, field="genes", hint="predict every gene of the truth table")
    tp = pred.select(TREATED)
    idx = pd.MultiIndex.from_frame(tp.keys[KEYS]).get_indexer(pd.MultiIndex.from_frame(truth.keys[KEYS]))
    if (idx < 0).any():
        k = truth.keys[KEYS].iloc[int(np.flatnonzero(idx < 0)[0])].tolist()
        raise MetadataError(f"{int((idx < 0).sum())} conditions not predicted (first: {k})", path=path,
                            field="drug,cell_line", hint="predict every (drug, cell_line) of the truth")
    return tp.values[idx][:, col]


def _precision(t: np.ndarray, p: np.ndarray, k: int, sign: int) -> float:
    top_t = set(np.argsort(-sign * t, kind="stable")[:k])
    top_p = np.argsort(-sign * p, kind="stable")[:k]
    return float(np.mean([g in top_t for g in top_p]))


def _r_or_zero(t: np.ndarray, p: np.ndarray) -> float:
    """Pearson r; 0 when the prediction is constant (no change predicted)."""
    return 0.0 if np.ptp(p) == 0 else pearson(t, p)


def condition_scores(t: np.ndarray, p: np.ndarray, v: np.ndarray) -> dict:
    """The metrics of one condition (see the module docstring)."""
    lt, lp = t - v, p - v
    flat = np.ptp(lp) == 0
    out = {"logfc_pearson": _r_or_zero(lt, lp), "logfc_r2": r2(lt, lp), "mean": pearson(t, p)}
    order = np.argsort(-np.abs(lt), kind="stable")
    for k in DE_SIZES:
        de = order[:k]
        out[f"logfc_pearson_DE{k}"] = _r_or_zero(lt[de], lp[de])
        out[f"mean_DE{k}"] = pearson(t[de], p[de])
        out[f"precision_up{k}"] = k / len(lt) if flat else _precision(lt, lp, k, 1)
        out[f"precision_down{k}"] = k / len(lt) if flat else _precision(lt, lp, k, -1)
    return out


def score_arrays(keys: pd.DataFrame, true: np.ndarray, pred: np.ndarray, vehicle: np.ndarray) -> pd.DataFrame:
    """One row per condition: keys + METRICS."""
    rows = [condition_scores(true[i], pred[i], vehicle[i]) for i in range(len(keys))]
    ranks = cosine_logfc_rank({i: true[i] - vehicle[i] for i in range(len(keys))},
                              {i: pred[i] - vehicle[i] for i in range(len(keys))})
    for i, r in enumerate(rows):
        r["cosine_rank"] = ranks[i]
    return pd.concat([keys[KEYS].reset_index(drop=True), pd.DataFrame(rows)[METRICS]], axis=1)


def truth_arrays(truth: Profiles) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(keys, treated [n, G], vehicle [n, G]) of a truth table: each treated row with its line's vehicle row."""
    tr, ct = truth.select(TREATED), truth.select(CONTROL)
    if not len(tr.keys) or not len(ct.keys):
        raise MetadataError(f"truth needs '{TREATED}' and '{CONTROL}' rows in column profile", field="profile",
                            hint="give the real pseudobulk table (treated and vehicle rows)")
    vidx = pd.MultiIndex.from_frame(ct.keys[KEYS]).get_indexer(pd.MultiIndex.from_frame(tr.keys[KEYS]))
    by_line = {ln: i for i, ln in enumerate(ct.keys["cell_line"])}
    vidx = np.array([j if j >= 0 else by_line.get(ln, -1) for j, ln in zip(vidx, tr.keys["cell_line"], strict=True)])
    if (vidx < 0).any():
        raise MetadataError("a treated line has no vehicle profile", field="profile",
                            hint="add a control_pseudobulk row per cell line")
    return tr.keys, tr.values, ct.values[vidx]


def score_pseudobulk(truth_path: str | Path, pred_path: str | Path) -> pd.DataFrame:
    """Score a prediction table against the truth table: one row per (drug, cell line)."""
    truth = read_profiles(truth_path)
    keys, t, v = truth_arrays(truth)
    p = align(read_profiles(pred_path), Profiles(keys.assign(profile=TREATED), t, truth.genes), str(pred_path))
    return score_arrays(keys, t, p, v)


def cluster_bootstrap(values, groups, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): 95% percentile CI of the mean, resampling whole groups (drugs) with replacement; the three
    lines of a drug are not independent, so conditions are not resampled one by one."""
    v = np.asarray(values, float)
    g = np.asarray(groups)
    ok = np.isfinite(v)
    v, g = v[ok], g[ok]
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    uniq = np.unique(g)
    sums = np.array([v[g == u].sum() for u in uniq])
    cnts = np.array([(g == u).sum() for u in uniq], float)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    means = sums[draw].sum(1) / cnts[draw].sum(1)
    return float(v.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarize(per: pd.DataFrame, metrics=("logfc_pearson", "logfc_pearson_DE50", "precision_up50",
                                          "precision_down50", "mean", "cosine_rank"),
              by: str = "method", group: str = "drug") -> pd.DataFrame:
    """Mean and drug-bootstrap CI of each metric per `by` value (a 'method' column, or one block when absent);
    with a 'seed' column, seeds are averaged per condition first and their count reported."""
    per = per if by in per.columns else per.assign(**{by: "predictions"})
    rows = []
    for name, sub in per.groupby(by, sort=False):
        n_seeds = sub["seed"].nunique() if "seed" in sub.columns else 1
        sub = sub.groupby(["drug", "cell_line"], sort=False)[list(metrics)].mean().reset_index()
        r = {by: name, "n": len(sub), "seeds": n_seeds}
        for m in metrics:
            mu, lo, hi = cluster_bootstrap(sub[m], sub[group])
            r[m] = f"{mu:.3f} [{lo:.3f}, {hi:.3f}]"
        rows.append(r)
    return pd.DataFrame(rows)


def paired_vs(per: pd.DataFrame, reference: str, metric: str = "logfc_pearson", group: str = "drug",
              keys=("drug", "cell_line")) -> pd.DataFrame:
    """Each method minus `reference` on the same conditions (seeds averaged first), drug-bootstrap CI."""
    m = per.groupby(["method", *keys], sort=False)[metric].mean().reset_index()
    ref = m[m["method"] == reference].set_index(list(keys))[metric]
    rows = []
    for name, sub in m.groupby("method", sort=False):
        if name == reference:
            continue
        s = sub.set_index(list(keys))[metric]
        d = (s - ref.reindex(s.index)).to_numpy()
        mu, lo, hi = cluster_bootstrap(d, s.index.get_level_values(group))
        rows.append({"method": name, "minus": reference, "metric": metric, "diff": mu, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


# --- leave-one-drug-out on the real responses ---------------------------------------------------------------

LODO_METHODS = ("zero", "mean", "knn", "ridge", "readout", "ours")


def drug_smiles(names, metadata: str | Path) -> list[str]:
    """SMILES of sci-Plex3 drugs by name (the design table; aliases and salts in names tolerated, salts stripped
    later by the featuriser)."""
    table = sciplex_compounds(metadata)
    by_key: dict[str, str] = {}
    for n, s in zip(table["name"], table["SMILES"], strict=True):
        for k in name_keys(n):
            by_key.setdefault(k, s)
    out = []
    for n in names:
        s = next((by_key[k] for k in name_keys(n) if k in by_key), None)
        if s is None:
            raise MetadataError(f"no SMILES for drug {n!r} in the sci-Plex3 design table", field="drug",
                                hint="check the drug name against sciplex3_hash_design_SupplTable3")
        out.append(s)
    return out


def knn_predict(sim: np.ndarray, Y: np.ndarray, k: int = 3) -> np.ndarray:
    """Tanimoto-weighted mean of the k most similar training rows. sim [n_test, n_train], Y [n_train, ...]."""
    out = []
    for s in np.atleast_2d(sim):
        top = np.argsort(-s, kind="stable")[:k]
        w = s[top] if s[top].sum() > 0 else np.ones(len(top))
        out.append(np.tensordot(w / w.sum(), Y[top], axes=1))
    return np.stack(out)


def ours_fit_predict(fp: np.ndarray, Y: np.ndarray, fq: np.ndarray, *, seed: int = 0, steps: int = 400,
                     d: int = 32, lr: float = 3e-3) -> np.ndarray:
    """Our condition model in pseudobulk mode: Morgan bits -> MLP drug vector; cell-line embedding; the package's
    ShiftHead decoder over genes (a line response shared by drugs + drug vector . per-gene vectors, modulated
    by the line). Trained on the mean logFC profiles Y [n_drugs, n_lines, G] (full batch, AdamW); returns
    predictions for the query drugs fq [n_q, bits] in every line."""
    import torch

    from ..finetune.decoders import mlp
    from ..finetune.model import ShiftHead

    torch.manual_seed(seed)
    n, L, G = Y.shape
    enc, head = mlp(fp.shape[1], 64, d), ShiftHead(d, G, L)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=lr, weight_decay=1e-2)
    x = torch.tensor(np.repeat(fp, L, axis=0), dtype=torch.float32)
    line = torch.tensor(np.tile(np.arange(L), n))
    dose = torch.full((n * L,), 10.0)
    y = torch.tensor(Y.reshape(n * L, G), dtype=torch.float32)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((head(enc(x), line, dose) - y) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xq = torch.tensor(np.repeat(fq, L, axis=0), dtype=torch.float32)
        lq = torch.tensor(np.tile(np.arange(L), len(fq)))
        return head(enc(xq), lq, torch.full((len(fq) * L,), 10.0)).numpy().reshape(len(fq), L, G)


RESIDUAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
"""Weights of the learned residual on top of the readout, chosen by inner CV over the training drugs (0 allowed)."""
RESIDUAL_MIN_GAIN = 0.005
"""A residual weight above 0 is taken only if it beats the readout alone by this much in inner CV (mean logFC r):
the simpler model wins ties and near-ties."""


def _flat_base(Yf: np.ndarray):
    return lambda tr, q: np.repeat(Yf[tr].mean(0, keepdims=True), len(q), 0)


def readout_fit(fp: np.ndarray, Yf: np.ndarray, rows: np.ndarray, seed: int = 0, select: bool = True) -> Readout:
    """The readout on drug rows `rows`: response of a drug = its flattened logFC over lines x genes, base = the
    mean of the training drugs, one kernel block of Morgan bits, its weight (and with `select`, whether it is kept
    at all) by inner leave-one-drug-out over the training drugs. select=False is the ridge baseline (ridge on Morgan
    bits with its penalty by inner leave-one-drug-out: the readout with that one block is ridge, tested)."""
    cfg = ReadoutConfig(folds=max(2, len(rows)), seed=seed, select=select)
    return Readout(cfg).fit(Yf[rows], rows, _flat_base(Yf[rows]), kernels={"morgan": fp[rows].astype(float)})


def readout_predict(r: Readout, fp: np.ndarray, Yf: np.ndarray, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    base = np.repeat(Yf[rows].mean(0, keepdims=True), len(q), 0)
    return r.predict(base, kernels={"morgan": fp[q].astype(float)})


def ours_predict(fp: np.ndarray, Y: np.ndarray, test: int, *, seed: int = 0, steps: int = 400) -> tuple[np.ndarray, dict]:
    """Ours = the readout + w * a learned residual (`ours_fit_predict` on the readout's training residuals); w from
    RESIDUAL_WEIGHTS by inner cross-validation over the training drugs (w = 0: the readout alone). Y[test] is never
    read. Returns ([n_lines, G], what was chosen)."""
    n, L, G = Y.shape
    Yf = Y.reshape(n, -1)
    tr = np.flatnonzero(np.arange(n) != test)
    # inner folds over the training drugs: readout + residual fit without the inner test drugs
    k = min(5, len(tr))
    fold = np.random.default_rng(seed).permutation(len(tr)) % k
    scores = {w: [] for w in RESIDUAL_WEIGHTS}
    for j in range(k):
        itr, ite = tr[fold != j], tr[fold == j]
        r = readout_fit(fp, Yf, itr, seed)
        R = Yf[itr] - readout_predict(r, fp, Yf, itr, itr)
        res = ours_fit_predict(fp[itr], R.reshape(len(itr), L, G), fp[ite], seed=seed, steps=steps).reshape(len(ite), -1)
        base = readout_predict(r, fp, Yf, itr, ite)
        for w in RESIDUAL_WEIGHTS:
            scores[w] += [pearson(p, t) for p, t in zip(base + w * res, Yf[ite], strict=True)]
    w = max(RESIDUAL_WEIGHTS, key=lambda x: (np.nanmean(scores[x]), -x))
    if np.nanmean(scores[w]) - np.nanmean(scores[0.0]) < RESIDUAL_MIN_GAIN:
        w = 0.0
    r = readout_fit(fp, Yf, tr, seed)
    pred = readout_predict(r, fp, Yf, tr, np.array([test]))
    if w > 0:
        R = Yf[tr] - readout_predict(r, fp, Yf, tr, tr)
        pred = pred + w * ours_fit_predict(fp[tr], R.reshape(len(tr), L, G), fp[test:test + 1], seed=seed,
                                           steps=steps).reshape(1, -1)
    return pred.reshape(L, G), {"kept": r.report["kept"], "residual_weight": w}


def predict_lodo(method: str, fp: np.ndarray, Y: np.ndarray, test: int, *, seed: int = 0, steps: int = 400) -> np.ndarray:
    """Predicted logFC [n_lines, G] of drug `test` from the other drugs' rows of Y [n_drugs, n_lines, G] and the
    fingerprints fp [n_drugs, bits]. Y[test] is never read."""
    tr = np.arange(len(fp)) != test
    if method == "zero":
        return np.zeros(Y.shape[1:])
    if method == "mean":
        return Y[tr].mean(0)
    if method == "knn":
        return knn_predict(tanimoto(fp[test:test + 1], fp[tr]), Y[tr])[0]
    if method in ("ridge", "readout"):
        rows = np.flatnonzero(tr)
        Yf = Y.reshape(len(Y), -1)
        r = readout_fit(fp, Yf, rows, seed, select=method == "readout")
        return readout_predict(r, fp, Yf, rows, np.array([test]))[0].reshape(Y.shape[1:])
    if method == "ours":
        return ours_predict(fp, Y, test, seed=seed, steps=steps)[0]
    if method == "residual_only":  # the learned model alone (the earlier 'ours'), for the record
        return ours_fit_predict(fp[tr], Y[tr], fp[test:test + 1], seed=seed, steps=steps)[0]
    raise MetadataError(f"unknown method {method!r}", field="method", hint=f"use some of {', '.join(LODO_METHODS)}")


def lodo_benchmark(truth_path: str | Path, metadata: str | Path, *, methods=LODO_METHODS, seeds=(0, 1, 2),
                   steps: int = 400, profiles: dict | None = None, progress: bool = False) -> pd.DataFrame:
    """Leave-one-drug-out over the truth's drugs: per (method, seed) the scores of every condition. `profiles`:
    a dict that receives (method, seed) -> (keys, true, predicted, vehicle) in the order scored. torch runs on one
    thread meanwhile (the models are tiny; on 2 busy cores more threads made them several times slower, as in the
    bulk benchmark); `progress` prints a line per method and seed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _lodo(truth_path, metadata, methods, seeds, steps, profiles, progress)
    finally:
        torch.set_num_threads(threads)


def _lodo(truth_path, metadata, methods, seeds, steps, profiles, progress) -> pd.DataFrame:
    truth = read_profiles(truth_path)
    keys, t, v = truth_arrays(truth)
    drugs = sorted(keys["drug"].unique())
    lines = sorted(keys["cell_line"].unique())
    pos = {(d, ln): i for i, (d, ln) in enumerate(zip(keys["drug"], keys["cell_line"], strict=True))}
    miss = [(d, ln) for d in drugs for ln in lines if (d, ln) not in pos]
    if miss:
        raise MetadataError(f"the truth lacks conditions {miss[:3]}", path=str(truth_path), field="drug,cell_line",
                            hint="leave-one-drug-out needs every drug in every line")
    ix = np.array([[pos[(d, ln)] for ln in lines] for d in drugs])
    Y = (t - v)[ix]
    fp = morgan_fingerprints(drug_smiles(drugs, metadata))
    out = []
    for m in methods:
        for seed in (seeds if m in ("ours", "residual_only") else (0,)):
            t0 = time.perf_counter()
            pred = np.stack([predict_lodo(m, fp, Y, i, seed=seed, steps=steps) for i in range(len(drugs))])
            if progress:
                print(f"[benchmark] leave-one-drug-out {m} seed {seed}: {len(drugs)} drugs x {len(lines)} lines "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            p = pred.reshape(-1, Y.shape[-1]) + v[ix.ravel()]
            per = score_arrays(keys.iloc[ix.ravel()], t[ix.ravel()], p, v[ix.ravel()])
            out.append(per.assign(method=m, seed=seed))
            if profiles is not None:
                profiles[(m, seed)] = (keys.iloc[ix.ravel()], t[ix.ravel()], p, v[ix.ravel()])
    return pd.concat(out, ignore_index=True)
