"""`ray job submit` of a tiny sweep to a real local Ray head (cluster/local/start.sh on loopback, free ports, a short
state dir), with the MLflow server that start.sh starts beside it. Stops only what it started (cluster/local/stop.sh;
never `ray stop`)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cmd: list[str], env: dict, timeout: float, what: str) -> None:
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        last = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        if last.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"{what} not up after {timeout} s: {last.stderr[-1500:] if last else ''}")


def test_ray_job_submit_tiny_sweep(shared_data):
    from mlflow.tracking import MlflowClient

    state = Path(tempfile.mkdtemp(prefix="scpj-"))  # short: Ray's socket paths under it must stay < 108 bytes
    ports = {"RAY_PORT": _free_port(), "DASHBOARD_PORT": _free_port(), "MLFLOW_PORT": _free_port()}
    mlflow_uri = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
    bindir = str(Path(sys.executable).parent)  # the job runs with the python on PATH at `ray start`
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "PATH": f"{bindir}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": mlflow_uri,
           "SCPERT_METADATA": str(shared_data)}
    env.pop("RAY_ADDRESS", None)
    address = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}"
    out = state / "out"
    t0 = time.time()
    try:
        subprocess.run(["bash", str(REPO / "cluster/local/start.sh"), str(state)], env=env, check=True, timeout=60)
        _wait([f"{bindir}/ray", "job", "list", "--address", address], env, 150, "Ray dashboard")
        _wait([sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{mlflow_uri}/health')"],
              env, 90, "MLflow server")
        t_up = time.time() - t0
        cmd = [f"{bindir}/ray", "job", "submit", "--address", address, "--working-dir", ".",
               "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/sweep.py", "--config",
               "sweeps/tiny.yaml", "--set", f"out={out}", "--set", "space.mask_ratio=0.8"]
        for _ in range(30):  # the dashboard answers before its job agent is registered ("No available agent")
            job = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in job.stderr:
                break
            time.sleep(3)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        m = re.search(r"SWEEP_DONE parent=(\w+) best=(\w+) version=(\d+)", log)
        assert m, log[-4000:]
        parent_id, best_id, version = m.groups()
        print(f"cluster up {t_up:.0f} s, job {time.time() - t0 - t_up:.0f} s")

        client = MlflowClient(mlflow_uri)
        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED" and parent.data.tags["scpert.best_run_id"] == best_id
        kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
        # one mask ratio x 2 decoders keeps CI short; the 8-trial grid (2 ratios x 2 task sets x 2 decoders,
        # sweeps/grid_tiny.yaml) was run the same way by hand, and test_tune covers distinct pretrainings per ratio
        assert len(kids) == 2
        assert {(r.data.tags["scpert.mask_ratio"], r.data.tags["scpert.decoder"]) for r in kids} == {
            ("0.8", "mlp"), ("0.8", "gru")}
        pre = {r.data.params["pretrained"] for r in kids}
        assert len(pre) == 1  # one pretraining, shared by both decoders
        for pid in pre:
            assert client.get_run(pid).data.tags["scpert.stage"] == "pretrain"
        mv = client.get_model_version("scpert-tiny", version)
        assert mv.run_id == best_id and "metric.test_logfc_pearson" in mv.tags
        # `scpert predict` from the best run id, through the MLflow server's artifact proxy
        pred = state / "pred.h5ad"
        adata = out / "data" / "sciplex.h5ad"
        import anndata as ad

        obs = ad.read_h5ad(adata, backed="r").obs
        drug = obs.loc[obs["split_chemcpa_ood"] == "test", "drug"].iloc[0]
        r = subprocess.run([f"{bindir}/scpert", "predict", "--model", best_id, "--data", str(adata), "--drug", drug,
                            "--cell-line", str(obs["cell_line"].iloc[0]), "--dose", "1.0", "--n-cells", "5",
                            "--out", str(pred), "--tracking", mlflow_uri], env=env, capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        assert ad.read_h5ad(pred).n_obs == 5
    finally:
        subprocess.run(["bash", str(REPO / "cluster/local/stop.sh"), str(state)], env=env, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
