"""The accuracy benchmark (`scpert benchmark`; its table is the one RESULTS.md and the README report): the baselines
(registry.PREDICTORS) and our finetuned variants over seeds on held-out test drugs, scored with
`scpert_dist.evaluate.metrics` (the paper's six, logFC Pearson/R2, cosine-logFC rank within (line, dose),
unbiased energy distance; 95% bootstrap CI over drugs; per-dose table; paired CIs against the best baseline).

Methods: control, mean_drug, random, ridge, knn_lincs (needs LINCS shards), cvae; cpa only when the cpa baseline and
its environment exist (otherwise a stated skip); scpert_<decoder>_<drug rep>_<pretrained|scratch>. Reference rows:
null (drug-agnostic floor), oracle (the simulator's truth; simulated data only, else a stated skip), ceiling (the
split-half noise ceiling). quick = the demo: a few key methods, small finetune budget. Our model is trained on
'train' drugs and early-stopped on 'valid' drugs (the baselines are fit on the 'train' cells); test drugs are never
seen by any method. Every method sees only the FIT half of the vehicle cells; the metrics use the SCORE half
(`metrics.vehicle_halves`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema as S
from ..config import with_overrides
from ..data.shards.signatures import LincsSignatures
from ..errors import ConfigError, SplitError
from ..finetune.config import FinetuneConfig
from ..finetune.data import load_adata
from ..registry import PREDICTORS
from ..tracking import Tracker
from . import field_metrics as FM
from . import metrics as M
from .plots import logfc_scatter_grid, methods_bar, umap_true_vs_pred
from .predictor import FitContext
from .reference import OraclePredictor, find_simulation

QUICK = {"optim.epochs": 1, "optim.steps_per_epoch": 10, "optim.batch_size": 64, "optim.cond_steps": 150,
         "threads": 1}
FULL = {"optim.epochs": 3, "optim.steps_per_epoch": 40, "optim.batch_size": 64, "optim.cond_steps": 300,
        "threads": 1}
"""Finetuning budgets of our variants (FinetuneConfig fields): the demo's quick one and the full one."""
QUICK_BASELINES = ["null", "control", "mean_drug", "ridge", "knn_lincs"]
REFERENCE = {"null", "oracle", "ceiling"}
"""Rows that bracket the methods; never the 'best baseline' of the paired comparison."""
PLOT_CONDITIONS = 6
# predicted cells per condition: with only 8 true cells per condition (default simulation), predicting 8 cells
# resampled from controls adds noise larger than most drug effects (measured, 2 seeds: mean_drug logFC r 0.027 with
# 8 predicted cells vs 0.144 for its noiseless mean shift against the same observed logFC)
PRED_CELLS = 128


QUICK_DECODER = "factor"
"""The decoder of the quick default variants (the default decoder); the LSTM variants run when named or in full."""


def variants(pretrained, quick: bool, shards_dir=None) -> dict[str, dict]:
    """Our finetuned variants: scpert_<decoder>_<drug rep>_<pretrained|scratch> -> FinetuneConfig changes.
    Pretrained ones start from `pretrained` (a pretraining run or folder); *_lincs_* encode each drug's LINCS
    signature with it (drugs LINCS never measured: the structure -> representation map), so they need the shards."""
    def ours(dec: str, rep: str, pre, **more) -> dict:
        return {"model.pretrained": str(pre) if pre else "none", "model.decoder": dec, "model.drug_rep": rep, **more}

    v = {}
    for dec in (QUICK_DECODER, "lstm"):
        if pretrained:
            v[f"scpert_{dec}_morgan_pretrained"] = ours(dec, "morgan", pretrained)
            if shards_dir:
                v[f"scpert_{dec}_lincs_pretrained"] = ours(dec, "lincs", pretrained,
                                                           **{"data.lincs_shards": str(shards_dir)})
        v[f"scpert_{dec}_morgan_scratch"] = ours(dec, "morgan", None)
    if not quick:
        tag = "pretrained" if pretrained else "scratch"
        v[f"scpert_mlp_morgan_{tag}"] = ours("mlp", "morgan", pretrained)
        v[f"scpert_lstm_descriptors_{tag}"] = ours("lstm", "descriptors", pretrained)
        v[f"scpert_lstm_morgan_{tag}_noshift"] = ours("lstm", "morgan", pretrained, **{"model.shift_head": False})
    return v


