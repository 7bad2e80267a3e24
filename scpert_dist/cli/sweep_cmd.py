"""`scpert sweep` (Ray Tune sweep with a shared pretraining cache, ASHA, MLflow parent/nested runs, model registry)
and `scpert runs` (listing MLflow runs)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from .. import console
from ..runs import format_columns, format_table, list_runs, list_stage_runs
from ..tracking import resolve_uri
from . import app


@app.command("sweep")
def sweep(
    config: Path = typer.Option(..., "--config", "-c", help="sweep YAML/TOML (sweeps/tiny.yaml, sweeps/paper.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set space.decoder=mlp,gru --set out=DIR"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    verbose: bool = typer.Option(False, "--verbose", help="Tune's trial tables and library messages on the console"),
) -> None:
    """Pretrain each distinct pretraining config once (MLflow cache), Tune the finetuning with ASHA on validation
    drugs, test the best trial once, register it, print the results table."""
    from ..tune import load_sweep, run_sweep

    overrides = list(set_) + ([f"tracking_uri={tracking_uri}"] if tracking_uri else [])
    cfg = load_sweep(config, overrides)
    con = console.current()
    if con is not None:
        con.verbose = con.verbose or verbose
        con.set_log_path(Path(cfg.out) / "logs" / "libraries.log")
    res = run_sweep(cfg, log=typer.echo, verbose=verbose)
    url = parent_url(cfg, res)
    typer.echo(f"parent run {res.parent_run_id}{f' ({url})' if url else ''}; best run {res.best['run_id']}; "
               f"predict with it:\n  {predict_command(cfg, res)}")


def predict_command(cfg, res) -> str:
    """The `scpert predict` command for a finished sweep's model (registered: models:/NAME@champion; else the best
    run id) on one of its held-out drugs."""
    from ..demo import predict_example

    model = f"models:/{cfg.register_as}@champion" if res.model_version else res.best["run_id"]
    uri = resolve_uri(cfg.tracking_uri or None)
    adata = cfg.data.adata or str(Path(cfg.out) / "data" / "sciplex.h5ad")
    return predict_example(model, adata, cfg.finetune.data.split, uri)


def parent_url(cfg, res) -> str | None:
    """The MLflow UI page of the sweep's parent run (its nested trials below it), when tracking is a server."""
    from mlflow.tracking import MlflowClient


    uri = resolve_uri(cfg.tracking_uri or None)
    if not uri.startswith(("http://", "https://")):
        return None
    exp = MlflowClient(uri).get_run(res.parent_run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{res.parent_run_id}"


class Kind(str, Enum):
    pretrain = "pretrain"
    finetune = "finetune"
    benchmark = "benchmark"
    sweep = "sweep"


@app.command("runs")
def runs(
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="MLflow experiment name (default: all)"),
    kind: Kind | None = typer.Option(None, "--kind", "-k", help="one stage, with its own columns (pretrain: losses "
                                     "and Table-1 metrics; finetune/sweep: decoder, drug rep, validation logFC r)"),
    tracking_uri: str = typer.Option("sqlite:///mlflow.db", "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    max_runs: int = typer.Option(50, "--max-runs"),
) -> None:
    """List MLflow runs as a table: all runs (id, name, status, a few metrics), or one stage's runs with --kind."""
    if kind is None:
        typer.echo(format_table(list_runs(tracking_uri, experiment, max_runs)))
    else:
        typer.echo(format_columns(list_stage_runs(tracking_uri, kind.value, experiment, max_runs)))
