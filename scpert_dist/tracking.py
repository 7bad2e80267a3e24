"""MLflow tracking for every stage: one `Tracker` (pretraining, finetuning, benchmark, sweep, model registry).

The rule everywhere: a tracking failure never stops training. The first failure is reported once (a warning and
a log line), later calls become no-ops, and `end()` tries to tag the run `scpert.tracking_failed=true` so the UI
shows that its record is incomplete. A store that cannot be reached when the run starts gives a disabled tracker
(`run_id is None`) with the same single report.

The Tracker talks through `MlflowClient`, never the fluent API, so it works from any process (a Ray Train worker
attaches to the driver's run with `Tracker.attach`) and never depends on a global "active run".
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path

from .config import flatten
from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
FAILED_TAG = "scpert.tracking_failed"


def resolve_uri(uri: str | None = None) -> str:
    """`uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


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


class Tracker:
    """A failure-tolerant MLflow run. Create one with `Tracker(...)` (a new run, raises if the store is
    unreachable), `Tracker.start(...)` (a new run; a disabled tracker instead of an error) or `Tracker.attach`."""

    def __init__(self, uri: str | None = None, experiment: str = "scpert", run_name: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, tags: dict | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self.client = MlflowClient(self.uri)
        self.failed = False
        self._warned = False
        if run_id is None:
            exp_id = ensure_experiment(self.client, experiment, self.uri)
            all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run_name:
                all_tags["mlflow.runName"] = run_name
            run_id = self.client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id
        self.run_id: str | None = run_id

    @classmethod
    def attach(cls, uri: str, run_id: str) -> Tracker:
        """Log into an existing run (e.g. from a training worker, or a sweep trial's parent)."""
        return cls(uri=uri, run_id=run_id)

    @classmethod
    def start(cls, uri: str | None = None, experiment: str = "scpert", run_name: str | None = None,
              params: dict | None = None, tags: dict | None = None, parent_run_id: str | None = None) -> Tracker:
        """A new run with `params` logged (nested dicts flattened to dotted keys). If the store cannot be reached
        the failure is reported once and a disabled tracker is returned: training goes on without tracking."""
        try:
            t = cls(uri, experiment=experiment, run_name=run_name, parent_run_id=parent_run_id, tags=tags)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            t = cls.disabled(uri)
            t._report(e)
            return t
        if params:
            t.log_params(params)
        return t

    @classmethod
    def disabled(cls, uri: str | None = None) -> Tracker:
        """A tracker that records nothing (tracking switched off, or the store was unreachable at start)."""
        t = cls.__new__(cls)
        t.uri, t.client, t.run_id, t.failed, t._warned = resolve_uri(uri), None, None, False, False
        return t

    # ------------------------------------------------------------------------------------------ logging

    def _report(self, e: Exception) -> None:
        self.failed = True
        if not self._warned:
            self._warned = True
            msg = f"MLflow tracking at {self.uri} failed ({type(e).__name__}: {e}); training goes on without it"
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            log.warning(msg)

    @property
    def active(self) -> bool:
        """True while this tracker records (a run exists and nothing has failed)."""
        return self.run_id is not None and not self.failed

    def _guard(self, method: str, *args, **kwargs):
        if not self.active:
            return None
        try:
            return getattr(self.client, method)(self.run_id, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._report(e)
            return None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten(params) if any(isinstance(v, dict) for v in params.values()) else params
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._guard("log_batch", params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Numeric, finite values only (others are skipped)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if items:
            self._guard("log_batch", metrics=items)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._guard("set_tag", k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under `artifact_path`."""
        p = Path(path)
        self._guard("log_artifacts" if p.is_dir() else "log_artifact", str(p), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED / FAILED / KILLED. A run whose record is incomplete is tagged `scpert.tracking_failed`."""
        if self.run_id is None:
            return
        if self.failed:
            try:
                self.client.set_tag(self.run_id, FAILED_TAG, "true")
            except Exception:  # noqa: BLE001
                pass
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------------------------------ registry

    def register_model(self, name: str, *, artifact_path: str = "model", metrics: dict | None = None,
                       tags: dict | None = None, description: str | None = None, alias: str | None = None) -> str:
        """Register this run's `artifact_path` folder as a new version of `name` (created when absent); metrics
        are stored on the version as `metric.<name>` tags; `alias` (e.g. 'champion') is moved to this version.
        Returns the version. Unlike logging, a failure here is an error: the caller asked for a model."""
        from mlflow.exceptions import MlflowException


        try:
            run = self.client.get_run(self.run_id)
        except MlflowException as e:
            raise ConfigError(f"no MLflow run {self.run_id!r} at {self.uri}", field="run_id") from e
        if not any(a.path == artifact_path for a in self.client.list_artifacts(self.run_id)):
            raise ConfigError(f"run {self.run_id} has no '{artifact_path}/' artifact to register",
                              field="artifact_path",
                              hint="register a finished finetune run (scpert finetune / a completed sweep trial)")
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(
                name, description="scpert-dist finetuned single-cell drug-response model")
        vtags = {f"metric.{k}": f"{float(v):.6g}" for k, v in (metrics or {}).items()}
        vtags.update({k: str(v) for k, v in (tags or {}).items()})
        mv = self.client.create_model_version(name, source=f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}",
                                              run_id=self.run_id, tags=vtags, description=description)
        if alias:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return str(mv.version)


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
