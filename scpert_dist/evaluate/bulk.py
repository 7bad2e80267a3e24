"""Real bulk benchmark: predict the level-4 L1000 signature (978 landmark z-scores) of compounds never seen in
training, in a cell line, at a dose and time, from structure. Real plates only (data.readers.l1000.read_l1000).

Modes: compound-disjoint k-fold over the given plates (a compound = the first InChIKey block of its SMILES, so a
compound under two BRD ids is one compound), or train on some plates and test on another (only test compounds absent
from training are scored). Units scored: treated wells (`trt_cp`) whose compound has a SMILES.

Methods: zero (no change), mean (training signatures at the query's time, nearest dose), knn (Tanimoto-weighted
mean of the k most similar training compounds, each at its dose nearest the query's), ridge (Morgan bits + log10
dose + time; alpha by compound-grouped inner CV on the training wells), readout (finetune/readout.py: the overall
mean + context, dose/time and Morgan blocks kept only where inner CV says they help; `readout_fit_predict`),
ours_scratch / ours_pretrained (the readout + a learned residual weighted on validation compounds, the residual's
gene vectors untrained or pretrained; `ours_fit_predict`). Metrics per signature: Pearson, Spearman, cosine, precision of the top-50 up / down genes
(a constant prediction scores r 0 and precision 50/G, as in evaluate.pseudobulk).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from ..data.drugs import inchikey_block, is_valid_smiles, morgan_fingerprints, tanimoto
from ..data.readers.compounds import lincs_compounds, name_keys
from ..data.readers.l1000 import read_l1000
from ..errors import MetadataError, SplitError
from ..finetune.readout import Readout, ReadoutConfig
from ..train.local import pretrain_in_process
from ..train.settings import Objective, OptimSection
from .metrics import pearson
from .pseudobulk import cluster_bootstrap, knn_predict

log = logging.getLogger(__name__)

BASELINES = ("zero", "mean", "knn", "ridge")
METHODS = (*BASELINES, "readout", "ours_scratch", "ours_pretrained")
SCORES = ["pearson", "spearman", "cosine", "precision_up50", "precision_down50"]
ALPHAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)


@dataclass
class BulkSet:
    """Signatures of several plates on one gene list: values [n, G], meta (sig_id, pert_id, pert_iname,
    pert_type, dose_um, time_h, plate, smiles, compound)."""

    values: np.ndarray
    meta: pd.DataFrame
    genes: list[str]


@functools.lru_cache(maxsize=4)
def _smiles_by_id(metadata: str) -> dict[str, str]:
    """BRD id (first 13 characters) -> SMILES from the LINCS pertinfo, chemCPA's and CIGER's BRD tables."""
    tables = [lincs_compounds(metadata)[["pert_id", "smiles"]]]
    extra = Path(metadata) / "drugs/ciger_lincs_drug_smiles.csv.gz"
    if extra.is_file():
        tables.append(pd.read_csv(extra, header=None, names=["pert_id", "smiles"], dtype=str))
    by_id: dict[str, str] = {}
    for t in tables:
        for pid, s in zip(t["pert_id"].astype(str), t["smiles"].fillna("").astype(str), strict=True):
            if len(s) > 3 and s != "-666":
                by_id.setdefault(pid.strip()[:13], s)
    return by_id


@functools.lru_cache(maxsize=4)
def _smiles_by_name(metadata: str) -> dict[str, str]:
    """Normalised name (and aliases) -> SMILES from the LINCS pertinfo."""
    lc = lincs_compounds(metadata, with_chemcpa=False)
    by_name: dict[str, str] = {}
    for n, s in zip(lc["pert_iname"], lc["smiles"], strict=True):
        if isinstance(s, str) and len(s) > 3 and s != "-666":
            for k in name_keys(n):
                by_name.setdefault(k, s)
    return by_name


def resolve_smiles(meta: pd.DataFrame, metadata: Path) -> tuple[pd.Series, pd.Series]:
    """(SMILES, compound key) per row: SMILES by BRD id (first 13 characters) in the drug tables, else by name;
    compound key = first InChIKey block ('' where no parsable SMILES)."""
    by_id = _smiles_by_id(str(metadata))
    smi, key = [], []
    for pid, name in zip(meta["pert_id"].astype(str), meta["pert_iname"].astype(str), strict=True):
        s = by_id.get(pid.strip()[:13])
        if not s and not pid.upper().startswith("DMSO"):
            by_name = _smiles_by_name(str(metadata))
            s = next((by_name[k] for k in name_keys(name) if k in by_name), "")
        b = inchikey_block(s) if s and is_valid_smiles(s) else ""
        smi.append(s if b else "")
        key.append(b)
    return pd.Series(smi, index=meta.index), pd.Series(key, index=meta.index)


def load_plates(paths, metadata: Path) -> BulkSet:
    """Read level-4 (or level-3 -> plate robust z) plates, keep the genes all plates share (first plate's order),
    resolve SMILES and compound keys."""
    tabs = [read_l1000(p) for p in paths]
    genes = [g for g in tabs[0].genes if all(g in set(t.genes) for t in tabs[1:])]
    if len(genes) < 100:
        raise MetadataError(f"the plates share only {len(genes)} genes", field="genes",
                            hint="give plates measured on the same (landmark) panel")
    vals, metas = [], []
    for p, t in zip(paths, tabs, strict=True):
        idx = pd.Index(t.genes).get_indexer(genes)
        vals.append(np.asarray(t.values, np.float32)[:, idx])
        m = t.meta[["sig_id", "pert_id", "pert_iname", "pert_type", "dose_um", "time_h", "plate"]].copy()
        m["source"] = Path(p).name
        metas.append(m)
    meta = pd.concat(metas, ignore_index=True)
    meta["smiles"], meta["compound"] = resolve_smiles(meta, metadata)
    return BulkSet(np.concatenate(vals), meta, genes)


def evaluable(bs: BulkSet) -> np.ndarray:
    m = bs.meta
    return ((m["pert_type"] == "trt_cp") & (m["compound"] != "") & np.isfinite(m["dose_um"].to_numpy(float))
            & (m["dose_um"].to_numpy(float) > 0)).to_numpy()


def kfold_splits(bs: BulkSet, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Compound-disjoint folds over the evaluable wells: (train rows, test rows) per fold."""
    ev = evaluable(bs)
    comps = np.array(sorted(bs.meta.loc[ev, "compound"].unique()))
    if folds < 2 or folds > len(comps):
        raise SplitError(f"{folds} folds for {len(comps)} compounds", field="--folds", hint="use 2..n_compounds folds")
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(rng.permutation(comps), np.arange(len(comps)) % folds, strict=True))
    f = bs.meta["compound"].map(fold_of).to_numpy()
    return [(np.flatnonzero(ev & (f != k)), np.flatnonzero(ev & (f == k))) for k in range(folds)]


