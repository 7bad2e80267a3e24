"""`scpert runs` over a real MLflow sqlite store."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLI = "import sys; from scpert_dist.cli import main; sys.argv[0] = 'scpert'; main()"


@pytest.mark.slow
def test_scpert_runs_lists_real_runs(mlflow_uri):
    import mlflow

    from scpert_dist.errors import ConfigError
    from scpert_dist.registry import list_runs

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("exp-a")
    with mlflow.start_run(run_name="alpha") as r:
        mlflow.log_metric("val_loss", 0.25)
    ids = {row["run_id"]: row for row in list_runs(mlflow_uri, "exp-a")}
    assert ids[r.info.run_id]["val_loss"] == 0.25 and ids[r.info.run_id]["status"] == "FINISHED"
    with pytest.raises(ConfigError):
        list_runs(mlflow_uri, "nope")
    out = subprocess.run([sys.executable, "-c", CLI, "runs", "--tracking-uri", mlflow_uri, "-e", "exp-a"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert r.info.run_id in out.stdout and "alpha" in out.stdout and "0.25" in out.stdout
    bad = subprocess.run([sys.executable, "-c", CLI, "runs", "--tracking-uri", mlflow_uri, "-e", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
