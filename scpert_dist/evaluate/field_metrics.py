"""The field's metrics beside ours: Arc Institute's cell-eval and pertpy's E-distance, computed by their own code
on the predictions our benchmarks score.

- cell-eval: `cell_eval.MetricsEvaluator(adata_pred, adata_real, control_pert=..., pert_col=...)
  .compute(profile="full")`: pearson_delta, mse / mae (of mean expression) and their _delta versions, the
  discrimination scores (l1, l2, cosine), pearson_edistance, clustering_agreement and the DE metrics of pdex's
  Mann-Whitney tests (overlap_at_N / precision_at_N / _50 ... _500, de_spearman_sig, de_direction_match,
  de_spearman_lfc_sig, de_sig_genes_recall, de_nsig_counts_real / _pred, pr_auc, roc_auc).
- pertpy: `pertpy.tools.Distance("edistance")(predicted cells, observed cells)` per condition, on the expression of
  all genes (pertpy's default representation is a PCA embedding; ours, `metrics.energy_distance_unbiased`, is on
  the genes: the same space here). pertpy's estimate includes each set's zero self-distances (a V-statistic, the
  biased estimator): 0 when the two sets are identical, but above 0 for two samples of one population;
  ours removes that bias.

Input (`field_metrics`): two AnnData with the same var (genes, same order) and log-normalised expression in X;
obs[pert_col] names each row's perturbation and the label `control` marks control rows; with `context_col` (the
cell line) there is one cell-eval evaluation per context, against that context's own control rows (cell-eval knows
one control per evaluation). The observed AnnData's controls are the rows the observed change is measured against,
the predicted AnnData's controls the rows the prediction started from: in `scpert benchmark` the SCORE and the FIT
vehicle halves (`metrics.vehicle_halves`), exactly as in our logFC, so cell-eval's pearson_delta and our
logfc_pearson measure the same thing (docs/field_metrics.md: where they and ours differ, and why).

Predicted expression below 0 (impossible on a log1p scale; cell-eval refuses it) is set to 0 before scoring, and
above cell-eval's log1p bound (15) to just below it; column `clipped` is the fraction of predicted values so moved.
Observed expression that is negative, all integers (raw counts: cell-eval would renormalise them itself) or at or
above 15 is refused with a named error, and so are NaN or Inf on either side.

Two modes:
  cells       single cells on both sides: everything above.
  pseudobulk  one profile per condition and one control profile per context (`scpert evaluate pseudobulk`): the
              metrics cell-eval defines on means (PSEUDOBULK_METRICS); PSEUDOBULK_SKIPPED says what is not computed
              and why.

Both libraries are imported inside the functions (cell-eval 2.5-3 s, pertpy 4-5 s more, on the shared 2-core
machine); what they print goes to the log file (`console.library_output`). Their numba kernels compile once per
process (pdex's DE 7-14 s, UMAP's neighbour graph for clustering_agreement 15-19 s; the benchmark's UMAP plots
compile the latter anyway); after that one cell line's evaluation of a small benchmark takes about a second.
"""

from __future__ import annotations

import logging
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from ..console import library_output
from ..data.readers.pseudobulk import TREATED, Profiles, read_profiles
from ..errors import GeneMappingError, MetadataError, ValueRangeError
from .pseudobulk import align, truth_arrays

CONTROL = "vehicle"
PERT = "condition"
CONTEXT = "cell_line"
LIBRARIES = ("cell-eval", "pertpy")
LOGGERS = ("cell_eval", "pdex", "pertpy", "jax", "absl", "numba", "polars", "scanpy", "anndata", "umap",
           "pynndescent", "py.warnings")
"""Loggers whose records go to the log file while the libraries run."""
LOG1P_MAX = 15.0
"""cell-eval's bound for log1p-normalised data (`cell_eval.utils.guess_is_lognorm`)."""

PSEUDOBULK_METRICS = ("pearson_delta", "mse", "mae", "mse_delta", "mae_delta", "discrimination_score_l1",
                      "discrimination_score_l2", "discrimination_score_cosine", "pearson_edistance")
