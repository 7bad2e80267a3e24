"""`scpert data sciplex`: sci-Plex3-style h5ad -> normalised AnnData with landmark genes and split columns."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from . import data_app


@data_app.command("sciplex")
def sciplex(
    h5ad: Path = typer.Option(..., "--h5ad", help="sci-Plex3-style .h5ad (Srivatsan 2020, chemCPA, scPerturb, simulator)."),
    out: Path = typer.Option(..., "--out", help="Output .h5ad (written atomically)."),
    split: str = typer.Option("chemcpa_ood", "--split", help="chemcpa_ood | cpa | kfold."),
    folds: int = typer.Option(5, "--folds", help="Folds for --split kfold."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split."),
    metadata: str | None = typer.Option(
        None, help="Folder of public metadata (landmark table, chemCPA split); default $SCPERT_METADATA."),
    manifest: Path | None = typer.Option(
        None, help="Pretraining manifest.json (gene panel) when no metadata folder is given."),
    drug_col: str | None = typer.Option(None, help="obs column of the drug name (default: detected)."),
    dose_col: str | None = typer.Option(None, help="obs column of the dose (default: detected)."),
    cell_col: str | None = typer.Option(None, help="obs column of the cell line (default: detected)."),
    dose_unit: str | None = typer.Option(None, help="nM (sci-Plex3 default) or uM; default: obs['dose_unit'] or nM."),
    hvg: int | None = typer.Option(None, "--hvg", help="Keep the landmarks plus the top-N highly variable other genes."),
    landmarks_only: bool = typer.Option(False, "--landmarks-only", help="Keep only genes mapped to landmarks."),
) -> None:
    """sci-Plex3 h5ad -> log1p(CP10k) AnnData (normalised once), genes mapped to the LINCS landmarks, split columns."""
    from ..data.readers.sciplex import prepare_sciplex

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = prepare_sciplex(h5ad, out, split=split, folds=folds, seed=seed, metadata=metadata, manifest=manifest,
                        drug_col=drug_col, dose_col=dose_col, cell_col=cell_col, dose_unit=dose_unit, hvg=hvg,
                        landmarks_only=landmarks_only)
    gm = r["gene_mapping"]
    typer.echo(f"{r['n_obs']} cells x {r['n_vars']} genes; input {r['input_state']} "
               f"(normalised now: {r['normalization_applied']}); landmarks mapped {gm['n_mapped']}/{gm['panel_size']} "
               f"by {gm['by']}; split columns {r['split']['columns']} -> {out}")
