"""Real transfer benchmark: predict a compound's L1000 signature in a TARGET cell line, for compounds held out of
training, from what is known about it elsewhere: its structure, or its measured signature in a SOURCE cell line. The
paper's hypothesis on real data, in miniature: the CPC006 compound plate measured in A375 and in HT115 (two replicate
plates), compounds disjoint between training and test.

Units: compounds measured in both contexts (matched by BRD id, then by the first InChIKey block of the SMILES). A
compound's signature in a context is the mean over its treated wells there (plate robust z-scores, clipped at +-10);
the target's replicate plates (X1, X2) are also kept apart for the replicate ceiling. Compound-disjoint k-fold over
the shared compounds, repeated over seeds; every method is fit on the training compounds only.

Methods (each predicts the target-context signature of a test compound):
  floor       zero
  structure   mean (of the training compounds' target signatures), knn_tanimoto, ridge_morgan
  signature   identity (the source signature, scaled by least squares over training compounds), ridge_source
              (source -> target signature, alpha by inner CV), knn_source (correlation-weighted mean of the k most
              similar training compounds in source space)
  ours        readout_structure (the readout with Morgan bits), readout_signature (source signature: aligned +
              kernel block, and the encoder's embedding of it), readout_both (Morgan + signature + embedding); each
              with the embedding of an untrained encoder (scratch) and of one pretrained on the real L1000 profiles
              of `pool` (pretrained); the readout keeps only the blocks inner CV over training compounds supports
  ceiling     the target's X1 vs X2 agreement per compound (`replicate_r`) and the Spearman-Brown ceiling of
              the 2-replicate mean it is scored against (`ceiling_sb`: sqrt of the reliability 2r / (1 + r)).
Metrics per test compound over the shared genes: Pearson, Spearman, cosine, precision of the top-50 up / down genes
(evaluate.bulk.signature_scores).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.drugs import morgan_fingerprints, tanimoto
from ..data.readers.l1000 import read_l1000
from ..errors import MetadataError, SplitError
from ..finetune.readout import Readout, ReadoutConfig
from ..train.local import pretrain_in_process
from ..train.settings import Objective, OptimSection
from .bulk import SCORES, cluster_bootstrap, resolve_smiles, signature_scores
from .pseudobulk import knn_predict

log = logging.getLogger(__name__)

STRUCTURE = ("mean", "knn_tanimoto", "ridge_morgan")
SIGNATURE = ("identity", "ridge_source", "knn_source")
OURS = ("readout_structure", "readout_signature_scratch", "readout_signature_pretrained", "readout_both_scratch",
        "readout_both_pretrained")
METHODS = ("zero", *STRUCTURE, *SIGNATURE, *OURS)


@dataclass
class Context:
    """One cell line's compound signatures: values [n, G] (mean over its wells), reps [n_rep, n, G] per replicate
    plate (NaN where a compound is absent from a plate), and per-compound meta (compound key, pert_id, name,
    SMILES)."""

    line: str
    values: np.ndarray
    reps: np.ndarray
    genes: list[str]
    meta: pd.DataFrame
    plates: list[str] = field(default_factory=list)


@dataclass
class Pair:
    """Source and target signatures of the shared compounds on the shared genes (rows aligned)."""

    source: Context
    target: Context
    fingerprints: np.ndarray

    @property
    def n(self) -> int:
        return len(self.target.values)


# --- data --------------------------------------------------------------------------------------------------

def _wells(path: Path, metadata: Path) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Per-well signatures (level 3 -> robust z-scores per plate, replicate plates kept apart; level 4 as is;
    clipped to +-10), their meta (pert_id, pert_iname, pert_type, plate) and gene ids."""
    t = read_l1000(path, replicates="keep", metadata=metadata)
    return (np.clip(np.asarray(t.values, np.float64), -10, 10),
            t.meta[["pert_id", "pert_iname", "pert_type", "plate"]].astype(str).reset_index(drop=True), t.genes)