def method_names(quick: bool) -> list[str]:
    """Every method name the benchmark knows (without importing any method): the registered predictors, our
    variants (as with a pretraining and shards) and the reference rows."""
    return [*PREDICTORS, *variants("pretrained", quick, "shards"), "oracle", "ceiling"]


class FinetuneMethod:
    """Our model as a benchmark method (the `Predictor` contract): `fit` finetunes on the data per the config (the
    training drugs; early stopping on its validation drugs; test drugs never seen) with the fit's seed, `predict`
    is the trained model's `FinetunedPredictor`."""

    def __init__(self, cfg: FinetuneConfig, name: str, data=None):
        """data: the full AnnData (optional). Training then uses its 'train' drugs and early-stops on its 'valid'
        drugs (test cells are never used); without it, fit's `train` AnnData is all it sees."""
        self.cfg, self.name, self.data = cfg, name, data
        self.result = self.predictor = None

    def fit(self, train, ctx=None) -> FinetuneMethod:
        from ..finetune.predict import FinetunedPredictor
        from ..finetune.train import run_finetune

        cfg = dataclasses.replace(self.cfg, seed=getattr(ctx, "seed", self.cfg.seed))
        self.result = run_finetune(cfg, self.data if self.data is not None else train, log_mlflow=False)
        self.predictor = FinetunedPredictor.load(self.result.model_dir, name=self.name)
        return self

    def predict(self, controls, cond, n_cells: int, rng: np.random.Generator) -> np.ndarray:
        return self.predictor.predict(controls, cond, n_cells, rng)

    @property
    def n_fallback(self):
        return None if self.predictor is None else self.predictor.n_fallback


def scratch_of(method: str) -> str | None:
    """The scratch counterpart of a pretrained variant (same decoder, Morgan bits: a model without pretraining has
    no encoder to read LINCS signatures with), else None."""
    parts = method.split("_")
    if len(parts) != 4 or parts[0] != "scpert" or parts[3] != "pretrained":
        return None
    return f"scpert_{parts[1]}_morgan_scratch"


def baseline_classes() -> dict:
    """Every registered predictor class by name (registry.PREDICTORS: the drug-agnostic null, then the baselines)."""
    return {name: PREDICTORS[name] for name in PREDICTORS}


SKIPPED_ALWAYS = {"scpert_*_learned_*": "the 'learned' drug table cannot represent drugs unseen in finetuning "
                                        "(every test drug is unseen), so it is not benchmarked on held-out drugs"}


def _choose_methods(methods, quick: bool, base: dict, variants: dict) -> tuple[list[str], dict]:
    """The methods to run (asked for, or the quick/full default) and the ones skipped, with why."""
    allm = [*base, *variants, "oracle", "ceiling"]
    explicit = bool(methods)
    if methods:
        methods = list(methods)
    elif quick:
        methods = ([m for m in QUICK_BASELINES if m in base] + [v for v in variants if f"_{QUICK_DECODER}_" in v]
                   + ["oracle", "ceiling"])
    else:
        methods = ([m for m in base if m != "cpa"] + list(variants) + (["cpa"] if "cpa" in base else [])
                   + ["oracle", "ceiling"])
    bad = [m for m in methods if m not in allm]
    if bad:
        raise ConfigError(f"unknown methods {bad}", field="--methods", hint=f"available: {allm}")
    skipped = dict(SKIPPED_ALWAYS)
    if "cpa" in methods and not base["cpa"].available():
        if explicit:
            raise ConfigError("method 'cpa' asked for, but there is no CPA environment", field="--methods",
                              hint="run `scpert baselines setup cpa` (Python 3.10 + cpa-tools) first")
        methods.remove("cpa")
        skipped["cpa"] = ("no CPA environment (cpa-tools needs Python < 3.11): run `scpert baselines setup cpa` to "
                          "add the CPA row")
    elif quick and not explicit:
        skipped["cpa"] = ("not in the quick demo (CPA trains for minutes); `scpert benchmark` runs it once "
                          "`scpert baselines setup cpa` has made its Python 3.10 environment")
    return methods, skipped


