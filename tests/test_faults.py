"""Fault tolerance not covered by the owners' tests (test_pretrain.py covers a killed worker and resuming a cleanly
stopped run): the MLflow tracking server dies in the middle of a pretraining run.

Real components: a real `mlflow server` subprocess on 127.0.0.1 (sqlite backend), real local Ray, real Parquet
shards from the simulator + ingest, the public `run_pretraining`.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from mlflow_server import free_port, kill, start_server

sys.path.insert(0, str(Path(__file__).parent))
TINY = Path(__file__).resolve().parents[1] / "scpert_dist" / "configs" / "pretrain_tiny.toml"
RAY_ARGS = dict(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")


def _loss_rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return c.execute("select count(*) from metrics where key = 'loss'").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.fixture
def ray_fast_fail():
    """Local Ray whose workers see MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 / TIMEOUT=5 (job-level env), so a dead server
    fails each call at once instead of MLflow's default 7 retries with exponential backoff. Restores a Ray like
    conftest's `ray_local` afterwards if one was running."""
    import ray

    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    was = ray.is_initialized()
    if was:
        ray.shutdown()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(**RAY_ARGS, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if was:
        ray.init(**RAY_ARGS)


@pytest.mark.slow
@pytest.mark.ray
def test_mlflow_server_dies_mid_run_training_goes_on(ray_fast_fail, tmp_path):
    import mlflow
    from conftest import SHARED
    from shards_fixture import simulated_shards

    from scpert_dist.checkpoint import load_pretrained
    from scpert_dist.config import load
    from scpert_dist.train.pretrain import PretrainConfig, run_pretraining

    shards = simulated_shards(tmp_path / "data", metadata=SHARED)
    db, art, port = tmp_path / "mlflow.db", tmp_path / "artifacts", free_port()
    art.mkdir()
    server = start_server(db, art, port)
    uri = f"http://127.0.0.1:{port}"
    steps = 30
    cfg = load(PretrainConfig, TINY, [f"data.shards={shards}", f"tracking.uri={uri}",
                                      f"checkpoint.storage={tmp_path / 'ray'}", "checkpoint.name=mlflow_dies",
                                      "tracking.log_every=1", f"optim.max_steps={steps}", "optim.batch_size=8",
                                      "checkpoint.every_n_steps=10", "objective.tasks=mask"])
    killed_after = {}

    def killer():
        t0 = time.time()
        while time.time() - t0 < 300 and server.poll() is None:
            n = _loss_rows(db)
            if n >= 3:  # a few steps are in MLflow: kill the server mid-run
                killed_after["loss_rows"] = n
                kill(server)
                return
            time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            res = run_pretraining(cfg, progress=False)
    finally:
        th.join(5)
        kill(server)
    assert killed_after, "the server was never killed mid-run (no loss rows reached MLflow)"
    # training went on to the end and exported loadable weights
    assert res.metrics["step"] == steps
    model, _, info = load_pretrained(res.checkpoint_dir)
    assert info["genes"] and sum(p.numel() for p in model.parameters()) > 0
    # the driver reported the tracking failure once (not once per call)
    msgs = [str(w.message) for w in rec if "MLflow" in str(w.message) and "fail" in str(w.message)]
    assert len(msgs) == 1, msgs
    # the record on the (restarted) server stops where the server died and is not marked a clean FINISHED run
    server = start_server(db, art, port)
    try:
        client = mlflow.MlflowClient(uri)
        run = client.get_run(res.run_id)
        hist = [m.step for m in client.get_metric_history(res.run_id, "loss")]
        assert hist and max(hist) < steps, hist
        assert run.info.status != "FINISHED"
    finally:
        kill(server)