"""cell-eval's metrics that are defined and informative on one profile per condition. pearson_edistance reduces to
something simpler: the E-distance of one profile to one control profile is twice their Euclidean distance, so it is
the Pearson over a line's drugs of the predicted vs observed size of effect."""
PSEUDOBULK_SKIPPED = {
    "DE metrics (overlap_at_N, precision_at_N, _at_50 ... _at_500, de_spearman_sig, de_direction_match, "
    "de_spearman_lfc_sig, de_sig_genes_recall, de_nsig_counts, pr_auc, roc_auc)":
        "they rank genes by pdex's Mann-Whitney test of a perturbation's cells against the control cells; one "
        "profile per condition has no spread to test (our precision_up50 / _down50 rank the profile's logFC instead)",
    "clustering_agreement": "Leiden clusters of one line's 9 drug profiles: measured on the real pseudobulk it gives "
                            "1.0 to the mean of the other drugs (nearly one profile for every drug) as to a perfect "
                            "prediction, 0 to the vehicle; it does not rank methods here (and costs UMAP's numba "
                            "compile, 15-19 s)",
    "edistance (pertpy)": "a distance between two sets of cells; with one profile on each side it is twice the "
                          "Euclidean distance",
}
SHOWN = ("pearson_delta", "discrimination_score_l1", "discrimination_score_cosine", "overlap_at_N", "precision_at_N",
         "de_direction_match", "mae", "mae_delta", "pearson_edistance", "clustering_agreement", "edistance", "clipped")
"""The columns printed (every column is in the CSV)."""
INFO = ("clipped", "n_real", "n_pred")


def library_versions() -> str:
    return ", ".join(f"{n} {version(n)}" for n in LIBRARIES)


def field_metrics(real, pred, *, pert_col: str = PERT, control: str = CONTROL, context_col: str | None = None,
                  pseudobulk: bool = False, threads: int = 1) -> pd.DataFrame:
    """cell-eval's per-perturbation results and pertpy's E-distance: one row per (context, perturbation) with
    columns context_col (when given), perturbation, every metric, n_real / n_pred (rows), clipped and
    cell_eval_errors (the metrics cell-eval could not compute in that context, with its message; NaN there)."""
    _check(real, pred, pert_col, control, context_col)
    contexts = ([None] if context_col is None else
                sorted(set(real.obs[context_col].astype(str))))
    out = []
    with library_output(*LOGGERS):
        for ctx in contexts:
            r = real if ctx is None else real[(real.obs[context_col].astype(str) == ctx).to_numpy()]
            p = pred if ctx is None else pred[(pred.obs[context_col].astype(str) == ctx).to_numpy()]
            r, p, clipped = _prepare(r, p, pert_col)
            per, errors = _cell_eval(r, p, pert_col, control, pseudobulk, threads)
            if not pseudobulk:
                per["edistance"] = per["perturbation"].map(_edistance(r, p, pert_col, list(per["perturbation"])))
            per["n_real"] = per["perturbation"].map(r.obs[pert_col].value_counts())
            per["n_pred"] = per["perturbation"].map(p.obs[pert_col].value_counts())
            per["clipped"] = per["perturbation"].map(clipped)
            per["cell_eval_errors"] = "; ".join(errors)
            if ctx is not None:
                per.insert(0, context_col, ctx)
            out.append(per)
    return pd.concat(out, ignore_index=True)


