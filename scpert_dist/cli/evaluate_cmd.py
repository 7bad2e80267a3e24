"""`scpert evaluate ...`: measurements on REAL data (real sci-Plex3 pseudobulk, real single-cell statistics, real
L1000 plates). Every table printed here holds real data only."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputFileError
from ..paths import atomic_write_bytes, metadata_dir
from . import app

evaluate_app = typer.Typer(help="Evaluate on real data: sci-Plex3 pseudobulk, single-cell statistics, L1000 plates.",
                           no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")

META_HELP = "Folder of public metadata (landmark table, sci-Plex3 design, drug tables); default $SCPERT_METADATA."


def _meta(metadata: str | None) -> Path:
    m = metadata_dir(metadata)
    if m is None:
        raise InputFileError("no metadata folder", field="--metadata", hint="pass --metadata or set SCPERT_METADATA")
    return m


def _write(df, out: Path | None) -> None:
    if out is not None:
        atomic_write_bytes(out, df.to_csv(index=False).encode())
        typer.echo(f"-> {out}")


def _show(df, out: Path | None) -> None:
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 50):
        typer.echo(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    _write(df, out)


def _field(frames: list, out: Path | None) -> None:
    """The field's metrics (cell-eval, pertpy) as their own table; with --out, also <out>_field_metrics.csv."""
    import pandas as pd

    from ..evaluate import field_metrics as FM

    per = pd.concat(frames, ignore_index=True)
    typer.echo(f"the field's metrics ({FM.library_versions()}; docs/field_metrics.md), mean over conditions:")
    _show(FM.shown(FM.summarize(per)), None)
    typer.echo("not computed on pseudobulk profiles: " + ", ".join(k.split(" (")[0] for k in FM.PSEUDOBULK_SKIPPED)
               + " (why: docs/field_metrics.md)")
    if out is not None:
        _write(per, out.with_name(f"{out.stem}_field_metrics.csv"))


@evaluate_app.command("cellstats")
def cellstats(
    real: Path = typer.Option(..., "--real", help="Real sci-Plex3 h5ad (e.g. chemCPA's layout)."),
    sim: Path = typer.Option(..., "--sim", help="Simulated sci-Plex3 h5ad (`scpert data simulate` output)."),
    metadata: str | None = typer.Option(None, "--metadata", help=META_HELP),
    out: Path | None = typer.Option(None, "--out", help="Also write the table as CSV."),
) -> None:
    """Per-line single-cell statistics of a real and a simulated h5ad side by side (shared panel genes)."""
    import anndata as ad

    from ..data.readers.sciplex import compare_cell_stats, detect_layout, panel_coverage, read_sciplex

    m = _meta(metadata)
    layout = detect_layout(ad.read_h5ad(real, backed="r").obs)
    cov = panel_coverage(read_sciplex(real, metadata=m))
    typer.echo(f"{real.name}: layout {layout}; panel genes present {cov['present']}/{cov['panel_size']} "
               f"(missing: {', '.join(cov['missing']) or 'none'})")
    _show(compare_cell_stats(real, sim, m), out)


@evaluate_app.command("biolord-table")
def biolord_cmd(
    pred_dir: Path = typer.Option(..., "--pred-dir", help="Folder with pred_treated_pb.npy and meta.csv."),
    truth: Path = typer.Option(..., "--truth", help="Truth profile table (its gene columns give the gene order)."),
    out: Path = typer.Option(..., "--out", help="Output profile table (.parquet or .csv)."),
) -> None:
    """Convert biolord's released npy + meta.csv predictions into a profile table for `evaluate pseudobulk`."""
    from ..data.readers.pseudobulk import biolord_table, read_profiles

    df = biolord_table(pred_dir, read_profiles(truth).genes, out)
    typer.echo(f"{len(df)} predicted profiles x {df.shape[1] - 3} genes -> {out}")


@evaluate_app.command("pseudobulk")
def pseudobulk(
    truth: Path = typer.Option(..., "--truth", help="Real pseudobulk table (treated + control_pseudobulk rows)."),
    pred: Path = typer.Option(..., "--pred", help="Predicted profile table: drug, cell_line, one column per gene."),
    per_condition: bool = typer.Option(False, "--per-condition", help="Also print every condition's scores."),
    out: Path | None = typer.Option(None, "--out", help="Write the per-condition scores as CSV (and the field's "
                                    "metrics, cell-eval and pertpy, as <out>_field_metrics.csv beside it)."),
) -> None:
    """Score pseudobulk predictions against real pseudobulk: logFC r, DE-gene metrics, the paper's mean metric;
    and cell-eval's metrics in their own table."""
    from ..evaluate.field_metrics import pseudobulk_file_scores
    from ..evaluate.pseudobulk import score_pseudobulk, summarize

    per = score_pseudobulk(truth, pred)
    field = pseudobulk_file_scores(truth, pred, method="predictions")
    if per_condition:
        _show(per, None)
    typer.echo("mean over conditions [95% CI, drugs resampled]:")
    _show(summarize(per), None)
    _write(per, out)
    _field([field], out)