def load_context(path: str | Path, metadata: Path, line: str | None = None) -> Context:
    """A plate file -> per-compound signatures of its treated wells with a SMILES (mean over wells, and per plate)."""
    path = Path(path)
    X, meta, genes = _wells(path, metadata)
    meta = meta.copy()
    meta["smiles"], meta["compound"] = resolve_smiles(meta, metadata)
    keep = ((meta["pert_type"] == "trt_cp") & (meta["compound"] != "")).to_numpy()
    if not keep.any():
        raise MetadataError("no treated well with a SMILES", path=str(path), field="pert_type,pert_id",
                            hint="give a compound plate whose BRD ids resolve in the drug tables")
    m = meta[keep].reset_index(drop=True)
    Xk = X[keep]
    plates = sorted(m["plate"].unique())
    comps = list(dict.fromkeys(m["compound"]))
    idx = {c: np.flatnonzero(m["compound"].to_numpy() == c) for c in comps}
    values = np.stack([Xk[idx[c]].mean(0) for c in comps])
    reps = np.full((len(plates), len(comps), len(genes)), np.nan)
    for i, p in enumerate(plates):
        on = m["plate"].to_numpy() == p
        for j, c in enumerate(comps):
            sel = idx[c][on[idx[c]]]
            if len(sel):
                reps[i, j] = Xk[sel].mean(0)
    first = m.drop_duplicates("compound").set_index("compound").loc[comps].reset_index()
    return Context(line=line or path.name, values=values, reps=reps, genes=[str(g) for g in genes],
                   meta=first[["compound", "pert_id", "pert_iname", "smiles"]], plates=plates)


def make_pair(source: Context, target: Context) -> Pair:
    """The compounds and genes both contexts share, rows aligned (compound = first InChIKey block)."""
    genes = [g for g in target.genes if g in set(source.genes)]
    if len(genes) < 100:
        raise MetadataError(f"the two contexts share only {len(genes)} genes", field="genes",
                            hint="give two plates on the same (landmark) panel")
    shared = [c for c in target.meta["compound"] if c in set(source.meta["compound"])]
    if len(shared) < 10:
        raise MetadataError(f"the two contexts share only {len(shared)} compounds", field="compound",
                            hint="give two plates of the same compound plate map")

    def take(ctx: Context) -> Context:
        r = pd.Index(ctx.meta["compound"]).get_indexer(shared)
        g = pd.Index(ctx.genes).get_indexer(genes)
        return Context(ctx.line, ctx.values[np.ix_(r, g)], ctx.reps[:, r][:, :, g], genes,
                       ctx.meta.iloc[r].reset_index(drop=True), ctx.plates)

    s, t = take(source), take(target)
    fp = morgan_fingerprints(t.meta["smiles"].tolist()).astype(np.float64)
    return Pair(s, t, fp)


def reverse(pair: Pair) -> Pair:
    return Pair(pair.target, pair.source, pair.fingerprints)


def replicate_ceiling(ctx: Context) -> pd.DataFrame:
    """Per compound with two replicate plates: r(X1, X2) and the Spearman-Brown ceiling of their mean,
    sqrt(2r / (1 + r)) (0 where r <= 0). Empty without two replicate plates."""
    if ctx.reps.shape[0] < 2:
        return pd.DataFrame(columns=["compound", "replicate_r", "ceiling_sb"])
    a, b = ctx.reps[0], ctx.reps[1]
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    rows = []
    for i in np.flatnonzero(ok):
        r = float(np.corrcoef(a[i], b[i])[0, 1])
        rows.append({"compound": ctx.meta["compound"].iloc[i], "replicate_r": r,
                     "ceiling_sb": float(np.sqrt(2 * r / (1 + r))) if r > 0 else 0.0})
    return pd.DataFrame(rows)


# --- the encoder's view of a signature ---------------------------------------------------------------------

POOL_FILES = ("lincs/original/modzs_n272x978.gctx", "lincs/plates/CPC006_A375_6H_X1/gctv13_01_zs.gctx",
              "lincs/plates/LJP009_A375_24H_X1_B20/LJP009_A375_24H_X1_B20_ZSPCQNORM_n371x978.gct.gz",
              "lincs/plates/CPC006_HT115_6H_X1_X2/PRnet_demo_CPC006_HT115_6H_level3_n681x978.h5ad",
              "lincs/other/gene_id_example_data_n25x978.gctx")
