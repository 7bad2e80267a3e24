"""Pretraining under Ray Train, the driver: Parquet shards -> TorchTrainer workers (DDP on gloo/NCCL, or DeepSpeed ZeRO
on GPU), each streaming its own row groups (data/shards/stream.py) -> checkpoints + MLflow; Ray Data reads the
validation rows.

`run_pretraining(cfg)` is the driver (CLI, `jobs/pretrain.py` and the demo call it): it checks the inputs, prepares the
run folder and the MLflow run, builds the datasets and the TorchTrainer, fits, and exports the weights. Every worker
runs `train/trainer.py`'s Trainer; the resume state is `checkpoint/resume.py`'s; the config is `train/settings.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import params, to_dict
from ..data.shards.ingest import read_manifest, verify_shards
from ..data.shards.stream import ShardStream, build_dataset
from ..errors import ConfigError
from ..model.config import check_heads
from ..tracking import Tracker, loss_curve_png, resolve_uri
from .callbacks import Callback
from .loader import quiet_ray_data
from .settings import (
    CheckpointSection,
    DataSection,
    OptimSection,
    PretrainConfig,
    ScalingSection,
    TrackingSection,
)
from .trainer import WorkerPlan, train_loop_per_worker

log = logging.getLogger(__name__)

__all__ = ["CheckpointSection", "DataSection", "OptimSection", "PretrainConfig",
           "PretrainResult", "ScalingSection", "TrackingSection", "latest_run_name",
           "quiet_ray_data", "run_pretraining", "train_loop_per_worker"]


@dataclass
class PretrainResult:
    run_id: str
    """MLflow run id."""
    checkpoint_dir: str
    """Exported pretrained weights (model.safetensors + scpert_model.json), loadable with checkpoint.load_pretrained."""
    metrics: dict
    """Table-1 metrics on held-out signatures + throughput."""
    samples_per_epoch: dict
    """Training rows consumed per epoch (all workers), for accounting."""
    run_dir: str = ""
    """Ray Train run folder (checkpoints)."""


def _free_port() -> int:
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


def ensure_ray(num_workers: int, cpus_per_worker: float) -> None:
    """Join the Ray cluster of $RAY_ADDRESS, or start a local one sized for `num_workers` workers of
    `cpus_per_worker` CPUs plus Ray Data's read tasks (the driver of a pretraining or a sweep)."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    # Enough logical CPUs for the workers plus Ray Data's read tasks on a small machine (STACK: 2-core hang).
    n = max(os.cpu_count() or 2, int(num_workers * cpus_per_worker) + 2, 4)
    # The dashboard (loopback only) serves the state API: without it Ray Train's placement-group cleaner cannot
    # query its controller and prints a warning every few seconds for the whole run.
    try:
        # address="local": a new Ray even while a `ray start` cluster runs on this machine (cluster/local/start.sh),
        # which a plain ray.init() would try to join
        ray.init(address="local", num_cpus=n, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=_free_port(), log_to_driver=True, _node_ip_address="127.0.0.1")
    except Exception as exc:  # no dashboard packages / port race: run without it, the warnings are cosmetic
        log.warning("Ray dashboard unavailable (%s); starting Ray without it", exc)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=True,
                 _node_ip_address="127.0.0.1")
    # Ray's helper processes find this cluster even when other Ray instances run on the machine
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def _storage(cfg: PretrainConfig) -> Path:
    return Path(cfg.checkpoint.storage or Path("scpert_runs") / "ray").expanduser().resolve()


def latest_run_name(storage: Path) -> str | None:
    runs = sorted((p for p in storage.glob("*/scpert_run.json")), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent.name if runs else None


def _inputs(cfg: PretrainConfig) -> tuple[str, dict, dict]:
    """(shard folder, manifest, what the workers need to know of it); every check that can fail runs here, before
    anything is written (run folder, MLflow run, Ray)."""
    if not cfg.data.shards:
        raise ConfigError("data.shards is not set", field="data.shards",
                          hint="pass --shards DIR (from `scpert data lincs`)")
    shards = str(Path(cfg.data.shards).resolve())
    manifest = read_manifest(shards)
    if cfg.data.verify:
        verify_shards(shards)  # ShardError naming a missing / truncated / corrupt shard
    info = {"n_genes": manifest["n_genes"], "genes": manifest["genes"], "gene_symbols": manifest.get("gene_symbols"),
            "cells": manifest["cells"], "drugs": manifest["drugs"],
            "semi_synthetic": bool(manifest.get("semi_synthetic", False))}
    # the heads the objective needs against the data's vocabularies: a ConfigError here, not in the workers
    check_heads(cfg.model.build(info["n_genes"], len(info["cells"]), len(info["drugs"])), cfg.objective.heads)
    ShardStream(shards, seed=cfg.seed, val_fraction=cfg.data.val_fraction,  # the stream's settings, checked here
                shuffle_buffer=cfg.data.shuffle_buffer)
    return shards, manifest, info


def _run_folder(cfg: PretrainConfig, resume: bool) -> tuple[PretrainConfig, Path]:
    """The run's folder under the storage (a fresh name, or the one to resume); cfg with name and storage set."""
    storage = _storage(cfg)
    name = cfg.checkpoint.name
    if resume and not name:
        name = latest_run_name(storage)
        if name is None:
            raise ConfigError("--resume: no earlier run found", path=str(storage), hint="give the run name with --name")
    if not name:
        name = f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.pretraining_hash()[:6]}"
    run_dir = storage / name
    meta_file = run_dir / "scpert_run.json"
    if resume and not meta_file.exists():
        raise ConfigError(f"--resume: run '{name}' not found", path=str(run_dir))
    if not resume and meta_file.exists():
        raise ConfigError(f"run '{name}' already exists", path=str(run_dir),
                          hint="use --resume to continue it, or choose another name")
    storage.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, name=name, storage=str(storage)))
    return cfg, run_dir