@evaluate_app.command("pseudobulk-lodo")
def pseudobulk_lodo(
    truth: Path = typer.Option(..., "--truth", help="Real pseudobulk table (treated + control_pseudobulk rows)."),
    metadata: str | None = typer.Option(None, "--metadata", help=META_HELP),
    methods: str = typer.Option("zero,mean,knn,ridge,ours", "--methods", help="Comma-separated methods."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds of our model."),
    steps: int = typer.Option(400, "--steps", help="Training steps of our model per held-out drug."),
    extra: list[Path] = typer.Option([], "--extra", help="Other methods' prediction tables to score alongside "
                                     "(name = file stem), e.g. biolord's (trained on other data)."),
    out: Path | None = typer.Option(None, "--out", help="Write the per-condition scores as CSV (and the field's "
                                    "metrics, cell-eval and pertpy, as <out>_field_metrics.csv beside it)."),
) -> None:
    """Leave-one-drug-out on the real pseudobulk: each drug predicted from the other drugs' real responses; the
    field's metrics (cell-eval) of every method in their own table."""
    import pandas as pd

    from ..data.readers.pseudobulk import read_profiles
    from ..evaluate.field_metrics import profile_scores, pseudobulk_file_scores
    from ..evaluate.pseudobulk import lodo_benchmark, paired_vs, score_pseudobulk, summarize

    ms = [m.strip() for m in methods.split(",") if m.strip()]
    profiles: dict = {}
    per = lodo_benchmark(truth, _meta(metadata), methods=ms, seeds=tuple(range(seeds)), steps=steps,
                         profiles=profiles, progress=True)
    genes = read_profiles(truth).genes
    field = [profile_scores(*arrays, genes, method=m).assign(seed=s) for (m, s), arrays in profiles.items()]
    for e in extra:
        per = pd.concat([per, score_pseudobulk(truth, e).assign(method=e.stem, seed=0)], ignore_index=True)
        field.append(pseudobulk_file_scores(truth, e).assign(seed=0))
    typer.echo("mean over conditions [95% CI, drugs resampled]:")
    _show(summarize(per), None)
    base = [m for m in ("mean", "knn", "ridge") if m in ms]
    if base:
        best = max(base, key=lambda m: per.loc[per["method"] == m, "logfc_pearson"].mean())
        typer.echo(f"paired differences vs the best baseline ({best}), drugs resampled:")
        _show(pd.concat([paired_vs(per, best, m) for m in ("logfc_pearson", "logfc_pearson_DE50")]), None)
    _write(per, out)
    _field(field, out)


@evaluate_app.command("bulk")
def bulk(
    plates: list[Path] = typer.Option(..., "--plates", help="Real L1000 plates (level 4, or level 3 -> plate robust z)."),
    folds: int = typer.Option(5, "--folds", help="Compound-disjoint folds (ignored with --test-plate)."),
    test_plate: str | None = typer.Option(None, "--test-plate", help="Train on the other plates, test on this one "
                                          "(file name or plate id); only compounds unseen in training are scored."),
    metadata: str | None = typer.Option(None, "--metadata", help=META_HELP),
    methods: str = typer.Option(",".join(("zero", "mean", "knn", "ridge", "ours_scratch", "ours_pretrained")),
                                "--methods", help="Comma-separated methods."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds of our model's fits."),
    pretrain_steps: int = typer.Option(150, "--pretrain-steps", help="Masked-gene pretraining steps per split."),
    fit_steps: int = typer.Option(300, "--fit-steps", help="Most training steps of our condition model."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fold assignment."),
    only_fold: list[int] = typer.Option([], "--only-fold", help="Run only these folds (same assignment), e.g. to "
                                        "spread the folds over processes; merge the --out tables afterwards."),
    out: Path | None = typer.Option(None, "--out", help="Write the per-well scores as CSV."),
) -> None:
    """Unseen compounds in real L1000 plates: predict their signatures from structure, dose and time."""
    import json
    import logging

    import pandas as pd

    from ..evaluate import bulk as B

    logging.getLogger("cmap_logger").setLevel(logging.WARNING)
    m = _meta(metadata)
    cfg = B.OursConfig(pretrain_steps=pretrain_steps, fit_steps=fit_steps)
    ms = [x.strip() for x in methods.split(",") if x.strip()]
    per, info = B.run_bulk(plates, m, folds=folds, test_plate=test_plate, methods=ms, seeds=tuple(range(seeds)),
                           cfg=cfg, seed=seed, only_folds=only_fold or None)
    typer.echo(json.dumps(info, default=str))
    typer.echo("mean over test wells [95% CI, compounds resampled]:")
    _show(B.summarize_bulk(per), None)
    if any(x in ms for x in ("mean", "knn", "ridge")):
        best = B.best_baseline(per)
        typer.echo(f"paired differences vs the best baseline ({best}), compounds resampled:")
        _show(B.paired_bulk(per, best), None)
    ref = B.noise_reference(plates, m)
    ref = ref[ref["sig_id"].isin(set(per["sig_id"]))] if len(ref) else ref
    if len(ref):
        typer.echo("references from the data (no model; same test wells where they exist):")
        _show(B.summarize_bulk(ref), None)
    both = pd.concat([per, ref], ignore_index=True)
    series = B.dose_series_plates(per)
    if series:
        typer.echo(f"by dose (dose-series plates: {', '.join(series)}):")
        sub = both[both["plate"].isin(series)]
        _show(B.summarize_bulk(sub.assign(dose=sub["dose_um"].round(2)), by=("dose", "method"),
                               metrics=("pearson", "precision_up50")), None)
    _write(both, out)


@evaluate_app.command("transfer")
def transfer(
    a: Path = typer.Option(..., "--a", help="One context: an L1000 plate file (e.g. the A375 CPC006 level-4 GCTX)."),
    b: Path = typer.Option(..., "--b", help="The other context: the same compound plate in another cell line (e.g. "
                                            "the HT115 CPC006 AnnData with its X1/X2 replicate plates)."),
    a_line: str = typer.Option("A", "--a-line", help="Name of context A in the tables."),
    b_line: str = typer.Option("B", "--b-line", help="Name of context B in the tables."),
    metadata: str | None = typer.Option(None, "--metadata", help=META_HELP),
    methods: str = typer.Option("all", "--methods", help="Comma-separated methods, or 'all'."),
    folds: int = typer.Option(5, "--folds", help="Compound-disjoint folds over the shared compounds."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds of the fold assignment (0,1,2: the reported table; "
                                                       "choices are made on other seeds)."),
    pretrain_steps: int = typer.Option(300, "--pretrain-steps", help="Masked-gene steps of the encoder on the "
                                       "real L1000 profiles other than the target's plate."),
    out: Path | None = typer.Option(None, "--out", help="Write the per-compound scores as CSV."),
) -> None:
    """Both directions, A -> B and B -> A: predict a held-out compound's signature in one cell line from its
    structure or from its signature in the other line; floor, baselines, our readout, the replicate ceiling."""
    import json
    import logging

    import pandas as pd
    import torch

    from ..evaluate import transfer as TR

    torch.set_num_threads(1)
    logging.getLogger("cmap_logger").setLevel(logging.WARNING)
    m = _meta(metadata)
    ms = TR.METHODS if methods == "all" else tuple(x.strip() for x in methods.split(",") if x.strip())
    try:
        sd = tuple(int(x) for x in seeds.split(",") if x.strip())
    except ValueError:
        raise InputFileError(f"--seeds {seeds!r} is not a list of integers", field="--seeds", hint="e.g. 0,1,2") from None
    for f in (a, b):
        if not f.is_file():
            raise InputFileError("plate file not found", path=str(f), field="--a/--b", hint="give two plate files")
    per, ceil, info = TR.run_transfer(a, b, m, methods=ms, seeds=sd, folds=folds,
                                      cfg=TR.TransferConfig(pretrain_steps=pretrain_steps), a_line=a_line, b_line=b_line)
    typer.echo(json.dumps(info, default=str))
    typer.echo("REAL DATA. Mean over held-out compounds [95% CI, compounds resampled], seeds averaged per compound:")
    _show(TR.summarize(per, ceil), None)
    typer.echo("paired differences (method - best baseline of each kind), compounds resampled:")
    _show(TR.paired(per), None)
    _write(pd.concat([per, ceil.assign(method="replicate")], ignore_index=True), out)