"""Real L1000 files the encoder may pretrain on (those on the full landmark panel); the target's own plate is
always left out (`pretraining_pool`)."""


def pretraining_pool(metadata: Path, genes: list[str], exclude: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Every real profile of POOL_FILES on `genes` except the files in `exclude` (the target context's plates):
    (values [n, G], the files used)."""
    ex = {Path(p).resolve() for p in exclude}
    vals, used = [], []
    for rel in POOL_FILES:
        p = (Path(metadata) / rel)
        if not p.is_file() or p.resolve() in ex:
            continue
        X, _, g = _wells(p, metadata)
        idx = pd.Index([str(x) for x in g]).get_indexer(genes)
        if (idx < 0).any():
            continue
        vals.append(X[:, idx])
        used.append(rel)
    if not vals:
        raise MetadataError("no real L1000 file left to pretrain on", path=str(metadata), field="pool",
                            hint="place the public L1000 files of SOURCES.md under the metadata folder")
    return np.concatenate(vals).astype(np.float32), used


@dataclass
class TransferConfig:
    """Budget of the benchmark's encoder and its readout."""

    preset: str = "tiny"
    """Gene-token encoder preset (model.config.PRESETS)."""
    pretrain_steps: int = 300
    """Masked-gene pretraining steps on the pool (batch `batch`)."""
    batch: int = 32
    lr: float = 1e-3
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)


def train_encoder(pool: np.ndarray, cfg: TransferConfig, seed: int, steps: int):
    """The package's gene-token encoder after `steps` masked-gene steps on `pool` (0: untrained, the same
    initialisation), and what it saw (mask loss at the start and the end)."""
    optim = OptimSection(lr=cfg.lr, warmup_steps=min(20, max(steps // 10, 1)))
    model, info = pretrain_in_process(pool, preset=cfg.preset, steps=steps, batch=cfg.batch, seed=seed, optim=optim,
                                      objective=Objective(tasks="mask"))
    info["pool_profiles"] = info.pop("rows")
    return model.encoder.eval(), info


def encode(encoder, values: np.ndarray, batch: int = 128) -> np.ndarray:
    """[CLS] state || mean gene-token state of each signature (no masking): [n, 2 d_model]."""
    import torch

    out = []
    with torch.no_grad():
        for a in range(0, len(values), batch):
            h = encoder(torch.tensor(values[a:a + batch], dtype=torch.float32))
            out.append(torch.cat([h[:, 0], h[:, 1:].mean(1)], -1).numpy())
    return np.concatenate(out).astype(np.float64)


# --- methods -----------------------------------------------------------------------------------------------

def _mean_base(Y: np.ndarray):
    return lambda tr, q: np.repeat(Y[tr].mean(0, keepdims=True), len(q), 0)


def _readout(Y, tr, te, rc: ReadoutConfig, *, kernels=None, aligned=None) -> tuple[np.ndarray, dict]:
    kernels, aligned = kernels or {}, aligned or {}
    r = Readout(rc).fit(Y[tr], tr, _mean_base(Y[tr]), kernels={k: v[tr] for k, v in kernels.items()},
                        aligned={k: v[tr] for k, v in aligned.items()})
    bq = np.repeat(Y[tr].mean(0, keepdims=True), len(te), 0)
    P = r.predict(bq, kernels={k: v[te] for k, v in kernels.items()}, aligned={k: v[te] for k, v in aligned.items()})
    return P, {"kept": r.report["kept"], "weights": r.report["weights"], "inner_cv": round(r.report["inner_cv_score"], 4),
               "inner_cv_base": round(r.report["base_score"], 4)}


def knn_source(S: np.ndarray, Y: np.ndarray, tr: np.ndarray, te: np.ndarray, k: int = 5) -> np.ndarray:
    """Mean of the target signatures of the k training compounds whose source signatures correlate best with the
    query's, weighted by the (positive) correlation."""
    Sc = S - S.mean(1, keepdims=True)
    Sc /= np.maximum(np.linalg.norm(Sc, axis=1, keepdims=True), 1e-12)
    sim = np.clip(Sc[te] @ Sc[tr].T, 0, None)
    return knn_predict(sim, Y[tr], k=k)


def predict_fold(pair: Pair, tr: np.ndarray, te: np.ndarray, methods, emb: dict[str, np.ndarray],
                 rc: ReadoutConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Predictions [len(te), G] of every method for the test compounds, fit on the training compounds only."""
    Y, S, F = pair.target.values, pair.source.values, pair.fingerprints
    P, info = {}, {}
    for m in methods:
        if m == "zero":
            P[m] = np.zeros((len(te), Y.shape[1]))
        elif m == "mean":
            P[m] = np.repeat(Y[tr].mean(0, keepdims=True), len(te), 0)
        elif m == "knn_tanimoto":
            P[m] = knn_predict(tanimoto(F[te] > 0, F[tr] > 0), Y[tr], k=5)
        elif m == "ridge_morgan":
            P[m], info[m] = _readout(Y, tr, te, _no_select(rc), kernels={"morgan": F})
        elif m == "identity":
            b = float((S[tr] * Y[tr]).sum() / max((S[tr] * S[tr]).sum(), 1e-12))
            P[m] = b * S[te]
        elif m == "ridge_source":
            P[m], info[m] = _readout(Y, tr, te, _no_select(rc), kernels={"source": S})
        elif m == "knn_source":
            P[m] = knn_source(S, Y, tr, te)
        elif m == "readout_structure":
            P[m], info[m] = _readout(Y, tr, te, rc, kernels={"morgan": F})
        elif m.startswith(("readout_signature_", "readout_both_")):
            which = m.rsplit("_", 1)[1]
            kern = {"source": S, "embedding": emb[which]}
            if m.startswith("readout_both_"):
                kern["morgan"] = F
            P[m], info[m] = _readout(Y, tr, te, rc, kernels=kern, aligned={"source_identity": S})
        else:
            raise MetadataError(f"unknown method {m!r}", field="--methods", hint=f"use some of {', '.join(METHODS)}")
    return P, info


def _no_select(rc: ReadoutConfig) -> ReadoutConfig:
    return ReadoutConfig(folds=rc.folds, weights=rc.weights, min_gain=rc.min_gain, select=False, seed=rc.seed)


def folds_of(n: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if not 2 <= folds <= n:
        raise SplitError(f"{folds} folds for {n} compounds", field="--folds", hint="use 2..n_compounds folds")
    f = np.random.default_rng(seed).permutation(n) % folds
    return [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(folds)]


# --- the benchmark -----------------------------------------------------------------------------------------

def run_direction(pair: Pair, target_files: list[Path], metadata: Path, *, methods=METHODS, seeds=(0, 1, 2),
                  folds: int = 5, cfg: TransferConfig | None = None, direction: str = "") -> tuple[pd.DataFrame, dict]:
    """Per (method, seed, test compound) scores of one direction (source -> target), and what was fit."""
    cfg = cfg or TransferConfig()
    info: dict = {"direction": direction, "compounds": pair.n, "genes": len(pair.target.genes),
                  "source_plates": pair.source.plates, "target_plates": pair.target.plates}
    emb: dict[str, np.ndarray] = {}
    if any(m.endswith(("_scratch", "_pretrained")) for m in methods):
        pool, used = pretraining_pool(metadata, pair.target.genes, target_files)
        enc, info["pretraining"] = train_encoder(pool, cfg, seeds[0], cfg.pretrain_steps)
        info["pretraining"]["files"] = used
        emb["pretrained"] = encode(enc, pair.source.values)
        emb["scratch"] = encode(train_encoder(pool, cfg, seeds[0], 0)[0], pair.source.values)
    rows, kept = [], {}
    t0 = time.perf_counter()
    for seed in seeds:
        for k, (tr, te) in enumerate(folds_of(pair.n, folds, seed)):
            rc = ReadoutConfig(folds=cfg.readout.folds, weights=cfg.readout.weights, min_gain=cfg.readout.min_gain,
                               select=cfg.readout.select, seed=seed * 100 + k)
            P, fi = predict_fold(pair, tr, te, methods, emb, rc)
            for m, v in fi.items():
                kept.setdefault(m, []).append(",".join(v.get("kept", [])) or "(baseline only)")
            for m, pred in P.items():
                for j, i in enumerate(te):
                    rows.append({"direction": direction, "method": m, "seed": seed, "fold": k,
                                 "compound": pair.target.meta["compound"].iloc[i],
                                 **signature_scores(pair.target.values[i], pred[j])})
        log.info("%s: seed %d done (%.0f s)", direction, seed, time.perf_counter() - t0)
    info["readout_kept"] = {m: pd.Series(v).value_counts().to_dict() for m, v in kept.items()}
    return pd.DataFrame(rows), info


def run_transfer(a_file: str | Path, b_file: str | Path, metadata: str | Path, *, methods=METHODS,
                 seeds=(0, 1, 2), folds: int = 5, cfg: TransferConfig | None = None,
                 a_line: str | None = None, b_line: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Both directions between two plate files of the same compound plate map: (per-compound scores, replicate
    ceiling per target, info)."""
    metadata = Path(metadata)
    A = load_context(a_file, metadata, a_line)
    B = load_context(b_file, metadata, b_line)
    ab = make_pair(A, B)
    out, ceil, info = [], [], {"shared_compounds": ab.n, "shared_genes": len(ab.target.genes)}
    for pair, tgt_file, name in ((ab, Path(b_file), f"{A.line} -> {B.line}"),
                                 (reverse(ab), Path(a_file), f"{B.line} -> {A.line}")):
        per, di = run_direction(pair, [tgt_file], metadata, methods=methods, seeds=seeds, folds=folds, cfg=cfg,
                                direction=name)
        out.append(per)
        info[name] = di
        c = replicate_ceiling(pair.target)
        ceil.append(c.assign(direction=name))
    return pd.concat(out, ignore_index=True), pd.concat(ceil, ignore_index=True), info


def summarize(per: pd.DataFrame, ceiling: pd.DataFrame, metrics=SCORES) -> pd.DataFrame:
    """Mean [95% CI, compounds resampled] per direction and method (seeds averaged per compound first), with the
    replicate rows of each target below its methods."""
    w = per.groupby(["direction", "method", "compound"], sort=False)[list(metrics)].mean().reset_index()
    rows = []
    for (d, m), sub in w.groupby(["direction", "method"], sort=False):
        r = {"direction": d, "method": m, "compounds": len(sub)}
        for mt in metrics:
            mu, lo, hi = cluster_bootstrap(sub[mt].to_numpy(), sub["compound"].to_numpy())
            r[mt] = f"{mu:.3f} [{lo:.3f}, {hi:.3f}]"
        rows.append(r)
    for d, sub in ceiling.groupby("direction", sort=False):
        for col, name in (("replicate_r", "replicate X1 vs X2"), ("ceiling_sb", "ceiling (Spearman-Brown)")):
            mu, lo, hi = cluster_bootstrap(sub[col].to_numpy(), sub["compound"].to_numpy())
            rows.append({"direction": d, "method": name, "compounds": len(sub), "pearson": f"{mu:.3f} [{lo:.3f}, {hi:.3f}]"})
    return pd.DataFrame(rows)


def paired(per: pd.DataFrame, metric: str = "pearson") -> pd.DataFrame:
    """Each method minus the best structure-only baseline and minus the best signature baseline of its direction,
    paired over compounds (seeds averaged), compounds resampled."""
    w = per.groupby(["direction", "method", "compound"], sort=False)[metric].mean().unstack("method")
    rows = []
    for d, sub in w.groupby(level="direction", sort=False):
        means = sub.mean()
        refs = {grp: max((m for m in group if m in sub), key=lambda m: means[m], default=None)
                for grp, group in (("structure", STRUCTURE), ("signature", SIGNATURE))}
        for m in sub.columns:
            for grp, ref in refs.items():
                if ref is None or m == ref:
                    continue
                diff = (sub[m] - sub[ref]).to_numpy()
                mu, lo, hi = cluster_bootstrap(diff, sub.index.get_level_values("compound").to_numpy())
                rows.append({"direction": d, "method": m, "minus": f"{ref} (best {grp})", "metric": metric,
                             "diff": mu, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)
