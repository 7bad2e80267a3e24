"""`scpert demo`: the whole workflow on the embedded semi-synthetic default, in minutes on a laptop."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command()
def demo(
    out: Path = typer.Option(Path("scpert_demo"), help="Folder for everything the demo writes."),
    preset: str = typer.Option("default", help="Simulator size preset: tiny | default | large."),
    metadata: str | None = typer.Option(
        None, help="Folder of real public LINCS/sci-Plex3 metadata files ($SCPERT_METADATA); none = synthetic."),
    workers: int = typer.Option(2, help="Ray Train workers for pretraining."),
    pretrain_steps: int = typer.Option(0, help="Pretraining steps (0 = the preset's default)."),
    seeds: int = typer.Option(2, help="Seeds for the benchmark."),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default sqlite:///mlflow.db here)."),
    seed: int = typer.Option(0, help="Simulator seed."),
) -> None:
    """Simulate -> ingest -> pretrain (Ray Train) -> finetune -> benchmark vs baselines; prints the table.

    The default data is SEMI-SYNTHETIC: a simulator built on real public metadata (genes, cell lines, compounds,
    screen design) when a metadata folder is given, else on synthetic metadata. Its numbers are not results on
    real data.
    """
    from ..demo import run_demo

    run_demo(out=out, preset=preset, metadata=metadata, workers=workers, pretrain_steps=pretrain_steps,
             n_seeds=seeds, tracking_uri=tracking_uri, seed=seed)
