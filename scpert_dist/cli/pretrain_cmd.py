"""`scpert pretrain` and `scpert bench pretrain`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..config import PACKAGED, load
from . import app, bench_app


@app.command()
def pretrain(
    config: Path = typer.Option(PACKAGED / "pretrain_tiny.toml", help="TOML/YAML config (PretrainConfig)."),
    set_: list[str] = typer.Option([], "--set", help="Override, e.g. --set optim.lr=3e-4 (repeatable)."),
    shards: Path | None = typer.Option(None, help="Shard folder (data.shards)."),
    workers: int | None = typer.Option(None, help="Ray Train workers (scaling.num_workers)."),
    name: str | None = typer.Option(None, help="Run name (checkpoint.name); reuse it with --resume."),
    resume: bool = typer.Option(False, help="Continue a stopped run from its last checkpoint (latest run if no --name)."),
) -> None:
    """Pretrain the gene-token transformer on LINCS shards with Ray Train (DDP on CPU, DeepSpeed ZeRO on GPU).

    Logs config, per-step loss, Table-1 metrics (cell_acc, drug_acc, dose_rmse, mask_rmse on held-out signatures),
    throughput, the weights (safetensors) and a loss curve to MLflow.
    """
    from ..train.pretrain import PretrainConfig, run_pretraining

    overrides = list(set_)
    if shards is not None:
        overrides.append(f"data.shards={shards}")
    if workers is not None:
        overrides.append(f"scaling.num_workers={workers}")
    if name is not None:
        overrides.append(f"checkpoint.name={name}")
    cfg = load(PretrainConfig, config, overrides)
    res = run_pretraining(cfg, resume=resume)
    typer.echo(f"MLflow run: {res.run_id}\npretrained weights: {res.checkpoint_dir}")


@bench_app.command("pretrain")
def bench_pretrain(
    rows: int = typer.Option(4000, help="Signatures in the synthetic shard set."),
    steps: int = typer.Option(30, help="Timed steps per configuration."),
    batch: int = typer.Option(32, help="Batch per worker."),
    preset: str = typer.Option("tiny", help="Model preset."),
    workdir: Path | None = typer.Option(None, help="Scratch folder (default: a temp folder)."),
) -> None:
    """Samples/s and tokens/s of the plain step and of 1 vs 2 Ray Train workers, side by side, with the fraction of
    step time spent waiting for data and the stream start-up seconds, for 2 workers both with each epoch's stream
    started ahead of use and started when the epoch begins; on a GPU also model FLOP utilisation against a measured
    bf16 matmul peak."""
    from ..bench.pretrain import run_bench

    run_bench(rows=rows, steps=steps, batch=batch, preset=preset, workdir=workdir)
