"""Small MLflow helpers shared by every stage. Call them on rank 0 only. If the tracking store fails, training
goes on: the failure is warned about once and later calls become no-ops."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

_state: dict = {"active": False, "failed": False}


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def _fail(what: str, exc: Exception) -> None:
    if not _state["failed"]:
        warnings.warn(f"MLflow {what} failed ({type(exc).__name__}: {exc}); training continues without tracking",
                      RuntimeWarning, stacklevel=3)
    _state["failed"] = True
    try:
        import mlflow
        if mlflow.active_run() is not None:
            mlflow.set_tag("tracking_error", f"{what}: {type(exc).__name__}")
    except Exception:
        pass


def start_run(cfg_dict: dict, run_name: str | None = None, experiment: str = "scpert", uri: str | None = None,
              nested: bool = False, tags: dict | None = None) -> str | None:
    """Start a run (URI: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder), log the
    flattened config as params; returns the run id, or None when tracking is unavailable."""
    _state["failed"] = False
    try:
        import mlflow
        mlflow.set_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name, nested=nested, tags=tags)
        params = _flatten(cfg_dict)
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))
        _state["active"] = True
        return run.info.run_id
    except Exception as exc:  # tracking must never stop training
        _fail("start_run", exc)
        return None


def log_metrics(metrics: dict, step: int | None = None) -> None:
    """Log numeric metrics (non-finite/non-numeric values are skipped)."""
    if not _state["active"] or _state["failed"]:
        return
    try:
        import math

        import mlflow
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))}
        mlflow.log_metrics(clean, step=step)
    except Exception as exc:
        _fail("log_metrics", exc)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or folder as artifact(s)."""
    if not _state["active"] or _state["failed"]:
        return
    try:
        import mlflow
        p = Path(path)
        (mlflow.log_artifacts if p.is_dir() else mlflow.log_artifact)(str(p), artifact_path)
    except Exception as exc:
        _fail("log_artifact", exc)


def end_run(status: str = "FINISHED") -> None:
    """End the active run with FINISHED / FAILED / KILLED."""
    if not _state["active"]:
        return
    try:
        import mlflow
        mlflow.end_run(status=status)
    except Exception as exc:
        _fail("end_run", exc)
    _state["active"] = False
