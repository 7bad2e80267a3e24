"""`scpert data simulate`: the semi-synthetic default dataset (LINCS-shaped GCTX + sci-Plex3-shaped h5ad);
`scpert data calibrate`: the simulator against the real files, side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputFileError
from ..paths import metadata_dir
from . import data_app


@data_app.command("simulate")
def simulate_cmd(
    out: Path = typer.Option(..., "--out", help="Output folder (bulk/, sciplex/, truth/, SIMULATION.json)."),
    preset: str = typer.Option("default", "--preset", help="tiny | default | large | bench | calib | scperturb."),
    metadata: str | None = typer.Option(
        None, "--metadata", help="Folder of public metadata; default $SCPERT_METADATA; none = synthetic metadata."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the output is a deterministic function of it)."),
    extra_genes: int = typer.Option(200, "--extra-genes", help="Non-landmark genes added on the single-cell side."),
    truth: str | None = typer.Option(None, "--truth", help="calibrated | legacy (default: the preset's, calibrated)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Simulate the SEMI-SYNTHETIC default dataset on real metadata (or synthetic metadata when none is given)."""
    from ..data.simulate import simulate

    s = simulate(out, preset=preset, metadata=metadata_dir(metadata), seed=seed, extra_genes=extra_genes,
                 progress=not quiet, truth=truth)
    typer.echo(f"semi-synthetic ({s['metadata']}): {s['n_bulk_signatures']} bulk signatures, {s['n_cells']} cells "
               f"-> {out}")


@data_app.command("calibrate")
def calibrate_cmd(
    out: Path = typer.Option(Path("calibration"), "--out", help="Folder for calibration.csv, calibration.png, sim/."),
    metadata: str | None = typer.Option(
        None, "--metadata", help="Public data folder with the real files (SOURCES.md); default $SCPERT_METADATA."),
    preset: str = typer.Option("calib", "--preset", help="Simulator preset to compare (calib | bench | ...)."),
    sim: Path | None = typer.Option(None, "--sim", help="Compare this simulation folder instead of simulating."),
    sim_scperturb: Path | None = typer.Option(
        None, "--sim-scperturb", help="For scPerturb's 188-compound tables: this simulation folder (all 188 "
                                      "compounds, e.g. preset bench) instead of simulating preset scperturb."),
    seed: int = typer.Option(0, "--seed", help="Simulator seed."),
    fit_noise: bool = typer.Option(False, "--fit-noise", help="Also refit the per-line noise parameters (minutes)."),
) -> None:
    """Real vs simulated, side by side: single-cell noise per line (real sci-Plex3 cells), response structure (real
    sci-Plex3 pseudobulk of 9 drugs), signature similarity vs Tanimoto (a real L1000 plate), drug-drug structure of
    all 188 compounds (scPerturb's E-distance and pseudobulk-correlation tables). One table + a figure."""
    import pandas as pd

    from ..data.simulate import calibrate as C

    meta = metadata_dir(metadata)
    if meta is None:
        raise InputFileError("no metadata folder", field="--metadata",
                             hint="pass --metadata DIR (the public data folder) or set SCPERT_METADATA")
    C.check_real_files(Path(meta))
    cal = C.calibrate(Path(meta), out, preset=preset, seed=seed, sim_dir=sim, scperturb_dir=sim_scperturb,
                      progress=True)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.4g}".format):
        typer.echo(cal.table.to_string(index=False))
    n_ok = int(cal.table["within"].sum())
    typer.echo(f"{n_ok}/{len(cal.table)} statistics within tolerance -> {out}/calibration.csv, {out}/calibration.png")
    if fit_noise:
        with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
            typer.echo(C.fit_noise(Path(meta)).T.to_string())
