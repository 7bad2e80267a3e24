"""Pretraining under a real local Ray: Ray Data stream -> 2 TorchTrainer workers (DDP/gloo) -> checkpoints ->
MLflow (sqlite). Tiny model, small shards; the same `run_pretraining` that `scpert pretrain` and the jobs call."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from scpert_dist.config import load
from scpert_dist.data.lincs import shard_paths
from scpert_dist.data.stream import is_validation, sig_uid
from scpert_dist.train.pretrain import PretrainConfig, run_pretraining
from shards_fixture import real_l1000_shards, simulated_shards

pytestmark = pytest.mark.ray
TINY = Path(__file__).resolve().parents[1] / "scpert_dist" / "configs" / "pretrain_tiny.toml"


@pytest.fixture(scope="module")
def sim_shards(tmp_path_factory, request):
    from conftest import SHARED

    return simulated_shards(tmp_path_factory.mktemp("pt"), metadata=SHARED)


def _cfg(tmp_path, shards, mlflow_uri, *extra):
    return load(PretrainConfig, TINY, [f"data.shards={shards}", f"tracking.uri={mlflow_uri}",
                                       f"checkpoint.storage={tmp_path / 'ray'}", "tracking.log_every=1", *extra])


def _train_uids(shards: Path, val_fraction: float) -> set[int]:
    ids = np.concatenate([pq.read_table(p, columns=["sig_id"]).column("sig_id").to_numpy(zero_copy_only=False)
                          for p in shard_paths(shards)])
    uid = sig_uid(ids)
    return set(uid[~is_validation(uid, val_fraction)].tolist())


def test_two_workers_loss_goes_down_and_mlflow_has_everything(ray_local, tmp_path, mlflow_uri, shared_data):
    """On the real L1000 level-5 signatures: 2 workers, masked loss decreases, Table-1 metrics reported,
    MLflow run has params, per-step loss, metrics, safetensors weights and the loss curve."""
    import mlflow

    from scpert_dist.checkpoint import load_pretrained

    shards = real_l1000_shards(tmp_path, shared_data)
    cfg = _cfg(tmp_path, shards, mlflow_uri, "optim.max_steps=0", "optim.epochs=4", "optim.batch_size=16",
               "optim.lr=5e-3", "checkpoint.every_n_steps=20")
    res = run_pretraining(cfg, progress=False)
    for k in ("mask_rmse", "cell_acc", "drug_acc", "dose_rmse"):
        assert np.isfinite(res.metrics[k]), k
    print("real L1000 Table-1 (tiny, 6 epochs):", {k: round(res.metrics[k], 3) for k in
                                                  ("mask_rmse", "cell_acc", "drug_acc", "dose_rmse")})
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.tasks"] == "mask+cell+drug+dose"
    hist = [m.value for m in client.get_metric_history(res.run_id, "loss_mask")]
    assert len(hist) >= 20
    assert np.mean(hist[-5:]) < 0.9 * np.mean(hist[:5])  # masked loss goes down
    arts = {a.path for a in client.list_artifacts(res.run_id)} | \
           {a.path for a in client.list_artifacts(res.run_id, "model")}
    assert "model/model.safetensors" in arts and "loss_curve.png" in arts
    model, mcfg, info = load_pretrained(res.checkpoint_dir)
    assert info["genes"] == json.loads((shards / "manifest.json").read_text())["genes"]
    assert mcfg.tasks == ["mask", "cell", "drug", "dose"]
    assert res.samples_per_epoch["0"] == len(_train_uids(shards, cfg.data.val_fraction))


def test_worker_killed_resumes_with_exact_sample_accounting(ray_local, tmp_path, mlflow_uri, sim_shards):
    """A worker process dies (os._exit) mid-epoch; Ray Train restarts the group from the last checkpoint. Every
    training row is consumed in each epoch, and only rows after the last checkpoint are seen twice."""
    every, batch, world = 4, 16, 2
    acc = tmp_path / "acc"
    cfg = _cfg(tmp_path, sim_shards, mlflow_uri, "optim.max_steps=0", "optim.epochs=2", f"optim.batch_size={batch}",
               f"checkpoint.every_n_steps={every}", "fault.fail_at_step=10", "fault.fail_rank=1",
               f"accounting_dir={acc}", "model.tasks=mask")
    res = run_pretraining(cfg, progress=False)
    run_dir = Path(res.run_dir)
    assert (run_dir / ".fault_injected_step10").exists(), "the fault was not injected"
    expected = _train_uids(sim_shards, cfg.data.val_fraction)
    seen: dict[int, Counter] = {0: Counter(), 1: Counter()}
    for f in acc.glob("rank*.txt"):
        for line in f.read_text().split("\n"):
            if line:
                e, u = line.split()
                seen[int(e)][int(u)] += 1
    for e in (0, 1):
        assert set(seen[e]) == expected, f"epoch {e}: rows lost or foreign rows"
        dup = sum(c - 1 for c in seen[e].values())
        assert dup <= every * batch * world, f"epoch {e}: {dup} repeats > one checkpoint interval"
        assert res.samples_per_epoch[str(e)] == len(expected)
    # the failure happened in epoch 0, so it has the repeats; epoch 1 ran clean
    assert sum(c - 1 for c in seen[1].values()) == 0
    assert sum(c - 1 for c in seen[0].values()) > 0


def test_resume_continues_a_stopped_run(ray_local, tmp_path, mlflow_uri, sim_shards):
    """A run stopped after 8 steps continues with resume=True from its checkpoint into the same MLflow run."""
    import mlflow

    cfg = _cfg(tmp_path, sim_shards, mlflow_uri, "optim.max_steps=8", "optim.batch_size=8",
               "checkpoint.every_n_steps=4", "checkpoint.name=stopme", "model.tasks=mask")
    first = run_pretraining(cfg, progress=False)
    assert first.metrics["step"] == 8
    cfg2 = _cfg(tmp_path, sim_shards, mlflow_uri, "optim.max_steps=16", "optim.batch_size=8",
                "checkpoint.every_n_steps=4", "checkpoint.name=stopme", "model.tasks=mask")
    second = run_pretraining(cfg2, resume=True, progress=False)
    assert second.metrics["step"] == 16
    assert second.run_id == first.run_id
    steps = [m.step for m in mlflow.tracking.MlflowClient(mlflow_uri).get_metric_history(first.run_id, "loss")]
    assert min(steps) == 1 and max(steps) == 16 and len(set(steps)) == 16