def _lincs_for(methods: list[str], shards_dir, a, skipped: dict):
    """LINCS signatures for kNN (None, and knn_lincs dropped with a reason, without shards)."""
    if "knn_lincs" not in methods:
        return None
    if not shards_dir:
        methods.remove("knn_lincs")
        skipped["knn_lincs"] = "no --shards given (kNN needs the drugs' LINCS signatures)"
        return None

    return LincsSignatures.from_shards(shards_dir, [str(g) for g in a.var_names])


def _oracle_dir(methods: list[str], a, data, truth, explicit: bool, skipped: dict):
    """The simulator folder for the oracle row, or None with the oracle dropped and the reason stated (asked for
    explicitly but impossible: ConfigError)."""
    if "oracle" not in methods:
        return None
    why = None
    if not _semi_synthetic(a):
        why = "real data: there is no hidden truth to predict"
    else:
        truth = Path(truth) if truth else find_simulation(data)
        if truth is None:
            why = ("no simulator output folder found beside the data (`<folder>/simulated/`): pass --truth "
                   "<the simulate output folder>")
    if why is None:
        return truth
    if explicit:
        raise ConfigError(f"method 'oracle' asked for, but {why}", field="--methods", hint="drop 'oracle'")
    methods.remove("oracle")
    skipped["oracle"] = why
    return None


def _run_method(m: str, a, split: str, *, variants: dict, base: dict, budget: dict, lincs, seeds, out_dir: Path,
                cells: M.ScoringCells, oracle_dir=None, record: dict | None = None):
    """Fit + score one method over the seeds: (per-condition results, timing record, example predictions); its
    predicted cells go into `record` (`field_metrics.Recorder`) when given."""
    t0 = time.perf_counter()
    if m == "ceiling":
        df = M.ceiling_rows(cells)
        print(f"benchmark: ceiling (split-half, Spearman-Brown): logFC r {df['logfc_pearson'].mean():.3f}", flush=True)
        return df, {"method": m, "total_s": time.perf_counter() - t0, "per_seed_s": float("nan")}, {}
    if m in variants:
        cfg = with_overrides(FinetuneConfig(), {**budget, **variants[m], "data.split": split,
                                                "out": str(out_dir / "models" / m)})
        pr = FinetuneMethod(cfg, name=m, data=cells.without_score_vehicle())
    elif m == "oracle":
        pr = OraclePredictor(oracle_dir)
    else:
        pr = base[m]()
    ctx = FitContext(genes=[str(g) for g in a.var_names], lincs=lincs, seed=seeds[0])
    df = M.evaluate_predictor(pr if record is None else FM.Recorder(pr, record), a, split, ctx=ctx,
                              seeds=tuple(seeds), n_cells=PRED_CELLS, cells=cells)
    dt = time.perf_counter() - t0
    rec = {"method": m, "total_s": dt, "per_seed_s": dt / len(seeds)}
    if m in variants and pr.result is not None:
        h = pr.result.history
        rec["epoch_s"] = float(np.mean([r["epoch_s"] for r in h])) if h else float("nan")
        rec["train_cells_per_s"] = (budget["optim.steps_per_epoch"] * budget["optim.batch_size"]
                                    / max(rec["epoch_s"], 1e-9))
    if m == "cpa" and pr.timing:
        rec["epoch_s"] = float(pr.timing["epoch_s"])
        rec["train_cells_per_s"] = pr.timing["train_cells"] / max(pr.timing["epoch_s"], 1e-9)
    if getattr(pr, "n_fallback", None) is not None:
        rec["fallbacks"] = pr.n_fallback
    print(f"benchmark: {m} x {len(seeds)} seeds: logFC r {df['logfc_pearson'].mean():.3f} ({dt:.1f}s)", flush=True)
    return df, rec, _example_predictions(pr, cells)