def plate_split(bs: BulkSet, test_plate: str) -> tuple[np.ndarray, np.ndarray]:
    """Train on the wells of the other plates; test on the test plate's wells whose compound training never saw."""
    src = bs.meta["source"].astype(str)
    on = (src == test_plate) | (bs.meta["plate"].astype(str) == test_plate)
    if not on.any():
        raise SplitError(f"test plate {test_plate!r} is none of the given plates", field="--test-plate",
                         hint=f"use one of {sorted(src.unique())}")
    ev = evaluable(bs)
    train = ev & ~on.to_numpy()
    seen = set(bs.meta.loc[train, "compound"])
    test = ev & on.to_numpy() & ~bs.meta["compound"].isin(seen).to_numpy()
    return np.flatnonzero(train), np.flatnonzero(test)


# --- scores ------------------------------------------------------------------------------------------------

def signature_scores(t: np.ndarray, p: np.ndarray, k: int = 50) -> dict:
    if np.ptp(p) == 0:
        return {"pearson": 0.0, "spearman": 0.0, "cosine": 0.0, "precision_up50": k / len(t),
                "precision_down50": k / len(t)}
    up_t, dn_t = set(np.argsort(-t)[:k]), set(np.argsort(t)[:k])
    return {"pearson": pearson(t, p), "spearman": pearson(rankdata(t), rankdata(p)),
            "cosine": float(t @ p / max(np.linalg.norm(t) * np.linalg.norm(p), 1e-12)),
            "precision_up50": float(np.mean([g in up_t for g in np.argsort(-p)[:k]])),
            "precision_down50": float(np.mean([g in dn_t for g in np.argsort(p)[:k]]))}


# --- baselines ---------------------------------------------------------------------------------------------

def _ld(d) -> np.ndarray:
    return np.log10(np.asarray(d, float))