def _total_steps(cfg: PretrainConfig, n_rows: int) -> int:
    n_train = int(n_rows * (1 - cfg.data.val_fraction))
    total = math.ceil(n_train / cfg.scaling.num_workers / cfg.optim.batch_size) * cfg.optim.epochs
    return min(total, cfg.optim.max_steps) if cfg.optim.max_steps else total


def _tracker(cfg: PretrainConfig, run_dir: Path, resume: bool, manifest: dict, info: dict):
    """The run's MLflow run: the one recorded in the run folder (resume) or a new one with the config as params."""
    uri = resolve_uri(cfg.tracking.uri or None)
    meta_file = run_dir / "scpert_run.json"
    if resume:
        return Tracker.attach(uri, json.loads(meta_file.read_text())["mlflow_run_id"]), uri
    tracker = Tracker(uri, experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name or run_dir.name,
                      tags={"scpert.stage": "pretrain", "scpert.pretraining_hash": cfg.pretraining_hash(),
                            "scpert.semi_synthetic": str(info["semi_synthetic"]).lower(),
                            "scpert.data": manifest.get("metadata", "")})
    tracker.log_params({**params(cfg), "n_genes": info["n_genes"], "n_cells": len(info["cells"]),
                        "n_drugs": len(info["drugs"]), "n_rows": manifest["n_rows"]})
    run_dir.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": uri,
                                     "config": to_dict(cfg)}, indent=1))
    return tracker, uri


def _torch_trainer(cfg: PretrainConfig, shards: str, run_dir: Path, plan: WorkerPlan):
    import ray.train
    from ray.train.torch import TorchTrainer


    ensure_ray(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker)
    # the training rows are read by the workers themselves, each its own row groups (ShardStream); Ray Data reads
    # the validation rows, once, at the end (every worker could get them; rank 0 reads them)
    datasets = {"val": build_dataset(shards, val_fraction=cfg.data.val_fraction, validation=True, verify=False)}
    s = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker, train_loop_config={"plan": plan},  # the typed plan, pickled by Ray as it is
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               placement_strategy=s.placement_strategy,
                                               resources_per_worker={"CPU": s.cpus_per_worker,
                                                                     **({"GPU": 1} if s.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep)),
        datasets=datasets,
        # not split: the validation rows are read whole by rank 0
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )


def _finish(result, run_dir: Path, tracker) -> tuple[Path, dict, dict]:
    """Export the final checkpoint's weights to the run folder and log them, the loss curve and the final metrics
    to MLflow. -> (export folder, metrics, history)."""
    with result.checkpoint.as_directory() as d:
        export = run_dir / "pretrained"
        if export.exists():
            shutil.rmtree(export)
        shutil.copytree(Path(d) / "pretrained", export)
        hist = json.loads((Path(d) / "history.json").read_text())
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    tracker.log_artifact(export, "model")
    if hist["history"]:
        png = loss_curve_png(hist["history"], run_dir / "loss_curve.png",
                             keys=tuple(k for k in ("loss", "loss_mask", "loss_cell", "loss_drug", "loss_dose")
                                        if k in hist["history"][-1]))
        tracker.log_artifact(png)
    tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=int(metrics.get("step", 0)))
    if metrics.get("tracking_failed") or tracker.failed:
        # the record in MLflow is incomplete: say so where it survives (the run folder) and, if reachable, in MLflow
        meta_file = run_dir / "scpert_run.json"
        meta = json.loads(meta_file.read_text())
        meta["tracking_failed"] = True
        meta_file.write_text(json.dumps(meta, indent=1))
        tracker.failed = True
    tracker.end("FINISHED")
    return export, metrics, hist


def run_pretraining(cfg: PretrainConfig, *, resume: bool = False, progress: bool = True,
                    callbacks: list[Callback] | None = None) -> PretrainResult:
    """Build the Ray Data datasets and the TorchTrainer, fit, export the weights, log to MLflow. `callbacks` (objects
    of importable Callback classes, e.g. train.callbacks.KillWorker) are pickled into every worker."""
    shards, manifest, info = _inputs(cfg)
    cfg, run_dir = _run_folder(cfg, resume)
    total = _total_steps(cfg, manifest["n_rows"])
    tracker, uri = _tracker(cfg, run_dir, resume, manifest, info)
    trainer = _torch_trainer(cfg, shards, run_dir, WorkerPlan(
        cfg=cfg, info=info, total_steps=total, run_dir=str(run_dir), run_id=tracker.run_id, tracking_uri=uri,
        callbacks=list(callbacks or []), shards=shards))
    if progress:
        print(f"[pretrain] {run_dir.name}: {manifest['n_rows']} signatures x {info['n_genes']} genes, "
              f"{cfg.scaling.num_workers} workers, ~{total} steps; MLflow run {tracker.run_id} ({uri})")
    try:
        result = trainer.fit()
    except Exception:
        tracker.end("FAILED")
        raise
    export, metrics, hist = _finish(result, run_dir, tracker)
    if progress:
        print("[pretrain] done: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return PretrainResult(run_id=tracker.run_id, checkpoint_dir=str(export), metrics=metrics,
                          samples_per_epoch=hist["samples_per_epoch"], run_dir=str(run_dir))