def _check(real, pred, pert_col, control, context_col) -> None:
    """Named errors for what either library would refuse or silently change."""
    if list(real.var_names) != list(pred.var_names):
        raise GeneMappingError("predicted and observed AnnData have different genes (or order)", field="var_names",
                               hint="score both on the same genes in the same order")
    for name, a in (("observed", real), ("predicted", pred)):
        for col in (pert_col, context_col):
            if col is not None and col not in a.obs:
                raise MetadataError(f"the {name} AnnData has no obs column {col!r}", field=col,
                                    hint=f"label every row's perturbation in obs[{pert_col!r}]")
        if control not in set(a.obs[pert_col].astype(str)):
            raise MetadataError(f"the {name} AnnData has no control rows ({control!r})", field=pert_col,
                                hint="add the control cells (or profile) the change is measured against")
        x = _dense(a.X)
        if not np.isfinite(x).all():
            raise ValueRangeError(f"the {name} expression holds NaN or Inf", field="X",
                                  hint="score finite log-normalised expression")
    x = _dense(real.X)
    if x.min() < 0 or x.max() >= LOG1P_MAX or not (np.modf(x)[0] > 1e-3).any():
        raise ValueRangeError(f"observed expression is not log-normalised (range [{x.min():.3g}, {x.max():.3g}]"
                              f"{', all integers' if not (np.modf(x)[0] > 1e-3).any() else ''})", field="X",
                              hint=f"give log1p-normalised expression (0 <= x < {LOG1P_MAX:g}), as cell-eval needs")
    keys = ([context_col] if context_col else []) + [pert_col]
    a = set(map(tuple, real.obs[keys].astype(str).drop_duplicates().to_numpy()))
    b = set(map(tuple, pred.obs[keys].astype(str).drop_duplicates().to_numpy()))
    if a != b:
        raise MetadataError(f"{len(a ^ b)} perturbations are on one side only (first: {sorted(a ^ b)[0]})",
                            field=pert_col, hint="predict every observed perturbation, in the same contexts")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def _prepare(real, pred, pert_col):
    """Float32 dense copies with string labels; predicted values outside cell-eval's log1p range [0, 15) set to
    its edge (the fraction of such values per perturbation: `clipped`)."""
    import anndata as ad

    def copy(a, x):
        obs = pd.DataFrame({pert_col: a.obs[pert_col].astype(str).to_numpy()},
                           index=[f"c{i}" for i in range(a.n_obs)])
        return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[str(g) for g in a.var_names]))

    xp = _dense(pred.X)
    out = (xp < 0) | (xp >= LOG1P_MAX)
    labels = pred.obs[pert_col].astype(str).to_numpy()
    clipped = pd.Series(out.mean(1)).groupby(labels).mean().to_dict()
    xp = np.clip(xp, 0, np.nextafter(np.float32(LOG1P_MAX), np.float32(0)))
    return copy(real, _dense(real.X)), copy(pred, xp), clipped


class _Errors(logging.Handler):
    """Collects the messages of cell-eval's failed metrics (it logs them and goes on)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def _cell_eval(real, pred, pert_col, control, pseudobulk, threads):
    """cell-eval's per-perturbation table (pandas) and the errors it logged."""
    from cell_eval import MetricsEvaluator
    from cell_eval.metrics import metrics_registry

    errors = _Errors()
    logging.getLogger("cell_eval").addHandler(errors)
    with tempfile.TemporaryDirectory() as tmp:  # it makes its output folder even when it writes nothing
        ev = MetricsEvaluator(pred, real, control_pert=control, pert_col=pert_col, num_threads=threads,
                              outdir=tmp, skip_de=pseudobulk)
        skip = [m for m in metrics_registry.list_metrics() if m not in PSEUDOBULK_METRICS] if pseudobulk else None
        res, _ = ev.compute(profile="full", skip_metrics=skip, write_csv=False)
    per = res.to_pandas()
    return per, errors.messages


def _edistance(real, pred, pert_col, perts) -> dict:
    """pertpy's E-distance between each perturbation's predicted and observed cells (all genes)."""
    import pertpy as pt

    dist = pt.tools.Distance("edistance")
    lr, lp = real.obs[pert_col].to_numpy(), pred.obs[pert_col].to_numpy()
    return {k: float(dist(pred.X[lp == k], real.X[lr == k])) for k in perts}


# --- our benchmarks' predictions as the libraries' AnnData ----------------------------------------------------


class Recorder:
    """A Predictor (same name, fit, predict) that keeps what the wrapped one predicted, per seed and condition:
    cells[(seed, drug, cell_line, dose_um)] = [n_cells, G] float32 (into the dict `into` when given)."""

    def __init__(self, inner, into: dict | None = None):
        self.inner, self.name, self._seed = inner, inner.name, 0
        self.cells = {} if into is None else into

    def fit(self, train, ctx):
        self._seed = ctx.seed
        self.inner.fit(train, ctx)
        return self

    def predict(self, controls, cond, n_cells, rng):
        p = self.inner.predict(controls, cond, n_cells, rng)
        self.cells[(self._seed, cond.drug, cond.cell_line, cond.dose_um)] = np.asarray(p, np.float32)
        return p