def mean_predict(Ytr, mtr: pd.DataFrame, mq: pd.DataFrame) -> np.ndarray:
    """Mean of training signatures at the query's time (nearest time when absent) and nearest log dose."""
    out = []
    times, doses = mtr["time_h"].to_numpy(float), _ld(mtr["dose_um"])
    for tq, dq in zip(mq["time_h"].to_numpy(float), _ld(mq["dose_um"]), strict=True):
        at = np.abs(times - tq) == np.abs(times - tq).min()
        dd = np.abs(doses - dq)
        sel = at & (dd <= dd[at].min() + 0.05)
        out.append(Ytr[sel].mean(0))
    return np.stack(out)


def knn_bulk_predict(Ytr, mtr: pd.DataFrame, fptr_by_comp: dict, mq: pd.DataFrame, fpq, k: int = 5) -> np.ndarray:
    """For each query: every training compound's signature closest to the query's time, then log dose (first of
    ties); the Tanimoto-weighted mean of the k most similar compounds' signatures."""
    codes, comps = pd.factorize(mtr["compound"], sort=True)
    F = np.stack([fptr_by_comp[c] for c in comps])
    sim = tanimoto(fpq, F)
    times, doses = mtr["time_h"].to_numpy(float), _ld(mtr["dose_um"])
    out = []
    for i, (tq, dq) in enumerate(zip(mq["time_h"].to_numpy(float), _ld(mq["dose_um"]), strict=True)):
        order = np.lexsort((np.abs(doses - dq), np.abs(times - tq), codes))
        first = order[np.r_[True, codes[order][1:] != codes[order][:-1]]]  # one row per compound, in code order
        out.append(knn_predict(sim[i:i + 1], Ytr[first], k=k)[0])
    return np.stack(out)


def _features(fp: np.ndarray, m: pd.DataFrame) -> np.ndarray:
    return np.column_stack([fp.astype(float), _ld(m["dose_um"]), m["time_h"].to_numpy(float) / 24.0])


def ridge_bulk_alpha(X, Y, groups, alphas=ALPHAS, folds: int = 3) -> float:
    """Alpha with the best mean Pearson in a compound-grouped inner CV on the training wells only."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GroupKFold

    best, best_s = alphas[0], -np.inf
    for a in alphas:
        s = []
        for tr, te in GroupKFold(n_splits=min(folds, len(set(groups)))).split(X, Y, groups):
            P = Ridge(alpha=a).fit(X[tr], Y[tr]).predict(X[te])
            s += [pearson(y, p) for y, p in zip(Y[te], P, strict=True)]
        if np.nanmean(s) > best_s:
            best, best_s = a, float(np.nanmean(s))
    return best


# --- our model ---------------------------------------------------------------------------------------------

@dataclass
class OursConfig:
    """Budget and size of our model in the bulk benchmark."""

    preset: str = "tiny"
    """Gene-token encoder preset (model.config.PRESETS)."""
    pretrain_steps: int = 150
    """Masked-gene pretraining steps (batch `batch`) on the fold's training signatures."""
    batch: int = 8
    fit_steps: int = 300
    """Most full-batch steps of the condition model + decoder (early stopping picks fewer)."""
    patience: int = 100
    """Stop when the validation loss has not improved for this many steps."""
    lr: float = 1e-3
    freeze_genes: bool = False
    """Keep the per-gene decoder vectors at the (pretrained or untrained) gene embeddings; only the condition side
    learns."""


def pretrain_gene_embeddings(Y: np.ndarray, cfg: OursConfig, seed: int, steps: int) -> tuple[np.ndarray, dict]:
    """Masked-gene pretraining of the package's gene-token encoder (train.local, plain torch) on the signatures Y;
    returns the gene embedding table [G, d] and what it saw. steps=0 returns the untrained (initial) table."""
    model, info = pretrain_in_process(Y, preset=cfg.preset, steps=steps, batch=cfg.batch, seed=seed,
                                      optim=OptimSection(lr=1e-3, warmup_steps=min(10, max(steps, 1))),
                                      objective=Objective(tasks="mask"))
    info["signatures"] = info.pop("rows")
    return model.encoder.gene_emb.weight.detach().clone().numpy(), info


