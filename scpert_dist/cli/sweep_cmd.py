"""`scpert runs` (listing MLflow runs). `scpert sweep` is not written yet."""

from __future__ import annotations

import typer

from . import app


@app.command("runs")
def runs(
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="MLflow experiment name (default: all)"),
    tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    max_runs: int = typer.Option(50, "--max-runs"),
) -> None:
    """List MLflow runs (id, name, status, key metrics) as a table."""
    from ..registry import format_table, list_runs

    typer.echo(format_table(list_runs(tracking_uri, experiment, max_runs)))
