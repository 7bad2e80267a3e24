"""Reading MLflow: run listing (`scpert runs`, per stage with `--kind`). Writing (runs, registration) is
`tracking.Tracker`'s."""

from __future__ import annotations

from .errors import ConfigError

KINDS = ("pretrain", "finetune", "benchmark", "sweep")
"""`scpert runs --kind`: the stages, each with its own columns (KIND_COLUMNS)."""

# (column title, source): "p:<param>", "m:<metric>" (several sources separated by "|": the first one present),
# "t:<tag>", "parent" (short parent run id)
KIND_COLUMNS: dict[str, list[tuple[str, str]]] = {
    # runs logged before the objective section have the task set and mask ratio under model.*
    "pretrain": [("mask_ratio", "p:objective.mask_ratio|p:model.mask_ratio"), ("tasks", "p:objective.tasks|p:model.tasks"),
                 ("workers", "p:scaling.num_workers"),
                 ("backend", "p:scaling.backend"), ("step", "m:final_step|m:step"), ("loss", "m:loss"),
                 ("mask_rmse", "m:final_mask_rmse|m:mask_rmse"), ("cell_acc", "m:final_cell_acc|m:cell_acc"),
                 ("drug_acc", "m:final_drug_acc|m:drug_acc"), ("dose_rmse", "m:final_dose_rmse|m:dose_rmse"),
                 ("samples/s", "m:final_samples_per_s|m:samples_per_s")],
    # finetuning runs logged before the config had sections have pretrained / epochs at the top
    "finetune": [("decoder", "p:model.decoder"), ("drug_rep", "p:model.drug_rep"),
                 ("pretrained", "p:model.pretrained|p:pretrained"), ("epochs", "p:optim.epochs|p:epochs"),
                 ("train_loss", "m:train_loss"), ("val_logFC_r", "m:best_val_logfc_pearson"),
                 ("test_logFC_r", "m:test_logfc_pearson")],
    "sweep": [("parent", "parent"), ("mask_ratio", "p:swept.mask_ratio"), ("tasks", "p:swept.tasks"),
              ("decoder", "p:swept.decoder"), ("drug_rep", "p:swept.drug_rep"), ("lr", "p:swept.lr"),
              ("val_logFC_r", "m:best_val_logfc_pearson"), ("test_logFC_r", "m:test_logfc_pearson|m:best_test_logfc_pearson"),
              ("stopped_early", "t:scpert.stopped_early"), ("best", "t:scpert.best|t:scpert.best_run_id")],
    "benchmark": [("split", "p:split"), ("seeds", "p:seeds"), ("quick", "p:quick")],
}
_STAGES = {"pretrain": {"pretrain"}, "finetune": {"finetune", "sweep-trial"}, "benchmark": {"benchmark"},
           "sweep": {"sweep", "sweep-trial"}}


def list_runs(tracking_uri: str, experiment: str | None = None, max_runs: int = 50) -> list[dict]:
    """Runs of one experiment (or all) as rows: run_id, name, experiment, status, and their numeric metrics."""
    from mlflow.tracking import MlflowClient


    client = MlflowClient(tracking_uri=tracking_uri)
    if experiment is None:
        exps = client.search_experiments()
    else:
        e = client.get_experiment_by_name(experiment)
        if e is None:
            names = [x.name for x in client.search_experiments()]
            raise ConfigError(f"no MLflow experiment {experiment!r} at {tracking_uri}; experiments there: {names}")
        exps = [e]
    names = {e.experiment_id: e.name for e in exps}
    runs = client.search_runs(list(names), max_results=max_runs, order_by=["attributes.start_time DESC"]) if names else []
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "experiment": names[r.info.experiment_id],
             "stage": run_stage(r), "status": r.info.status, **r.data.metrics} for r in runs]


def run_stage(run) -> str:
    """The stage of an MLflow run: its `scpert.stage` tag; an untagged run with a finetuning config is 'finetune'."""
    stage = run.data.tags.get("scpert.stage", "")
    if not stage and "model.decoder" in run.data.params:
        return "finetune"
    return stage


def _value(run, source: str):
    for src in source.split("|"):
        if src == "parent":
            return run.data.tags.get("mlflow.parentRunId", "")[:8]
        kind, key = src.split(":", 1)
        store = {"p": run.data.params, "m": run.data.metrics, "t": run.data.tags}[kind]
        if key in store:
            v = store[key]
            return v[:8] if key.endswith("pretrained") and len(v) == 32 else v
    return ""


def list_stage_runs(tracking_uri: str, kind: str, experiment: str | None = None, max_runs: int = 50) -> list[dict]:
    """Runs of one stage (`KINDS`) as rows of that stage's columns (KIND_COLUMNS), newest first. Benchmark rows
    add one column per method (its logFC r)."""
    from mlflow.tracking import MlflowClient


    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}", field="--kind", hint=f"one of {', '.join(KINDS)}")
    client = MlflowClient(tracking_uri=tracking_uri)
    exps = {e.experiment_id: e.name for e in client.search_experiments()
            if experiment is None or e.name == experiment}
    if experiment is not None and not exps:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {tracking_uri}", field="--experiment")
    runs = client.search_runs(list(exps), order_by=["attributes.start_time DESC"], max_results=1000) if exps else []
    rows = []
    for r in (r for r in runs if run_stage(r) in _STAGES[kind]):
        row = {"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status}
        row.update({title: _value(r, src) for title, src in KIND_COLUMNS[kind]})
        if kind == "benchmark":
            row.update({k.removesuffix(".logfc_pearson"): v for k, v in sorted(r.data.metrics.items())
                        if k.endswith(".logfc_pearson")})
        rows.append(row)
    return rows[:max_runs]


def format_columns(rows: list[dict]) -> str:
    """Plain-text table of every column any row has (in first-seen order)."""
    if not rows:
        return "(no runs)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return _layout(cols, rows)


def _layout(cols: list[str], rows: list[dict]) -> str:
    cells = [[str(c) for c in cols]] + [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def format_table(rows: list[dict], metrics: int = 4) -> str:
    """Plain-text table: fixed columns then up to `metrics` metric columns (sorted by name); `--kind` shows each
    stage's own columns instead."""
    fixed = ["run_id", "name", "experiment", "stage", "status"]
    keys = sorted({k for r in rows for k in r if k not in fixed})[:metrics]
    return _layout(fixed + keys, rows)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
