"""The one Tracker of every stage, on a real MLflow store: what it logs, and the rule that a tracking failure
never stops training (reported once, the run tagged), for finetuning too."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ft_fixture import ft_config, make_adata
from mlflow_server import free_port, kill, start_server

from scpert_dist.tracking import FAILED_TAG, Tracker


def test_tracker_logs_params_metrics_artifacts(mlflow_uri, tmp_path):
    import mlflow

    art = tmp_path / "curve.txt"
    art.write_text("1,2\n")
    t = Tracker.start(mlflow_uri, "e", run_name="t", params={"optim": {"lr": 0.001}, "seed": 3},
                      tags={"scpert.stage": "test"})
    t.log_metrics({"loss": 1.5, "bad": float("nan"), "text": "x"}, step=2)
    t.log_artifact(art)
    t.end()
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(t.run_id)
    assert run.data.params == {"optim.lr": "0.001", "seed": "3"}
    assert run.data.metrics == {"loss": 1.5} and run.info.status == "FINISHED"
    assert run.info.run_name == "t" and run.data.tags["scpert.stage"] == "test"
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["curve.txt"]
    assert FAILED_TAG not in run.data.tags


def test_unreachable_store_gives_a_disabled_tracker_and_one_warning(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = Tracker.start(f"http://127.0.0.1:{free_port()}", params={"a": 1})
        t.log_metrics({"loss": 1.0}, step=0)
        t.log_params({"b": 2})
        t.end()
    assert t.run_id is None and t.failed and not t.active
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and "training goes on" in msgs[0]


@pytest.mark.slow  # ~25 s: a real mlflow server is started twice
def test_finetuning_goes_on_when_the_tracking_server_dies(tmp_path, monkeypatch):
    """The server is SIGKILLed after the first epoch (from run_finetune's own on_epoch callback): the run still
    trains every epoch and saves its model; the failure is reported once; the record stops where the server died."""
    import mlflow

    from scpert_dist.finetune.config import FinetuneModelConfig
    from scpert_dist.finetune.train import run_finetune

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    db, art, port = tmp_path / "mlflow.db", tmp_path / "artifacts", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(db, art, port)
    seen = []

    def on_epoch(rec, run_id):
        seen.append((rec["epoch"], run_id))
        if rec["epoch"] == 0:
            kill(server)

    a, _ = make_adata(n_drugs=6, cells_per=6, n_genes=24)
    cfg = ft_config(split="split_test", epochs=3, steps_per_epoch=2, batch_size=8, out=str(tmp_path / "model"),
                         uri=uri, model=FinetuneModelConfig(decoder="mlp", drug_rep="morgan"))
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = run_finetune(cfg, a, on_epoch=on_epoch)
    finally:
        kill(server)
    assert [e for e, _ in seen] == [0, 1, 2] and len({rid for _, rid in seen}) == 1
    assert len(r.history) == 3 and (r.model_dir / "model.safetensors").is_file()
    failures = [x for x in w if issubclass(x.category, RuntimeWarning) and "training goes on" in str(x.message)]
    assert len(failures) == 1
    server = start_server(db, art, port)
    try:
        run = mlflow.MlflowClient(uri).get_run(r.run_id)
        hist = mlflow.MlflowClient(uri).get_metric_history(r.run_id, "train_loss")
    finally:
        kill(server)
    assert [m.step for m in hist] == [0]  # only the epoch logged before the server died
    assert run.info.status != "FINISHED" and np.isfinite(hist[0].value)
