"""`scpert runs` over a real MLflow sqlite store; `scpert sweep` (Ray Tune + ASHA + pretraining cache + registry)
under a real local Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CLI = "import sys; from scpert_dist.cli import main; sys.argv[0] = 'scpert'; main()"


@pytest.mark.slow
def test_scpert_runs_lists_real_runs(mlflow_uri):
    import mlflow

    from scpert_dist.errors import ConfigError
    from scpert_dist.runs import list_runs

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


# ------------------------------------------------------------------------------------------- sweeps (Ray Tune)

def registered_versions(tracking_uri: str, name: str) -> list[dict]:
    """Versions of a registered model (newest first): version, run_id, source and tags (incl. metric.* tags)."""
    from mlflow.tracking import MlflowClient

    vs = MlflowClient(tracking_uri=tracking_uri).search_model_versions(f"name = '{name}'")
    return sorted(({"version": str(v.version), "run_id": v.run_id, "source": v.source, **dict(v.tags)} for v in vs),
                  key=lambda r: -int(r["version"]))


SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def _tiny_sweep(tmp_path, uri, *extra):
    from scpert_dist.tune import load_sweep

    return load_sweep(SWEEPS / "tiny.yaml", [f"out={tmp_path / 'sweep'}", f"tracking_uri={uri}",
                                             "space.mask_ratio=0.15", *extra])


def test_pretraining_cache_lookup_by_hash_tag(tmp_path, mlflow_uri, monkeypatch):
    """The cache is the MLflow tag `scpert.pretraining_hash` on a FINISHED pretraining run that holds a 'model/'
    artifact: such a run is found (from any experiment); a FAILED one, one without weights, or another stage's run
    with a 'model/' is not; an all-hit grid pretrains nothing (ensure_pretrained never reaches Ray)."""
    import mlflow

    from scpert_dist.tune import (
        HASH_TAG,
        ensure_pretrained,
        find_pretraining,
        load_sweep,
        pretrain_configs,
        trial_pretraining,
        with_run_settings,
    )

    monkeypatch.chdir(tmp_path)
    cfg = with_run_settings(load_sweep(SWEEPS / "tiny.yaml"), str(tmp_path / "shards"), mlflow_uri, tmp_path)
    pcs = pretrain_configs(cfg)
    hashes = {h: h for h in pcs}
    assert len(pcs) == 2 and all(pc.pretraining_hash() == h for h, pc in pcs.items())  # the two mask ratios differ
    # a trial finds its pretraining by the hash of the config it builds from its point (decoders are not in it)
    for point in cfg.space.grid():
        pc = trial_pretraining(cfg, point)
        assert pc.objective.mask_ratio == point["mask_ratio"] and pc.pretraining_hash() in pcs
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"x")
    mlflow.set_tracking_uri(mlflow_uri)
    ids = {}
    for i, h in enumerate(hashes.values()):
        mlflow.set_experiment(f"pre-{i}")
        with mlflow.start_run(tags={HASH_TAG: h, "scpert.stage": "pretrain"}) as r:
            mlflow.log_artifacts(str(tmp_path / "w"), "model")
        ids[h] = r.info.run_id
        with mlflow.start_run(tags={HASH_TAG: h, "scpert.stage": "pretrain"}):  # newer, without weights: no entry
            pass
        with mlflow.start_run(tags={HASH_TAG: h, "scpert.stage": "finetune"}):  # newer, has 'model/', not a pretraining
            mlflow.log_artifacts(str(tmp_path / "w"), "model")
    with mlflow.start_run(tags={HASH_TAG: "f" * 16, "scpert.stage": "pretrain"}):
        mlflow.log_artifacts(str(tmp_path / "w"), "model")
        mlflow.set_tag("x", "y")
    mlflow.tracking.MlflowClient(mlflow_uri).set_terminated(mlflow.last_active_run().info.run_id, "FAILED")
    for h, rid in ids.items():
        assert find_pretraining(mlflow_uri, h) == rid
    assert find_pretraining(mlflow_uri, "f" * 16) is None and find_pretraining(mlflow_uri, "0" * 16) is None
    runs, new = ensure_pretrained(pcs, mlflow_uri, log=lambda *_: None)
    assert runs == ids and new == []


def test_sweep_config_errors_name_the_field(tmp_path):
    from scpert_dist.errors import ConfigError
    from scpert_dist.tune import load_sweep

    with pytest.raises(ConfigError, match="space.decoder"):
        load_sweep(SWEEPS / "tiny.yaml", ["space.decoder=lstm,rnn"])
    with pytest.raises(ConfigError, match="finetune"):
        load_sweep(SWEEPS / "tiny.yaml", ["finetune.epochz=3"])
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_sweep(SWEEPS / "tiny.yaml", ["space.mask_ratio=0.15,1.5"])
    bad = subprocess.run([sys.executable, "-c", CLI, "sweep", "--config", str(SWEEPS / "paper.yaml"), "--set",
                          f"data.shards={tmp_path / 'nope'}", "--set", f"data.adata={tmp_path / 'x.h5ad'}", "--set",
                          f"out={tmp_path / 'out'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "data.shards" in bad.stderr + bad.stdout, bad.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing written
    paper = load_sweep(SWEEPS / "paper.yaml")
    assert paper.space.mask_ratio == [0.15, 0.5, 0.8] and paper.space.tasks == ["mask", "mask+cell+drug+dose"]
    assert paper.space.decoder == ["lstm", "gru", "mlp", "transformer"]


@pytest.mark.slow  # 212-222 s measured at load ~20 (2 cores shared by several test runs); pretraining dominates
@pytest.mark.ray
def test_sweep_pretrains_once_asha_on_validation_registers_best(ray_local, tmp_path, mlflow_uri, monkeypatch):
    """Tiny sweep twice on one MLflow store: the 1st pretrains its single pretraining config, the 2nd finds it by the
    `scpert.pretraining_hash` tag and pretrains nothing. Trials are nested runs whose per-epoch validation metric is
    what Tune/ASHA saw; test metrics exist only on the selected run; the registered version points at it and
    `scpert predict` works from its run id."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from scpert_dist.api import predict_h5ad
    from scpert_dist.tune import HASH_TAG, METRIC, run_sweep

    monkeypatch.chdir(tmp_path)  # MLflow's default ./mlruns artifact root
    cfg = _tiny_sweep(tmp_path, mlflow_uri)
    res = run_sweep(cfg, log=print)
    client = MlflowClient(mlflow_uri)
    (h,) = res.pretrain_runs
    assert res.pretrained_now == [h]
    pre = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`{HASH_TAG}` = '{h}'")
    pre = [r for r in pre if r.data.tags.get("scpert.stage") == "pretrain"]
    assert [r.info.run_id for r in pre] == [res.pretrain_runs[h]]

    exp = client.get_experiment_by_name(cfg.experiment).experiment_id
    kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(kids) == len(res.rows) == 2
    by_id = {r.info.run_id: r for r in kids}
    for row in res.rows:
        run = by_id[row["run_id"]]
        assert run.data.tags["scpert.decoder"] == row["decoder"]
        # the typed config the trial ran, as params: its decoder and lr, the pretraining run found by hash
        assert run.data.params["model.pretrained"] == res.pretrain_runs[h] == res.pretrain_runs[
            run.data.tags["scpert.pretrained_from_hash"]]
        assert run.data.params["model.decoder"] == row["decoder"] and float(run.data.params["optim.lr"]) == row["lr"]
        # the swept hyperparameters are params (MLflow's compare view plots params), the run is named by them
        assert run.data.params["swept.decoder"] == row["decoder"] and run.data.params["swept.tasks"] == row["tasks"]
        assert run.info.run_name.startswith(f"mask{row['mask_ratio']}-{row['tasks']}-{row['decoder']}-")
        assert run.info.status == "FINISHED"  # also when ASHA stopped it early (then tagged so)
        assert (run.data.tags.get("scpert.stopped_early") == "true") == (row["status"] == "stopped")
        hist = [m.value for m in sorted(client.get_metric_history(row["run_id"], METRIC), key=lambda m: m.step)]
        # what Tune/ASHA received per epoch is exactly the validation metric the finetune loop logged
        assert row["epochs"] >= 1 and row["val_history"] == pytest.approx(hist[:row["epochs"]])
        assert row["status"] in ("completed", "stopped")
        if row["status"] == "completed":
            assert row["epochs"] == len(hist) == cfg.finetune.optim.epochs and run.info.status == "FINISHED"
        assert "test_logfc_pearson" not in run.data.metrics or row["run_id"] == res.best["run_id"]
    done = [r for r in res.rows if r["status"] == "completed"]
    assert res.best["best_val_logfc_pearson"] == max(r["best_val_logfc_pearson"] for r in done)
    best_run = client.get_run(res.best["run_id"])
    assert np.isfinite(best_run.data.metrics["test_logfc_pearson"]) and best_run.data.metrics["test_drugs"] > 0
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["scpert.best_run_id"] == res.best["run_id"]
    assert {a.path for a in client.list_artifacts(res.parent_run_id)} >= {"sweep_results.md", "sweep_results.json",
                                                                         "plots"}
    assert res.best["run_id"] in res.table and res.table.startswith("| trial")
    (v,) = registered_versions(mlflow_uri, cfg.register_as)
    assert v["run_id"] == res.best["run_id"] and v["version"] == res.model_version
    assert float(v["metric.test_logfc_pearson"]) == pytest.approx(best_run.data.metrics["test_logfc_pearson"], rel=1e-5)
    champion = client.get_model_version_by_alias(cfg.register_as, "champion")
    assert champion.run_id == res.best["run_id"] and res.best["decoder"] in champion.description

    import anndata as ad

    adata = ad.read_h5ad(tmp_path / "sweep" / "data" / "sciplex.h5ad")
    test_drug = adata.obs.loc[adata.obs[cfg.finetune.data.split] == "test", "drug"].iloc[0]
    line = adata.obs["cell_line"].iloc[0]
    pred = predict_h5ad(res.best["run_id"], tmp_path / "sweep" / "data" / "sciplex.h5ad", tmp_path / "pred.h5ad",
                        drug=test_drug, cell_line=line, dose_um=1.0, n_cells=8, tracking=mlflow_uri)
    assert ad.read_h5ad(pred).shape == (8, adata.n_vars)
    (tmp_path / "user").mkdir()
    monkeypatch.chdir(tmp_path / "user")  # the registry lookup must not create ./mlflow.db in the user's folder
    by_alias = predict_h5ad(f"models:/{cfg.register_as}@champion", tmp_path / "sweep" / "data" / "sciplex.h5ad",
                            tmp_path / "pred2.h5ad", drug=test_drug, cell_line=line, dose_um=1.0, n_cells=8,
                            tracking=mlflow_uri)
    assert ad.read_h5ad(by_alias).shape == (8, adata.n_vars)
    assert not list((tmp_path / "user").iterdir())

    # the same pretraining config again (other decoder only): cache hit, nothing pretrained
    res2 = run_sweep(_tiny_sweep(tmp_path, mlflow_uri, "space.decoder=mlp", "name=again"), log=print)
    assert res2.pretrained_now == [] and res2.pretrain_runs == res.pretrain_runs
    pre2 = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`{HASH_TAG}` = '{h}'")
    assert len([r for r in pre2 if r.data.tags.get("scpert.stage") == "pretrain"]) == 1
    assert client.get_run(res2.parent_run_id).data.tags["scpert.pretrained_now"] == "none"


def test_sweep_parent_params_accept_the_four_task_set(mlflow_uri):
    """'mask+cell+drug+dose' in a param key was refused by MLflow ('+' is not allowed) and killed every sweep over
    task sets after pretraining (found by a `ray job submit` of sweeps/grid_tiny.yaml); the keys now log."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from scpert_dist.config import replace_at
    from scpert_dist.train.settings import PretrainConfig
    from scpert_dist.tune import pretrain_run_params

    configs = {f"h{i}": replace_at(PretrainConfig(), {"objective.mask_ratio": m, "objective.tasks": t})
               for i, (m, t) in enumerate([(0.15, "mask"), (0.15, "mask+cell+drug+dose"), (0.8, "mask+dose+cell+drug")])}
    params = pretrain_run_params(configs, {"h0": "r1", "h1": "r2", "h2": "r3"})
    assert params["pretrain_run.0.15_mask-cell-drug-dose"] == "r2" and len(params) == 3
    assert params["pretrain_run.0.8_mask-cell-drug-dose"] == "r3"  # the task set in its canonical order
    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("keys"))
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    assert client.get_run(run.info.run_id).data.params == params
