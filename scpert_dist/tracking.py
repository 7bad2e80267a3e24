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
        use_experiment(experiment, resolve_uri(uri))
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


# --- client-based tracker: attach to a run from any process (Ray Train workers log into the driver's run) ---

import logging  # noqa: E402

log = logging.getLogger(__name__)


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go to `mlartifacts/` beside the database file (MLflow's own default is
    `./mlruns` in whatever folder the process happens to run in); None (server's choice) for any other URI."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
    return (db.parent / "mlartifacts").as_uri()


def ensure_experiment(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (artifacts per `artifact_root`) when absent; safe against a parallel
    creator (sweep trials)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def use_experiment(name: str, uri: str) -> str:
    """Fluent-API counterpart: set the tracking URI and the active experiment (created via `ensure_experiment`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    exp_id = ensure_experiment(MlflowClient(uri), name, uri)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


class Tracker:
    """A thin, failure-tolerant wrapper over an MLflow run (MlflowClient, so it works from any process)."""

    def __init__(self, uri: str | None = None, experiment: str = "scpert", run_name: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, tags: dict | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.failed = False
        self._warned = False
        if run_id is None:
            exp_id = ensure_experiment(self.client, experiment, self.uri)
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run_name:
                all_tags["mlflow.runName"] = run_name
            run = self.client.create_run(exp_id, tags=all_tags, run_name=run_name)
            run_id = run.info.run_id
        self.run_id = run_id

    @classmethod
    def attach(cls, uri: str, run_id: str) -> Tracker:
        """Log into an existing run (e.g. from a training worker)."""
        return cls(uri=uri, run_id=run_id)

    def _guard(self, fn, *args, **kwargs):
        if self.failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # tracking must never stop training
            self.failed = True
            if not self._warned:
                self._warned = True
                msg = f"MLflow tracking at {self.uri} failed ({type(e).__name__}: {e}); training goes on without it"
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
                log.warning(msg)
            return None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        from .config import flatten

        flat = flatten(params) if any(isinstance(v, dict) for v in params.values()) else params
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._guard(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]
        if items:
            self._guard(self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._guard(self.client.set_tag, self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        self._guard(fn, self.run_id, str(p), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.failed:
            # try once more to mark the run, so the UI shows that its record is incomplete
            try:
                self.client.set_tag(self.run_id, "scpert.tracking_failed", "true")
            except Exception:
                pass
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception:
            pass


def loss_curve_png(history: list[dict], out: str | Path, keys: tuple[str, ...] = ("loss",)) -> Path:
    """Plot per-step losses to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for k in keys:
        ys = [h.get(k, float("nan")) for h in history]
        ax.plot(steps, ys, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
