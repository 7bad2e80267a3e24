"""Benchmark runner: our finetuned variants (and a 'control' baseline) over seeds on held-out test drugs.

Metrics here are computed in this module (E1's metrics/baselines module had not landed when this was written):
the paper's Table 2 metrics (mean, mean_DE50, mean_DE10: Pearson of mean expression over all / top-50 / top-10 DE
genes; dis*: mean over 30 sampled true cells of the max Pearson to 30 sampled predicted cells) with DE genes ranked by
|Welch t| drug vs control in the line, plus logFC Pearson with a bootstrap CI over test conditions.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from .. import schema as S

QUICK = {"epochs": 2, "steps_per_epoch": 12, "batch": 24}  # ~2 s/step at 978 genes on 2 cores
FULL = {"epochs": 6, "steps_per_epoch": 60, "batch": 64}


def _variants(pretrained, quick: bool) -> dict[str, dict]:
    v = {"scpert_lstm_morgan_scratch": {"pretrained": "none", "model.decoder": "lstm", "model.drug_rep": "morgan"}}
    if pretrained:
        v["scpert_lstm_morgan_pretrained"] = {"pretrained": str(pretrained), "model.decoder": "lstm",
                                              "model.drug_rep": "morgan"}
    if not quick:
        v["scpert_mlp_morgan_scratch"] = {"pretrained": "none", "model.decoder": "mlp", "model.drug_rep": "morgan"}
        v["scpert_lstm_learned_scratch"] = {"pretrained": "none", "model.decoder": "lstm", "model.drug_rep": "learned"}
    return v


def _pearson(a, b) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def de_genes_t(true: np.ndarray, ctl: np.ndarray, n: int) -> np.ndarray:
    t = (true.mean(0) - ctl.mean(0)) / np.sqrt(true.var(0) / len(true) + ctl.var(0) / len(ctl) + 1e-8)
    return np.argsort(-np.abs(t))[:n]


def condition_metrics(true, pred, ctl, rng, n_sample: int = 30) -> dict:
    de50, de10 = de_genes_t(true, ctl, 50), de_genes_t(true, ctl, 10)
    out = {}
    ts = true[rng.choice(len(true), min(n_sample, len(true)), replace=False)]
    ps = pred[rng.choice(len(pred), min(n_sample, len(pred)), replace=False)]
    for tag, idx in (("", slice(None)), ("_DE50", de50), ("_DE10", de10)):
        out[f"mean{tag}"] = _pearson(true.mean(0)[idx], pred.mean(0)[idx])
        out[f"dis{tag}"] = float(np.nanmean([max(_pearson(t[idx], p[idx]) for p in ps) for t in ts]))
    cm = ctl.mean(0)
    out["logfc_pearson"] = _pearson(true.mean(0) - cm, pred.mean(0) - cm)
    out["logfc_pearson_DE50"] = _pearson((true.mean(0) - cm)[de50], (pred.mean(0) - cm)[de50])
    return out


def bootstrap_ci(v: np.ndarray, rng, n_boot: int = 1000, alpha: float = 0.05):
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    b = rng.choice(v, size=(n_boot, len(v))).mean(1)
    return float(v.mean()), float(np.quantile(b, alpha / 2)), float(np.quantile(b, 1 - alpha / 2))


def run_benchmark(data, split: str, *, shards_dir=None, pretrained=None, methods=None, seeds=(0, 1, 2),
                  quick: bool = False, out_dir, tracking_uri=None):
    import pandas as pd

    from ..config import load
    from ..errors import ConfigError
    from ..finetune.config import FinetuneConfig
    from ..finetune.predict import FinetunedPredictor
    from ..finetune.train import _dense, load_adata

    a = load_adata(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = _variants(pretrained, quick)
    e1 = _e1_baselines()
    allm = ["control", *e1, *variants]
    methods = list(methods or allm)
    bad = [m for m in methods if m not in allm]
    if bad:
        raise ConfigError(f"unknown methods {bad}", field="--methods", hint=f"available: {allm}")
    if split not in a.obs:
        from ..errors import SplitError

        raise SplitError(f"split column {split!r} not in obs", field=split)
    ctl_mask = a.obs[S.OBS_CONTROL].to_numpy(bool)
    test = a.obs[(a.obs[split].astype(str) == "test") & ~ctl_mask]
    conds = test.groupby([S.OBS_DRUG, S.OBS_CELL_LINE, S.OBS_DOSE], observed=True).size().index.tolist()
    X = _dense(a.X)
    rows, fit_s, lfc = [], {}, {}
    budget = QUICK if quick else FULL
    for m in methods:
        for seed in seeds:
            t0 = time.perf_counter()
            if m == "control":
                pass
            elif m in e1:
                from .baselines.base import FitContext

                train = a[(a.obs[split].astype(str) != "test").to_numpy()]
                pr = e1[m]().fit(train, FitContext(genes=[str(g) for g in a.var_names], lincs=None, seed=seed))
            else:
                ov = [f"{k}={v}" for k, v in {**budget, **variants[m]}.items()]
                cfg = load(FinetuneConfig, None, [*ov, f"split={split}", f"seed={seed}",
                                                  f"out={out_dir / 'models' / f'{m}_s{seed}'}"])
                pr = FinetunedPredictor(cfg, name=m).fit(a)
                fit_s[(m, seed)] = (time.perf_counter() - t0, float(np.mean([h["epoch_s"] for h in pr.result.history])))
            rng = np.random.default_rng(seed)
            for drug, line, dose in conds:
                sel = ((a.obs[S.OBS_DRUG] == drug) & (a.obs[S.OBS_CELL_LINE] == line)
                       & (a.obs[S.OBS_DOSE] == dose)).to_numpy() & ~ctl_mask
                ctl = X[ctl_mask & (a.obs[S.OBS_CELL_LINE] == line).to_numpy()]
                true = X[sel]
                if m == "control":
                    pred = ctl[rng.choice(len(ctl), len(true))]
                else:
                    smi = str(a.obs.loc[sel, S.OBS_SMILES].iloc[0]) if S.OBS_SMILES in a.obs else ""
                    cond = _Cond(str(drug), smi, str(line), float(dose))
                    pred = pr.predict(a[ctl_mask & (a.obs[S.OBS_CELL_LINE] == line).to_numpy()], cond, len(true), rng)
                if seed == seeds[0]:
                    lfc[(m, drug, line, dose)] = (true.mean(0) - ctl.mean(0), pred.mean(0) - ctl.mean(0))
                rows.append({"method": m, "seed": seed, "drug": drug, "cell_line": line, "dose_um": dose,
                             **condition_metrics(true, pred, ctl, rng)})
            print(f"benchmark: {m} seed {seed} done ({time.perf_counter() - t0:.1f}s)", flush=True)
    df = pd.DataFrame(rows)
    summary = summarize(df)
    semi = _semi_synthetic(a)
    md = markdown(summary, semi, fit_s, len(conds), seeds, split)
    (out_dir / "results.csv").write_text(df.to_csv(index=False))
    (out_dir / "benchmark.md").write_text(md)
    _scatter(lfc, out_dir / "plots")
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment("scpert-benchmark")
        with mlflow.start_run(run_name="benchmark"):
            mlflow.log_params({"split": split, "methods": ",".join(methods), "seeds": len(seeds), "quick": quick})
            mlflow.log_artifacts(str(out_dir), artifact_path="benchmark")
    return summary


def _e1_baselines() -> dict:
    """E1's simple baselines (mean_drug, random) when that module is present; {} otherwise."""
    try:
        from .baselines.simple import MeanDrugPredictor, RandomDrugsPredictor
    except ImportError:
        return {}
    return {MeanDrugPredictor.name: MeanDrugPredictor, RandomDrugsPredictor.name: RandomDrugsPredictor}


