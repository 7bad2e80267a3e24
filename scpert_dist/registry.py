"""Reading MLflow: run listing (`scpert runs`) and registered model versions. Writing (runs, registration) is
`tracking.Tracker`'s."""

from __future__ import annotations


def list_runs(tracking_uri: str, experiment: str | None = None, max_runs: int = 50) -> list[dict]:
    """Runs of one experiment (or all) as rows: run_id, name, experiment, status, and their numeric metrics."""
    from mlflow.tracking import MlflowClient

    from .errors import ConfigError

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
             "status": r.info.status, **r.data.metrics} for r in runs]


def format_table(rows: list[dict], metrics: int = 4) -> str:
    """Plain-text table: fixed columns then up to `metrics` metric columns (sorted by name)."""
    fixed = ["run_id", "name", "experiment", "status"]
    keys = sorted({k for r in rows for k in r if k not in fixed})[:metrics]
    cols = fixed + keys
    cells = [[str(c) for c in cols]] + [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def registered_versions(tracking_uri: str, name: str) -> list[dict]:
    """Versions of a registered model (newest first): version, run_id, source and tags (incl. metric.* tags)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    vs = client.search_model_versions(f"name = '{name}'")
    return sorted(({"version": str(v.version), "run_id": v.run_id, "source": v.source, **dict(v.tags)} for v in vs),
                  key=lambda r: -int(r["version"]))
