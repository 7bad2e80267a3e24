"""`scpert data simulate`: the semi-synthetic default dataset (LINCS-shaped GCTX + sci-Plex3-shaped h5ad)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import data_app


@data_app.command("simulate")
def simulate_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder (bulk/, sciplex/, truth/, SIMULATION.json)."),
    preset: str = typer.Option("default", "--preset", help="tiny | default | large."),
    metadata: str | None = typer.Option(
        None, "--metadata", help="Folder of public metadata; default $SCPERT_METADATA; none = synthetic metadata."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the output is a deterministic function of it)."),
    extra_genes: int = typer.Option(200, "--extra-genes", help="Non-landmark genes added on the single-cell side."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Simulate the SEMI-SYNTHETIC default dataset on real metadata (or synthetic metadata when none is given)."""
    from ..data.simulate import simulate
    from ..paths import metadata_dir

    s = simulate(out, preset=preset, metadata=metadata_dir(metadata), seed=seed, extra_genes=extra_genes,
                 progress=not quiet)
    typer.echo(f"semi-synthetic ({s['metadata']}): {s['n_bulk_signatures']} bulk signatures, {s['n_cells']} cells "
               f"-> {out}")
