"""`scpert sweep` (Ray Tune sweep with a shared pretraining cache, ASHA, MLflow parent/nested runs, model registry)
and `scpert runs` (listing MLflow runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command("sweep")
def sweep(
    config: Path = typer.Option(..., "--config", "-c", help="sweep YAML/TOML (sweeps/tiny.yaml, sweeps/paper.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set space.decoder=mlp,gru --set out=DIR"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
) -> None:
    """Pretrain each distinct pretraining config once (MLflow cache), Tune the finetuning with ASHA on validation
    drugs, test the best trial once, register it, print the results table."""
    from ..tune import load_sweep, run_sweep

    overrides = list(set_) + ([f"tracking_uri={tracking_uri}"] if tracking_uri else [])
    res = run_sweep(load_sweep(config, overrides), log=typer.echo)
    typer.echo(f"parent run {res.parent_run_id}; best run {res.best['run_id']} "
               f"(scpert predict --model {res.best['run_id']} ...)")


@app.command("runs")
def runs(
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="MLflow experiment name (default: all)"),
    tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    max_runs: int = typer.Option(50, "--max-runs"),
) -> None:
    """List MLflow runs (id, name, status, key metrics) as a table."""
    from ..registry import format_table, list_runs

    typer.echo(format_table(list_runs(tracking_uri, experiment, max_runs)))