def _fit_condition_model(X, Y, dose, gene_emb: np.ndarray, cfg: OursConfig, seed: int, val=None):
    """Train the condition model for up to cfg.fit_steps full-batch steps; with `val` = (X, Y, dose), keep the
    parameters of the step (checked every 25) with the lowest validation MSE, stopping after cfg.patience steps
    without improvement. Returns (predict function, best step)."""
    import copy

    import torch

    from ..finetune.decoders import mlp
    from ..finetune.model import ShiftHead

    torch.manual_seed(seed)
    d = gene_emb.shape[1]
    net = torch.nn.ModuleDict({"enc": mlp(X.shape[1], 64, d), "head": ShiftHead(d, Y.shape[1], 1, torch.tensor(gene_emb))})
    if cfg.freeze_genes:
        net["head"].V.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.1)

    def fwd(x, dz):
        x, dz = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(dz, dtype=torch.float32)
        return net["head"](net["enc"](x), torch.zeros(len(x), dtype=torch.long), dz)

    y = torch.as_tensor(Y, dtype=torch.float32)
    best, best_step, state = np.inf, cfg.fit_steps, None
    for step in range(cfg.fit_steps + 1):
        if val is not None and step % 25 == 0:
            with torch.no_grad():
                v = float(((fwd(val[0], val[2]) - torch.as_tensor(val[1], dtype=torch.float32)) ** 2).mean())
            if v < best:
                best, best_step, state = v, step, copy.deepcopy(net.state_dict())
            elif step - best_step >= cfg.patience:
                break
        if step == cfg.fit_steps:
            break
        opt.zero_grad()
        loss = ((fwd(X, dose) - y) ** 2).mean()
        loss.backward()
        opt.step()
    if state is not None:
        net.load_state_dict(state)

    def predict(Xq, dq):
        with torch.no_grad():
            return fwd(Xq, dq).numpy()
    return predict, best_step


RESIDUAL_WEIGHTS = (0.0, 0.25, 0.5, 1.0)
"""Weights of the learned residual on top of the readout (chosen on validation compounds; 0 allowed)."""
RESIDUAL_MIN_GAIN = 0.005
"""A weight above 0 is taken only if it beats the readout alone by this much (mean Pearson, validation wells)."""


def _context_onehot(m: pd.DataFrame, levels: list) -> np.ndarray:
    """One-hot of (time, log10 dose to 0.1) over the training contexts `levels` (an unseen context: all zeros)."""
    keys = list(zip(m["time_h"].to_numpy(float), np.round(_ld(m["dose_um"]), 1), strict=True))
    idx = {k: i for i, k in enumerate(levels)}
    out = np.zeros((len(keys), len(levels)))
    for r, k in enumerate(keys):
        if k in idx:
            out[r, idx[k]] = 1.0
    return out


