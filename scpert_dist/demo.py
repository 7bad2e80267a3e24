"""The demo pipeline: simulate -> ingest (the real ingestion code) -> pretrain (Ray Train) -> finetune + benchmark
-> a finetuned model registered in MLflow (alias `champion`) and the `scpert predict` command that uses it.

Every stage is the same code a user runs on real files; only the input is semi-synthetic.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import typer

from . import console
from . import schema as S
from .config import PACKAGED, load, with_overrides
from .data.readers.sciplex import prepare_sciplex
from .data.shards.ingest import ingest_gctx
from .data.simulate import simulate
from .finetune.config import FinetuneConfig
from .paths import ensure_writable_dir, metadata_dir
from .tracking import Tracker
from .train.settings import PretrainConfig

DEMO_MODEL = "scpert-demo"
"""Registered model name of the demo's finetuned model (alias `champion`)."""
DEMO_FINETUNE = {"optim.epochs": 2, "optim.steps_per_epoch": 15, "optim.batch_size": 64, "optim.cond_steps": 150,
                 "threads": 1, "model.decoder": "lstm", "model.drug_rep": "morgan"}
"""The demo's registered finetuning: the benchmark's quick budget, 2 epochs (early stopping on validation drugs)."""


def _stage(name: str):
    typer.secho(f"\n== {name} ==", bold=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    typer.echo(f"   ({time.perf_counter() - t0:.1f} s)")


def predict_example(model: str, adata: str | Path, split: str, tracking: str, out: str | Path = "pred.h5ad") -> str:
    """A `scpert predict` command that works on `model`: a held-out (test) drug of `adata`'s `split`, a cell line
    and a dose that drug was measured at."""
    import anndata as ad


    obs = ad.read_h5ad(adata, backed="r").obs
    treated = obs[~obs[S.OBS_CONTROL].to_numpy(bool)]
    test = treated[treated[split].astype(str) == "test"] if split in treated else treated
    row = (test if len(test) else treated).sort_values([S.OBS_DRUG, S.OBS_CELL_LINE, S.OBS_DOSE]).iloc[0]
    args = ["scpert", "predict", "--model", model, "--drug", str(row[S.OBS_DRUG]),
            "--cell-line", str(row[S.OBS_CELL_LINE]), "--dose", f"{float(row[S.OBS_DOSE]):g}",
            "--out", str(out), "--tracking", tracking]
    return shlex.join(args)


def runs_table_url(ui: str, tracking_uri: str, run_id: str | None) -> str:
    """The MLflow UI's runs table of `run_id`'s experiment (MLflow 3 opens an experiment on its Traces page)."""
    if not run_id:
        return f"{ui}/#/experiments"
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return f"{ui}/#/experiments/{exp}/runs"


def register_demo_model(sc_path: Path, pretrained: str, tracking_uri: str, out: Path, seed: int = 0) -> dict:
    """A short `scpert finetune` from the demo's pretraining, registered as DEMO_MODEL with alias `champion`."""
    from .finetune.train import run_finetune

    cfg = with_overrides(FinetuneConfig(), {**DEMO_FINETUNE, "data.path": str(sc_path), "data.split": "split_chemcpa_ood",
                                            "model.pretrained": pretrained, "out": str(out),
                                            "tracking.uri": tracking_uri, "seed": seed})
    res = run_finetune(cfg, run_name="demo-lstm-morgan", tags={"scpert.stage": "finetune", "scpert.demo": "true"})
    if res.run_id is None:
        return {"run_id": None, "version": None, "model": str(res.model_dir)}
    version = Tracker.attach(tracking_uri, res.run_id).register_model(
        DEMO_MODEL, metrics={"best_val_logfc_pearson": res.val_metrics.get("val_logfc_pearson", float("nan"))},
        tags={"scpert.demo": "true"}, alias="champion",
        description="scpert demo: LSTM decoder, Morgan drug representation, finetuned from the demo's pretraining "
                    "on SEMI-SYNTHETIC data (not a model of real cells)")
    return {"run_id": res.run_id, "version": version, "model": f"models:/{DEMO_MODEL}@champion"}


def run_demo(*, out: Path, preset: str = "default", metadata: str | None = None, workers: int = 2,
             pretrain_steps: int = 0, n_seeds: int = 2, tracking_uri: str | None = None, seed: int = 0) -> dict:
    out = ensure_writable_dir(out)

    if console.current() is not None:  # library messages into the demo's folder
        console.current().set_log_path(out / "logs" / "libraries.log")
    meta = metadata_dir(metadata)
    tracking_uri = tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    t_all = time.perf_counter()

    t0 = _stage("1/5 simulate the embedded default (SEMI-SYNTHETIC)")
    sim_dir = out / "simulated"
    summary = simulate(sim_dir, preset=preset, metadata=meta, seed=seed)
    typer.echo(f"   metadata: {summary.get('metadata', '?')}")
    _done(t0)

    t0 = _stage("2/5 ingest: LINCS-shaped GCTX -> Parquet shards; sci-Plex3-shaped h5ad -> AnnData + splits")

    bulk = sim_dir / "bulk"
    shards = out / "shards"
    manifest = ingest_gctx(bulk / "lincs_level5.gctx", shards, siginfo=bulk / "siginfo.txt",
                           geneinfo=bulk / "geneinfo.txt", compounds=bulk / "compounds.txt", metadata=meta,
                           rows_per_shard=1000)  # several shards, so every Ray Train worker gets a stream
    typer.echo(f"   {manifest['n_rows']} signatures x {manifest['n_genes']} genes in {len(manifest['shards'])} shards")

    sc_path = out / "sciplex3_sim_processed.h5ad"
    info = prepare_sciplex(sim_dir / "sciplex" / "sciplex3_sim.h5ad", sc_path, split="chemcpa_ood", seed=seed,
                           metadata=meta, manifest=shards / "manifest.json", landmarks_only=True)
    typer.echo(f"   {info['n_obs']} cells x {info['n_vars']} genes ({info['input_state']}) -> {sc_path}")
    _done(t0)

    t0 = _stage(f"3/5 pretrain: Ray Data -> Ray Train ({workers} workers) -> MLflow")
    from .train.pretrain import run_pretraining

    overrides = [f"data.shards={shards}", f"scaling.num_workers={workers}", f"tracking.uri={tracking_uri}",
                 f"checkpoint.storage={(out / 'ray_results').resolve()}"]
    if pretrain_steps:
        overrides.append(f"optim.max_steps={pretrain_steps}")
    cfg = load(PretrainConfig, PACKAGED / "pretrain_demo.toml", overrides)
    pre = run_pretraining(cfg)
    typer.echo(f"   MLflow run {pre.run_id}; Table-1 metrics: "
               + ", ".join(f"{k}={v:.3g}" for k, v in pre.metrics.items() if isinstance(v, float)))
    _done(t0)

    t0 = _stage("4/5 finetune + 5/5 benchmark on unseen drugs (chemCPA OOD split) vs baselines")
    from .evaluate.accuracy import run_benchmark

    table = run_benchmark(sc_path, "chemcpa_ood", shards_dir=shards, pretrained=pre.checkpoint_dir,
                          seeds=tuple(range(n_seeds)), quick=True, out_dir=out / "benchmark",
                          tracking_uri=tracking_uri)
    md = (out / "benchmark" / "benchmark.md").read_text()
    typer.echo(md)
    _done(t0)

    t0 = _stage(f"finetune the model to use, register it in MLflow as {DEMO_MODEL}@champion")
    reg = register_demo_model(sc_path, pre.run_id or str(pre.checkpoint_dir), tracking_uri, out / "model", seed=seed)
    typer.echo(f"   MLflow run {reg['run_id']}, registered model {DEMO_MODEL} version {reg['version']}")
    _done(t0)
    cmd = predict_example(reg["model"], sc_path, "split_chemcpa_ood", tracking_uri, out / "pred.h5ad")
    typer.secho(f"\ndemo finished in {time.perf_counter() - t_all:.0f} s. Outputs: {out}/", fg="green")
    typer.echo(f"predict with the registered model (a held-out drug):\n  {cmd}\n"
               f"MLflow UI: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1 --host 127.0.0.1 "
               f"--port 5000 --backend-store-uri {tracking_uri}\n"
               f"  then the finetuning runs: {runs_table_url('http://127.0.0.1:5000', tracking_uri, reg['run_id'])}")
    return {"pretrain_run": pre.run_id, "table": table, "model_run": reg["run_id"], "model": reg["model"],
            "predict": cmd}
