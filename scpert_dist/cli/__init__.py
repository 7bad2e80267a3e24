"""The `scpert` command. Thin: every command parses its options and calls package code.

Each stage registers its commands from its own module (lincs_cmd, simulate_cmd, sciplex_cmd, pretrain_cmd,
finetune_cmd, demo_cmd), onto the apps defined here.
"""

from __future__ import annotations

import importlib
import sys

import typer

from .. import console
from ..errors import ScpertError

HELP = """\
scpert-dist: pretrain a gene-token transformer on bulk drug perturbations (LINCS L1000), finetune it on
single-cell drug perturbations (sci-Plex3), and predict single-cell responses to drugs the finetuning never saw.

Workflow:

  1. data      scpert data simulate  -> semi-synthetic LINCS-shaped GCTX + sci-Plex3-shaped h5ad (default data)
               scpert data fetch     -> download the public LINCS / sci-Plex3 files (resumable, verified)
               scpert data lincs     -> GCTX/GCT + LINCS tables  -> Parquet shards + manifest.json
               scpert data sciplex   -> sci-Plex3 h5ad            -> normalised AnnData with splits
  2. pretrain  scpert pretrain       -> Ray Data stream -> Ray Train (DDP / DeepSpeed ZeRO) -> MLflow run
  3. finetune  scpert finetune       -> condition encoders + pretrained encoder + decoder -> MLflow run
  4. predict   scpert predict        -> per-cell predictions for a drug/SMILES, cell line, dose (h5ad)
  5. evaluate  scpert benchmark      -> the paper's Table 2 metrics + logFC/energy metrics vs baselines

`scpert demo` runs all of it on the embedded semi-synthetic default in a few minutes on a laptop.
Everything trained is tracked in MLflow (default: sqlite:///mlflow.db in the working folder; `mlflow ui`).
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Turn raw public files (or the simulator) into training data.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print measured ratios side by side.", no_args_is_help=True)
baselines_app = typer.Typer(help="Optional external baselines (CPA via cpa-tools).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(baselines_app, name="baselines")

_MODULES = ["lincs_cmd", "simulate_cmd", "sciplex_cmd", "pretrain_cmd", "finetune_cmd", "demo_cmd", "ops_cmd", "sweep_cmd",
            "evaluate_cmd", "fetch_cmd"]
for _m in _MODULES:
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as _e:  # a stage module not written yet
        if _e.name != f"{__name__}.{_m}":
            raise


def _click_exceptions():
    """(ClickException, UsageError) of the click that typer runs on: typer >= 0.29 vendors its own copy
    (`typer._click`), older typer uses `click`."""
    try:
        from typer._click.exceptions import ClickException, UsageError
    except ImportError:  # typer < 0.29
        from click.exceptions import ClickException, UsageError
    return ClickException, UsageError


def main() -> None:
    """Entry point: named errors and usage errors (unknown/missing option, bad value) print a short message and
    exit 2, never a traceback."""
    click_error, usage_error = _click_exceptions()
    words = [a for a in sys.argv[1:3] if not a.startswith("-")]
    console.install("-".join(["scpert", *words]) if words else "scpert")
    try:
        app(standalone_mode=False, prog_name="scpert")
    except ScpertError as e:
        typer.secho(f"error: {type(e).__name__}: {e}", fg="red", err=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except usage_error as e:  # unknown option, missing option, bad value: usage + one line, exit 2
        e.show()
        sys.exit(2)
    except click_error as e:
        e.show()
        sys.exit(e.exit_code)
    finally:
        console.uninstall()