def _label(drug: str, dose: float) -> str:
    return f"{drug} @ {dose:g} uM"


def benchmark_scores(recorded: dict, cells, method: str) -> pd.DataFrame:
    """Field metrics of one benchmark method: `recorded` = Recorder.cells, `cells` = the benchmark's
    metrics.ScoringCells. Observed: each held-out condition's cells + the SCORE vehicle cells of its line;
    predicted: the method's cells + the FIT vehicle cells it predicted from. One row per (seed, condition)."""
    import anndata as ad

    genes = pd.DataFrame(index=[str(g) for g in cells.adata.var_names])
    lines = sorted({c.cell_line for c in cells.conds})
    keys = {_label(c.drug, c.dose_um): (c.drug, c.dose_um) for c in cells.conds}

    def adata(blocks):
        obs = pd.DataFrame([(lab, ln) for lab, ln, x in blocks for _ in range(len(x))], columns=[PERT, CONTEXT])
        obs.index = obs.index.astype(str)
        return ad.AnnData(np.concatenate([np.asarray(x, np.float32) for _, _, x in blocks]), obs=obs, var=genes)

    t0 = time.perf_counter()
    real = adata([(_label(c.drug, c.dose_um), c.cell_line, cells.true[cells.key(c)]) for c in cells.conds]
                 + [(CONTROL, ln, cells.score_X[ln]) for ln in lines])
    out = []
    for seed in sorted({k[0] for k in recorded}):
        pred = adata([(_label(c.drug, c.dose_um), c.cell_line, recorded[(seed, *cells.key(c))]) for c in cells.conds]
                     + [(CONTROL, ln, cells.fit_X[ln]) for ln in lines])
        per = field_metrics(real, pred, context_col=CONTEXT)
        drug_dose = per.pop("perturbation").map(keys)
        per.insert(1, "drug", drug_dose.str[0])
        per.insert(2, "dose_um", drug_dose.str[1])
        out.append(per.assign(method=method, seed=seed))
    df = pd.concat(out, ignore_index=True)
    print(f"benchmark: {method}: cell-eval pearson_delta {df['pearson_delta'].mean():.3f}, pertpy E-distance "
          f"{df['edistance'].mean():.3f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return df[["method", "seed", *[c for c in df.columns if c not in ("method", "seed")]]]


def profile_scores(keys: pd.DataFrame, true: np.ndarray, pred: np.ndarray, vehicle: np.ndarray, genes,
                   method: str = "predictions") -> pd.DataFrame:
    """Field metrics in pseudobulk mode (`pseudobulk.truth_arrays` + aligned predictions): keys (drug, cell_line)
    per row of true / pred / vehicle [n, G]. One cell-eval context per line and vehicle profile (a line whose
    conditions have different vehicle profiles gets one context per profile, named line#k)."""
    import anndata as ad

    keys = keys[["drug", "cell_line"]].reset_index(drop=True)
    ctx = keys["cell_line"].astype(str).to_numpy().copy()
    for ln in np.unique(ctx):
        rows = np.flatnonzero(keys["cell_line"].astype(str).to_numpy() == ln)
        _, inv = np.unique(vehicle[rows], axis=0, return_inverse=True)
        if inv.max() > 0:
            ctx[rows] = [f"{ln}#{k}" for k in inv.ravel()]
    first = {c: int(np.flatnonzero(ctx == c)[0]) for c in np.unique(ctx)}
    obs = pd.DataFrame({PERT: [*keys["drug"].astype(str), *[CONTROL] * len(first)],
                        CONTEXT: [*ctx, *first]})
    obs.index = obs.index.astype(str)
    var = pd.DataFrame(index=[str(g) for g in genes])
    v = vehicle[list(first.values())]
    real = ad.AnnData(np.concatenate([true, v]).astype(np.float32), obs=obs, var=var)
    pr = ad.AnnData(np.concatenate([pred, v]).astype(np.float32), obs=obs.copy(), var=var)
    per = field_metrics(real, pr, context_col=CONTEXT, pseudobulk=True)
    per = per.rename(columns={"perturbation": "drug"})
    per["cell_line"] = per[CONTEXT].str.split("#").str[0]
    return per.assign(method=method)[["method", "drug", "cell_line",
                                      *[c for c in per.columns if c not in ("method", "drug", "cell_line")]]]


# --- tables ---------------------------------------------------------------------------------------------------


def metric_columns(per: pd.DataFrame) -> list[str]:
    """The numeric metric columns of a field-metrics table, cell-eval's then pertpy's, then `clipped`."""
    skip = {"seed", "dose_um", "n_real", "n_pred"}
    return [c for c in per.columns if c not in skip and pd.api.types.is_numeric_dtype(per[c])]


def summarize(per: pd.DataFrame, by: str = "method") -> pd.DataFrame:
    """Per method: the mean over conditions (seeds averaged per condition first, as cell-eval's own aggregate is
    a mean over perturbations) of every metric; n = conditions."""
    cols = metric_columns(per)
    cond = [c for c in ("drug", "cell_line", "dose_um") if c in per.columns]
    rows = []
    for name, sub in per.groupby(by, sort=False):
        m = sub.groupby(cond, sort=False)[cols].mean()
        rows.append({by: name, "n": len(m), **m.mean().to_dict()})
    return pd.DataFrame(rows)


def shown(summary: pd.DataFrame) -> pd.DataFrame:
    """The printed columns of a summary (those present)."""
    return summary[[c for c in ("method", "n", *SHOWN) if c in summary.columns]]


def markdown(summary: pd.DataFrame) -> str:
    """The field's table for benchmark.md: one row per method."""
    t = shown(summary)
    cols = [c for c in t.columns if c not in ("method", "n")]
    lines = [f"The field's metrics ({library_versions()}; their code on the same predictions and cells; "
             "docs/field_metrics.md): mean over conditions. All columns: field_metrics.csv (per condition and seed) "
             "and field_summary.csv.", "",
             "| method | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for _, r in t.iterrows():
        lines.append(f"| {r['method']} | {int(r['n'])} | "
                     + " | ".join("-" if not np.isfinite(r[c]) else f"{r[c]:.3f}" for c in cols) + " |")
    lines += ["", "pearson_delta: Pearson of the predicted vs observed mean change from control (our "
              "logfc_pearson's definition; they differ only where predictions were clipped). "
              "discrimination_score_l1: 1 - rank of the true change among one line's conditions by L1 distance "
              "to the predicted change / their number (1 best). overlap_at_N / precision_at_N: pdex DE genes "
              "(Mann-Whitney, FDR 0.05) recovered. mae: of mean expression (not of the change). edistance: pertpy's "
              "E-distance of predicted vs observed cells (V-statistic: > 0 for two samples of one population; our "
              "energy_distance is the unbiased version). clipped: fraction of predicted values outside cell-eval's "
              "log1p range [0, 15) moved to its edge."]
    return "\n".join(lines)


def tracked_metrics(summary: pd.DataFrame) -> dict:
    """`<method>.cell_eval.<metric>` / `<method>.pertpy.edistance` -> value, for MLflow."""
    out = {}
    for _, r in summary.iterrows():
        for c in metric_columns(summary):
            if c == "n":
                continue
            lib = "pertpy" if c == "edistance" else "field" if c == "clipped" else "cell_eval"
            out[f"{r['method']}.{lib}.{c}"] = float(r[c])
    return out



def write_tables(frames: list, out_dir) -> tuple[pd.DataFrame, str]:
    """Per-condition tables -> field_metrics.csv and field_summary.csv in out_dir; (summary, markdown)."""
    per = pd.concat(frames, ignore_index=True)
    summary = summarize(per)
    per.to_csv(Path(out_dir) / "field_metrics.csv", index=False)
    summary.to_csv(Path(out_dir) / "field_summary.csv", index=False)
    return summary, markdown(summary)


def pseudobulk_file_scores(truth_path, pred_path, method: str | None = None) -> pd.DataFrame:
    """`profile_scores` of a prediction table against the truth table (the files `evaluate pseudobulk` scores)."""
    truth = read_profiles(truth_path)
    keys, t, v = truth_arrays(truth)
    p = align(read_profiles(pred_path), Profiles(keys.assign(profile=TREATED), t, truth.genes), str(pred_path))
    return profile_scores(keys, t, p, v, truth.genes, method=method or Path(pred_path).stem)