def readout_fit_predict(Ytr, mtr: pd.DataFrame, Ftr, mq: pd.DataFrame, Fq, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The readout in bulk mode: base = the mean of the training signatures; kernel blocks: the context (one-hot of
    time x dose level: with it the readout becomes the per-context mean, shrunk towards the overall mean as inner CV
    says; a context absent from training falls back to the overall mean), log10 dose and time (linear), and Morgan
    bits; each kept only if compound-grouped inner CV over the training wells says it helps. Returns (predictions
    for the queries, what it kept)."""
    Ytr = np.asarray(Ytr, np.float64)
    mtr = mtr.reset_index(drop=True)
    levels = sorted(set(zip(mtr["time_h"].to_numpy(float), np.round(_ld(mtr["dose_um"]), 1), strict=True)))

    def base(tr, q):
        return np.repeat(Ytr[tr].mean(0, keepdims=True), len(q), 0)

    def blocks(m: pd.DataFrame, F: np.ndarray) -> dict:
        return {"context": _context_onehot(m, levels), "morgan": F.astype(float),
                "dose_time": np.column_stack([_ld(m["dose_um"]), m["time_h"].to_numpy(float) / 24.0])}

    r = Readout(ReadoutConfig(folds=3, seed=seed)).fit(Ytr, mtr["compound"].to_numpy(), base, kernels=blocks(mtr, Ftr))
    P = r.predict(np.repeat(Ytr.mean(0, keepdims=True), len(mq), 0), kernels=blocks(mq, Fq))
    return P, {"kept": r.report["kept"], "inner_cv": r.report["inner_cv_score"], "inner_cv_base": r.report["base_score"]}


def ours_fit_predict(Ytr, mtr: pd.DataFrame, Xtr, Ftr, mq: pd.DataFrame, Xq, Fq, gene_emb: np.ndarray,
                     cfg: OursConfig, seed: int) -> tuple[np.ndarray, dict]:
    """Ours = the readout + w * a learned residual. The residual: Morgan bits, log10 dose, time -> MLP -> drug vector
    -> the package's ShiftHead decoder (per-gene vectors initialised from `gene_emb`: pretrained or untrained), fit
    on the readout's residuals of 80% of the training compounds and stopped early on the other 20% (compound-
    disjoint, drawn with `seed`); w from RESIDUAL_WEIGHTS on those 20% (w > 0 only if it beats the readout alone by
    RESIDUAL_MIN_GAIN). The test wells are never seen. Returns (predictions, what was chosen)."""
    mtr = mtr.reset_index(drop=True)
    comps = np.array(sorted(mtr["compound"].unique()))
    rng = np.random.default_rng(seed)
    val_c = set(rng.choice(comps, size=max(1, len(comps) // 5), replace=False))
    v = mtr["compound"].isin(val_c).to_numpy()
    fit, val = np.flatnonzero(~v), np.flatnonzero(v)
    R_fit, _ = readout_fit_predict(Ytr[fit], mtr.iloc[fit], Ftr[fit], mtr.iloc[np.r_[fit, val]], Ftr[np.r_[fit, val]],
                                   seed)
    resid = Ytr[np.r_[fit, val]] - R_fit
    dose = mtr["dose_um"].to_numpy(float)
    predict, step = _fit_condition_model(Xtr[fit], resid[:len(fit)], dose[fit], gene_emb, cfg, seed,
                                         val=(Xtr[val], resid[len(fit):], dose[val]))
    base_val, nn_val = R_fit[len(fit):], predict(Xtr[val], dose[val])
    score = {w: np.nanmean([pearson(t, p) for t, p in zip(Ytr[val], base_val + w * nn_val, strict=True)])
             for w in RESIDUAL_WEIGHTS}
    w = max(RESIDUAL_WEIGHTS, key=lambda x: (score[x], -x))
    if score[w] - score[0.0] < RESIDUAL_MIN_GAIN:
        w = 0.0
    P, info = readout_fit_predict(Ytr, mtr, Ftr, mq, Fq, seed)
    if w > 0:
        P = P + w * predict(Xq, mq["dose_um"].to_numpy(float))
    return P, {**info, "residual_weight": w, "residual_steps": step}


# --- the benchmark -----------------------------------------------------------------------------------------

def _fp_by_compound(bs: BulkSet, rows: np.ndarray) -> dict[str, np.ndarray]:
    m = bs.meta.iloc[rows].drop_duplicates("compound")
    return dict(zip(m["compound"], morgan_fingerprints(m["smiles"].tolist()), strict=True))


def run_split(bs: BulkSet, train: np.ndarray, test: np.ndarray, pool: np.ndarray, *, methods=METHODS,
              seeds=(0, 1, 2), cfg: OursConfig | None = None, split: str = "") -> tuple[pd.DataFrame, dict]:
    """Fit every method on the `train` wells and score it on the `test` wells; our model's pretraining sees the
    `pool` wells (training signatures of any kind, never a test compound's). One row per (method, seed, well)."""
    cfg = cfg or OursConfig()
    overlap = set(bs.meta["compound"].iloc[train]) & set(bs.meta["compound"].iloc[test])
    if overlap:
        raise SplitError(f"{len(overlap)} compounds in both training and test", field="split",
                         hint="the split must be compound-disjoint")
    fps = _fp_by_compound(bs, np.concatenate([train, test]))
    mtr, mq = bs.meta.iloc[train], bs.meta.iloc[test]
    Ytr, Yq = bs.values[train], bs.values[test]
    Ftr = np.stack([fps[c] for c in mtr["compound"]])
    Fq = np.stack([fps[c] for c in mq["compound"]])
    Xtr, Xq = _features(Ftr, mtr), _features(Fq, mq)
    info: dict = {"train_wells": len(train), "test_wells": len(test), "train_compounds": mtr["compound"].nunique(),
                  "test_compounds": mq["compound"].nunique()}
    preds: dict[tuple[str, int], np.ndarray] = {}
    for m in methods:
        if m == "zero":
            preds[(m, 0)] = np.zeros_like(Yq)
        elif m == "mean":
            preds[(m, 0)] = mean_predict(Ytr, mtr, mq)
        elif m == "knn":
            preds[(m, 0)] = knn_bulk_predict(Ytr, mtr, fps, mq, Fq)
        elif m == "ridge":
            from sklearn.linear_model import Ridge

            a = ridge_bulk_alpha(Xtr, Ytr, mtr["compound"].to_numpy())
            info["ridge_alpha"] = a
            preds[(m, 0)] = Ridge(alpha=a).fit(Xtr, Ytr).predict(Xq)
        elif m == "readout":
            preds[(m, 0)], ri = readout_fit_predict(Ytr, mtr, Ftr, mq, Fq, seeds[0])
            info["readout_kept"] = ri["kept"]
        elif m in ("ours_scratch", "ours_pretrained"):
            if m == "ours_pretrained":  # pretrained once per split (first seed); the fits use every seed
                emb, info["pretraining"] = pretrain_gene_embeddings(bs.values[pool], cfg, seeds[0], cfg.pretrain_steps)
            for seed in seeds:
                if m == "ours_scratch":
                    emb, _ = pretrain_gene_embeddings(bs.values[pool], cfg, seed, 0)
                preds[(m, seed)], oi = ours_fit_predict(Ytr, mtr, Xtr, Ftr, mq, Xq, Fq, emb, cfg, seed)
                info.setdefault(f"{m}_residual_weight", []).append(oi["residual_weight"])
                info.setdefault(f"{m}_steps", []).append(oi["residual_steps"])
        else:
            raise MetadataError(f"unknown method {m!r}", field="--methods", hint=f"use some of {', '.join(METHODS)}")
    rows = []
    base = mq[["sig_id", "pert_iname", "compound", "dose_um", "time_h", "plate"]].reset_index(drop=True)
    for (m, seed), P in preds.items():
        sc = pd.DataFrame([signature_scores(t, p) for t, p in zip(Yq, P, strict=True)])
        rows.append(pd.concat([base, sc], axis=1).assign(method=m, seed=seed, split=split))
    return pd.concat(rows, ignore_index=True), info


def _pool(bs: BulkSet, test: np.ndarray, exclude_plate: str | None = None) -> np.ndarray:
    comps = set(bs.meta["compound"].iloc[test]) - {""}
    pids = set(bs.meta["pert_id"].iloc[test])
    ok = ~bs.meta["compound"].isin(comps) & ~bs.meta["pert_id"].isin(pids)
    if exclude_plate is not None:
        ok &= ~((bs.meta["source"] == exclude_plate) | (bs.meta["plate"] == exclude_plate))
    return np.flatnonzero(ok.to_numpy())


def run_bulk(plates, metadata: Path, *, folds: int = 5, test_plate: str | None = None, methods=METHODS,
             seeds=(0, 1, 2), cfg: OursConfig | None = None, seed: int = 0,
             only_folds=None) -> tuple[pd.DataFrame, dict]:
    """k-fold (test_plate None) or plate mode over the given plates: per-well scores of every method + info.
    `only_folds` runs a subset of the k folds (the fold assignment is unchanged), e.g. one fold per process."""
    if any(str(m).startswith("ours") for m in methods):
        import torch

        torch.set_num_threads(1)  # measured: 2 threads on 2 busy cores were 14x slower per step than 1
    bs = load_plates(plates, metadata)
    info = {"plates": [str(Path(p).name) for p in plates], "wells": len(bs.meta),
            "evaluable_wells": int(evaluable(bs).sum()),
            "trt_cp_without_smiles": int(((bs.meta["pert_type"] == "trt_cp") & (bs.meta["compound"] == "")).sum()),
            "splits": []}
    if test_plate is None:
        splits = [(f"fold{k}", tr, te, _pool(bs, te)) for k, (tr, te) in enumerate(kfold_splits(bs, folds, seed))
                  if only_folds is None or k in set(only_folds)]
    else:
        tr, te = plate_split(bs, test_plate)
        if not len(te):
            raise SplitError(f"no compound of {test_plate} is unseen in training", field="--test-plate",
                             hint="choose a test plate with compounds absent from the training plates")
        splits = [(f"plate:{test_plate}", tr, te, _pool(bs, te, test_plate))]
    out = []
    for name, tr, te, pool in splits:
        per, si = run_split(bs, tr, te, pool, methods=methods, seeds=seeds, cfg=cfg, split=name)
        info["splits"].append({"split": name, **si})
        out.append(per)
        log.info("%s: %d train / %d test wells done", name, len(tr), len(te))
    return pd.concat(out, ignore_index=True), info


def noise_reference(plates, metadata: Path) -> pd.DataFrame:
    """Reference rows from the data itself, no model: 'same_compound_neighbour_dose' predicts a well by the mean of
    the same compound's wells at the adjacent dose levels on the same plate (dose-response plates); 'same_compound
    _other_well' predicts a well by the compound's other wells on the same plate at the same dose (repeated
    compounds). Same columns as run_bulk's rows."""
    bs = load_plates(plates, metadata)
    m = bs.meta.assign(_r=np.arange(len(bs.meta)))[evaluable(bs)]
    rows = []
    for (_, _), g in m.groupby(["source", "compound"], sort=False):
        levels = np.sort(np.unique(np.round(_ld(g["dose_um"]), 2)))
        for _, w in g.iterrows():
            lv = np.round(np.log10(w["dose_um"]), 2)
            i = int(np.searchsorted(levels, lv))
            nb = [x for x in (levels[i - 1] if i > 0 else None, levels[i + 1] if i + 1 < len(levels) else None)
                  if x is not None]
            same = g[(np.round(_ld(g["dose_um"]), 2) == lv) & (g["_r"] != w["_r"])]
            near = g[np.isin(np.round(_ld(g["dose_um"]), 2), nb)]
            for name, ref in (("same_compound_neighbour_dose", near), ("same_compound_other_well", same)):
                if len(ref):
                    s = signature_scores(bs.values[w["_r"]], bs.values[ref["_r"].to_numpy()].mean(0))
                    rows.append({"sig_id": w["sig_id"], "pert_iname": w["pert_iname"], "compound": w["compound"],
                                 "dose_um": w["dose_um"], "time_h": w["time_h"], "plate": w["plate"], **s,
                                 "method": name, "seed": 0, "split": "reference"})
    return pd.DataFrame(rows)


def summarize_bulk(per: pd.DataFrame, by=("method",), metrics=SCORES) -> pd.DataFrame:
    """Mean [95% CI, compounds resampled] per group; seeds averaged per well first."""
    per = per.groupby([*by, "split", "sig_id", "compound"], sort=False)[list(metrics)].mean().reset_index()
    rows = []
    for name, sub in per.groupby(list(by), sort=False):
        r = dict(zip(by, name if isinstance(name, tuple) else (name,), strict=True))
        r.update({"wells": len(sub), "compounds": sub["compound"].nunique()})
        for mt in metrics:
            mu, lo, hi = cluster_bootstrap(sub[mt], sub["compound"])
            r[mt] = f"{mu:.3f} [{lo:.3f}, {hi:.3f}]"
        rows.append(r)
    return pd.DataFrame(rows)


def paired_bulk(per: pd.DataFrame, reference: str, metrics=("pearson", "precision_up50")) -> pd.DataFrame:
    """Each method minus `reference` on the same wells (seeds averaged), compounds resampled."""
    w = per.groupby(["method", "split", "sig_id", "compound"], sort=False)[list(metrics)].mean().reset_index()
    ref = w[w["method"] == reference].set_index(["split", "sig_id"])
    rows = []
    for name, sub in w.groupby("method", sort=False):
        if name == reference:
            continue
        s = sub.set_index(["split", "sig_id"])
        for mt in metrics:
            d = (s[mt] - ref[mt].reindex(s.index)).to_numpy()
            mu, lo, hi = cluster_bootstrap(d, s["compound"].to_numpy())
            rows.append({"method": name, "minus": reference, "metric": mt, "diff": mu, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)


def best_baseline(per: pd.DataFrame) -> str:
    b = per[per["method"].isin(["mean", "knn", "ridge"])]
    return str(b.groupby("method")["pearson"].mean().idxmax())


def dose_series_plates(per: pd.DataFrame, min_doses: int = 3) -> list[str]:
    """Plates on which the median compound was measured at >= min_doses doses (dose-response plates)."""
    n = per.drop_duplicates(["plate", "compound", "dose_um"]).groupby(["plate", "compound"]).size()
    med = n.groupby(level="plate").median()
    return sorted(med[med >= min_doses].index.astype(str))