def run_benchmark(data, split: str, *, shards_dir=None, pretrained=None, methods=None, seeds=(0, 1, 2),
                  quick: bool = False, out_dir, tracking_uri=None, truth=None, header: str = ""):
    """Fit + score every method over seeds; writes results.csv, summary.csv, by_dose.csv, paired.csv,
    benchmark.md, plots/; returns the summary DataFrame (one row per method, metric means with bootstrap CI over
    drugs). truth: the simulator's output folder for the oracle (default: `<data folder>/simulated/` if there).
    header: markdown put under the title (e.g. the frozen headline's settings)."""
    a = load_adata(data)
    split = M.resolve_split(a, split)
    ours = variants(pretrained, quick, shards_dir)
    base = baseline_classes()
    explicit = bool(methods)
    methods, skipped = _choose_methods(methods, quick, base, ours)
    oracle_dir = _oracle_dir(methods, a, data, truth, explicit, skipped)
    lincs = _lincs_for(methods, shards_dir, a, skipped)
    n_test = int(((a.obs[split].astype(str) == "test") & ~a.obs[S.OBS_CONTROL].to_numpy(bool)).sum())
    if n_test == 0:
        raise SplitError(f"no treated 'test' cells in {split!r}", field=split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = M.ScoringCells(a, split)
    frames, timing, examples, field = [], [], {}, []
    for m in methods:
        df, rec, examples[m] = _run_method(m, a, split, variants=ours, base=base, budget=QUICK if quick else FULL,
                                           lincs=lincs, seeds=seeds, out_dir=out_dir, cells=cells,
                                           oracle_dir=oracle_dir, record=(recorded := {}))
        frames.append(df)
        timing.append(rec)
        if recorded:
            field.append(FM.benchmark_scores(recorded, cells, m))
    df = pd.concat(frames, ignore_index=True)
    summary = M.summarize(df)
    by_dose = M.summarize_by_dose(df)
    paired = _paired(df, methods)
    pvs = pretrained_vs_scratch(df, methods)
    md = _markdown(summary, _semi_synthetic(a), timing, skipped, len(cells.conds), seeds, split,
                   by_dose=by_dose, paired=paired, header=header, pvs=pvs)
    field_summary, field_md = FM.write_tables(field, out_dir) if field else (None, "")
    md += f"\n{field_md}\n" if field_md else ""
    df.to_csv(out_dir / "results.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    by_dose.to_csv(out_dir / "by_dose.csv", index=False)
    paired.to_csv(out_dir / "paired.csv", index=False)
    if not pvs.empty:
        pvs.to_csv(out_dir / "pretrained_vs_scratch.csv", index=False)
    pd.DataFrame(timing).to_csv(out_dir / "timing.csv", index=False)
    (out_dir / "benchmark.md").write_text(md)
    plots = out_dir / "plots"
    _scatter(examples, plots)
    _umap(examples, plots)
    if tracking_uri:
        _track(tracking_uri, summary, out_dir, field_summary, split=split, methods=methods, seeds=seeds, quick=quick)
    return summary


def _track(uri: str, summary, out_dir: Path, field_summary=None, **params) -> None:
    """One MLflow run: params, each method's logFC r and field metrics (cell-eval, pertpy), the files, and one chart
    of all methods on one axis."""
    tk = Tracker.start(uri, "scpert-benchmark", run_name="benchmark", tags={"scpert.stage": "benchmark"},
                       params={**params, "methods": ",".join(params["methods"]), "seeds": len(params["seeds"])})
    tk.log_metrics({f"{r['method']}.logfc_pearson": float(r["logfc_pearson"]) for _, r in summary.iterrows()})
    if field_summary is not None:
        tk.log_metrics(FM.tracked_metrics(field_summary))
    tk.log_artifact(out_dir, "benchmark")
    tk.log_artifact(methods_bar(summary, out_dir / "plots" / "methods_logfc_pearson.png"), "plots")
    tk.end("FINISHED")


def _example_predictions(pr, cells: M.ScoringCells) -> dict:
    """Predicted + true cells for the first PLOT_CONDITIONS held-out conditions (fixed rng), for the plots; the
    prediction from the FIT vehicle cells, the change of the true cells against the SCORE vehicle cells."""
    rng = np.random.default_rng(0)
    out = {}
    for c in cells.conds[:PLOT_CONDITIONS]:
        true = cells.true[cells.key(c)]
        pred = pr.predict(cells.fit_controls[c.cell_line], c, len(true), rng)
        out[cells.key(c)] = (true, pred, cells.score_X[c.cell_line], cells.fit_X[c.cell_line])
    return out


def _paired(df, methods: list[str]):
    """Every method minus the best baseline (highest mean logFC r among the rows that are neither a reference row
    nor one of our variants), paired over drugs; plus each method as a fraction of the ceiling and of the oracle."""
    base = [m for m in methods if m not in REFERENCE and not m.startswith("scpert_")]
    if not base:
        return pd.DataFrame()
    means = df[df["method"].isin(base)].groupby("method")["logfc_pearson"].mean()
    best = str(means.idxmax())
    out = pd.concat([M.paired_differences(df, best, metric) for metric in ("logfc_pearson", "cosine_rank",
                                                                            "energy_distance")], ignore_index=True)
    for ref in ("ceiling", "oracle"):
        if ref in methods:
            f = M.fraction_of(df, ref).rename(columns={"fraction": f"of_{ref}", "lo": f"of_{ref}_lo",
                                                       "hi": f"of_{ref}_hi"})
            out = out.merge(f, on="method", how="left")
    return out


def pretrained_vs_scratch(df, methods: list[str]):
    """Each pretrained variant minus its scratch counterpart (`scratch_of`), paired over drugs (bootstrap CI) on
    logFC r, cosine_rank and energy distance, plus the per-seed differences (the same seed, split and cells for both:
    paired seeds). Empty when no pair ran."""
    pairs = [(m, scratch_of(m)) for m in methods if scratch_of(m) in methods]
    rows = []
    for m, ref in pairs:
        two = df[df["method"].isin([m, ref])]
        per_seed = two.groupby(["seed", "method"])["logfc_pearson"].mean().unstack()
        seeds = ", ".join(f"{int(s)}: {per_seed.at[s, m] - per_seed.at[s, ref]:+.3f}" for s in per_seed.index)
        for metric in ("logfc_pearson", "cosine_rank", "energy_distance"):
            d = M.paired_differences(two, ref, metric)
            rows += [dict(r, **({"per_seed": seeds} if metric == "logfc_pearson" else {}))
                     for r in d[d["method"] == m].to_dict("records")]
    return pd.DataFrame(rows)


def markdown_pretrained(pvs) -> list[str]:
    if pvs.empty:
        return []
    t = ["", "Pretrained minus scratch (the paper's claim): each pretrained variant minus the scratch model of the "
         "same decoder, paired over drugs (95% bootstrap CI), and per seed (same seed, split and cells).", "",
         "| method | scratch | logFC r diff | cosine_rank diff (lower better) | energy distance diff (lower better) | "
         "logFC r diff per seed |", "|---|---|---|---|---|---|"]
    for m, g in pvs.groupby("method", sort=False):
        g = g.set_index("metric")
        cells = [M._fmt(g.at[k, "diff"], g.at[k, "lo"], g.at[k, "hi"]) if k in g.index else "-"
                 for k in ("logfc_pearson", "cosine_rank", "energy_distance")]
        t.append(f"| {m} | {g['reference'].iloc[0]} | " + " | ".join(cells) + f" | {g.at['logfc_pearson', 'per_seed']} |")
    return t


def _semi_synthetic(a) -> bool:
    u = a.uns.get(S.UNS_KEY, {}) or {}
    return bool(u.get("semi_synthetic", False)) or "scpert_simulation" in a.uns


def _markdown_paired(paired) -> list[str]:
    if paired.empty:
        return []
    ref = paired["reference"].iloc[0]
    lf = paired[paired["metric"] == "logfc_pearson"].set_index("method")
    cr = paired[paired["metric"] == "cosine_rank"].set_index("method")
    ed = paired[paired["metric"] == "energy_distance"].set_index("method")
    fr = [c for c in ("of_ceiling", "of_oracle") if c in lf.columns]
    t = ["", f"Paired differences against the best baseline (`{ref}`, by mean logFC r): mean over drugs of each "
         "drug's difference, 95% paired bootstrap CI over drugs (the same resamples for every method). logFC r as "
         "a fraction of the ceiling / the oracle: ratio of the means over drugs, paired bootstrap CI.", "",
         f"| method | logFC r - {ref} | cosine_rank - {ref} (lower better) | energy_distance - {ref} (lower better) | "
         + " | ".join(f"logFC r {c.replace('_', ' ')}" for c in fr) + " |", "|---" * (4 + len(fr)) + "|"]
    for m in lf.index:
        cells = [M._fmt(x.at[m, "diff"], x.at[m, "lo"], x.at[m, "hi"]) if m in x.index else "-" for x in (lf, cr, ed)]
        cells += [M._fmt(lf.at[m, c], lf.at[m, c + "_lo"], lf.at[m, c + "_hi"]) for c in fr]
        t.append(f"| {m} | " + " | ".join(cells) + " |")
    return t


def _markdown(summary, semi: bool, timing, skipped: dict, n_cond: int, seeds, split: str, *, by_dose, paired,
              header: str = "", pvs=None) -> str:
    head = ("# SEMI-SYNTHETIC data (simulated; not a sci-Plex3 result)\n\n" if semi else "# Benchmark\n\n")
    head += header + (f"split `{split}`, {n_cond} held-out test conditions, seeds {list(seeds)}. Vehicle cells: "
                      "each line's split once into a FIT half (the only controls any method sees, in fit and to "
                      "predict from) and a SCORE half (used only to measure the observed change).\n\n")
    t = [M.markdown_table(summary), "", "logFC r by dose (mean over drugs, 95% bootstrap CI over drugs):", "",
         M.markdown_by_dose(by_dose), *_markdown_paired(paired),
         *(markdown_pretrained(pvs) if pvs is not None else []), "",
         "Reference rows: null = drug- and dose-agnostic shift (must be ~0); oracle = the simulator's true fold "
         "change applied to the FIT vehicle cells (count scale, re-normalised; simulated data only); ceiling = split-half logFC r of each condition's own cells, "
         "Spearman-Brown corrected (the agreement of two replicates of that size; a noiseless prediction is expected "
         "near its square root, so the oracle can exceed it).", "",
         "| method | fit+predict s (all seeds) | per seed s | training epoch s | training cells/s |",
         "|---|---|---|---|---|"]
    for r in timing:
        t.append(f"| {r['method']} | {r['total_s']:.1f} | {r['per_seed_s']:.1f} | "
                 f"{r.get('epoch_s', float('nan')):.2f} | {r.get('train_cells_per_s', float('nan')):.0f} |")
    speed = {r["method"]: r["train_cells_per_s"] for r in timing if "train_cells_per_s" in r}
    if "cpa" in speed and len(speed) > 1:
        ours = {m: v for m, v in speed.items() if m != "cpa"}
        t += ["", "Training throughput, this run, same data and machine (an epoch is a different number of cells "
              "per method, so cells/s is compared): " + ", ".join(
                  f"{m} {v / speed['cpa']:.1f}x CPA's" for m, v in ours.items())]
    fb = [f"{r['method']}: {r['fallbacks']}" for r in timing if "fallbacks" in r]
    if fb:
        t += ["", "Conditions whose drug has no LINCS signature (knn_lincs: k random training drugs instead; "
              "scpert *_lincs_*: the structure map's representation, or a zero vector without a SMILES): " + ", ".join(fb)]
    if skipped:
        t += ["", "Not run:"] + [f"- {k}: {v}" for k, v in skipped.items()]
    return head + "\n".join(t) + "\n"


def _scatter(examples: dict, out: Path) -> None:
    """Predicted vs true logFC for the example held-out conditions, one figure per method."""
    out.mkdir(parents=True, exist_ok=True)
    for m, ex in examples.items():
        if ex:
            t = {k: v[0].mean(0) - v[2].mean(0) for k, v in ex.items()}
            p = {k: v[1].mean(0) - v[3].mean(0) for k, v in ex.items()}
            logfc_scatter_grid(t, p, out / f"logfc_scatter_{m}.png", title=m)


def _umap(examples: dict, out: Path) -> None:
    """UMAP (scanpy) of true vs predicted cells of the example conditions, one figure per method."""
    out.mkdir(parents=True, exist_ok=True)
    for m, ex in examples.items():
        if ex and sum(len(v[0]) for v in ex.values()) >= 10:
            true = np.concatenate([v[0] for v in ex.values()])
            pred = np.concatenate([v[1] for v in ex.values()])
            umap_true_vs_pred(true, pred, out / f"umap_{m}.png", title=f"{m}: {len(ex)} held-out conditions")