@dataclasses.dataclass
class _Cond:  # same fields as E1's Condition
    drug: str
    smiles: str
    cell_line: str
    dose_um: float


def _semi_synthetic(a) -> bool:
    u = a.uns.get(S.UNS_KEY, {}) or {}
    return bool(u.get("semi_synthetic", False)) or "scpert_simulation" in a.uns


METRICS = ["mean", "mean_DE50", "mean_DE10", "dis", "dis_DE50", "dis_DE10", "logfc_pearson", "logfc_pearson_DE50"]


def summarize(df):
    """Per method: mean over (condition) of the seed-averaged metric, with a bootstrap 95% CI over conditions."""
    import pandas as pd

    rng = np.random.default_rng(0)
    out = []
    for m, g in df.groupby("method", sort=False):
        per = g.groupby(["drug", "cell_line", "dose_um"])[METRICS].mean()
        r = {"method": m}
        for k in METRICS:
            mu, lo, hi = bootstrap_ci(per[k].to_numpy(float), rng)
            r[k], r[k + "_lo"], r[k + "_hi"] = mu, lo, hi
        out.append(r)
    return pd.DataFrame(out)


def markdown(summary, semi: bool, fit_s: dict, n_cond: int, seeds, split: str) -> str:
    head = ("# SEMI-SYNTHETIC data (simulated; not a sci-Plex3 result)\n\n" if semi else "# Benchmark\n\n")
    head += f"split `{split}`, {n_cond} held-out test conditions, seeds {list(seeds)}.\n\n"
    t = ["| method | " + " | ".join(METRICS[:6]) + " |", "|---" * 7 + "|"]
    for _, r in summary.iterrows():
        t.append(f"| {r['method']} | " + " | ".join(f"{r[k]:.3f}" for k in METRICS[:6]) + " |")
    t += ["", "| method | logFC Pearson [95% CI over conditions] | logFC Pearson DE50 [95% CI] |", "|---|---|---|"]
    for _, r in summary.iterrows():
        t.append(f"| {r['method']} | {r['logfc_pearson']:.3f} [{r['logfc_pearson_lo']:.3f}, {r['logfc_pearson_hi']:.3f}]"
                 f" | {r['logfc_pearson_DE50']:.3f} [{r['logfc_pearson_DE50_lo']:.3f}, {r['logfc_pearson_DE50_hi']:.3f}] |")
    if fit_s:
        t += ["", "| method | seed | fit s | mean epoch s |", "|---|---|---|---|"]
        t += [f"| {m} | {s} | {v[0]:.1f} | {v[1]:.2f} |" for (m, s), v in fit_s.items()]
    t += ["", "CPA comparison: skipped (E1's cpa baseline / CPA environment not available in this runner)."]
    return head + "\n".join(t) + "\n"


def _scatter(lfc: dict, out: Path) -> None:
    """Predicted vs true logFC per held-out condition (first seed), one figure per method (up to 6 conditions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for m in sorted({k[0] for k in lfc}):
        keys = [k for k in lfc if k[0] == m][:6]
        fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.6), squeeze=False)
        for ax, k in zip(axes[0], keys, strict=True):
            t, p = lfc[k]
            ax.scatter(t, p, s=4)
            ax.set_title(f"{k[1][:14]} {k[2]} {k[3]:g}uM", fontsize=6)
            ax.set_xlabel("true logFC", fontsize=6)
            ax.set_ylabel("predicted logFC", fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"logfc_scatter_{m}.png", dpi=80)
        plt.close(fig)
