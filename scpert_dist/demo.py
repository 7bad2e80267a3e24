"""The demo pipeline: simulate -> ingest (the real ingestion code) -> pretrain (Ray Train) -> finetune + benchmark.

Every stage is the same code a user runs on real files; only the input is semi-synthetic.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer


def _stage(name: str):
    typer.secho(f"\n== {name} ==", bold=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    typer.echo(f"   ({time.perf_counter() - t0:.1f} s)")


def run_demo(*, out: Path, preset: str = "default", metadata: str | None = None, workers: int = 2,
             pretrain_steps: int = 0, n_seeds: int = 2, tracking_uri: str | None = None, seed: int = 0) -> dict:
    from .paths import ensure_writable_dir, metadata_dir

    out = ensure_writable_dir(out)
    meta = metadata_dir(metadata)
    tracking_uri = tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    t_all = time.perf_counter()

    t0 = _stage("1/5 simulate the embedded default (SEMI-SYNTHETIC)")
    from .data.simulate import simulate

    sim_dir = out / "simulated"
    summary = simulate(sim_dir, preset=preset, metadata=meta, seed=seed)
    typer.echo(f"   metadata: {summary.get('metadata', '?')}")
    _done(t0)

    t0 = _stage("2/5 ingest: LINCS-shaped GCTX -> Parquet shards; sci-Plex3-shaped h5ad -> AnnData + splits")
    from .data.lincs import ingest_gctx

    bulk = sim_dir / "bulk"
    shards = out / "shards"
    manifest = ingest_gctx(bulk / "lincs_level5.gctx", shards, siginfo=bulk / "siginfo.txt",
                           geneinfo=bulk / "geneinfo.txt", compounds=bulk / "compounds.txt", metadata=meta,
                           rows_per_shard=1000)  # several shards, so every Ray Train worker gets a stream
    typer.echo(f"   {manifest['n_rows']} signatures x {manifest['n_genes']} genes in {len(manifest['shards'])} shards")
    from .data.sciplex import prepare_sciplex

    sc_path = out / "sciplex3_sim_processed.h5ad"
    info = prepare_sciplex(sim_dir / "sciplex" / "sciplex3_sim.h5ad", sc_path, split="chemcpa_ood", seed=seed,
                           metadata=meta, manifest=shards / "manifest.json", landmarks_only=True)
    typer.echo(f"   {info['n_obs']} cells x {info['n_vars']} genes ({info['input_state']}) -> {sc_path}")
    _done(t0)

    t0 = _stage(f"3/5 pretrain: Ray Data -> Ray Train ({workers} workers) -> MLflow")
    from .config import load
    from .train.pretrain import PretrainConfig, run_pretraining

    overrides = [f"data.shards={shards}", f"scaling.num_workers={workers}", f"tracking.uri={tracking_uri}",
                 f"checkpoint.storage={(out / 'ray_results').resolve()}"]
    if pretrain_steps:
        overrides.append(f"optim.max_steps={pretrain_steps}")
    cfg = load(PretrainConfig, Path(__file__).parent / "configs" / "pretrain_demo.toml", overrides)
    pre = run_pretraining(cfg)
    typer.echo(f"   MLflow run {pre.run_id}; Table-1 metrics: "
               + ", ".join(f"{k}={v:.3g}" for k, v in pre.metrics.items() if isinstance(v, float)))
    _done(t0)

    t0 = _stage("4/5 finetune + 5/5 benchmark on unseen drugs (chemCPA OOD split) vs baselines")
    from .evaluate.benchmark import run_benchmark

    table = run_benchmark(sc_path, "chemcpa_ood", shards_dir=shards, pretrained=pre.checkpoint_dir,
                          seeds=tuple(range(n_seeds)), quick=True, out_dir=out / "benchmark",
                          tracking_uri=tracking_uri)
    md = (out / "benchmark" / "benchmark.md").read_text()
    typer.echo(md)
    _done(t0)
    typer.secho(f"\ndemo finished in {time.perf_counter() - t_all:.0f} s. Outputs: {out}/  "
                f"MLflow: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1", fg="green")
    return {"pretrain_run": pre.run_id, "table": table}
