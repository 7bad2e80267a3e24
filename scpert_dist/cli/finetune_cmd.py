"""`scpert finetune` and `scpert predict` (thin: parse options, call scpert_dist.finetune)."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import console
from ..config import load
from ..errors import ConfigError, InputFileError
from ..finetune.config import FinetuneConfig
from ..model.config import PRESETS
from ..registry import DECODERS, DRUG_REPS
from . import app, bench_app


@app.command("finetune")
def finetune(
    data: Path = typer.Option(..., "--data", help="h5ad per schema.py (scpert data sciplex / simulate)"),
    split: str = typer.Option("split_random", help="obs split column (train/valid/test)"),
    pretrained: str = typer.Option("none", help="MLflow run id | checkpoint dir | none (from scratch)"),
    config: Path | None = typer.Option(None, help="TOML/YAML FinetuneConfig (e.g. scpert_dist/configs/finetune_small.toml)"),
    out: Path = typer.Option(Path("finetune_out"), help="local model folder"),
    tracking: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI"),
    set_: list[str] = typer.Option([], "--set", help=(
        f"FinetuneConfig overrides, e.g. --set model.decoder=gru --set optim.epochs=5; model.decoder: "
        f"{DECODERS.choices()}; model.drug_rep: {DRUG_REPS.choices()} (lincs: --set data.lincs_shards=DIR); "
        f"model.preset: {PRESETS.choices()}")),
) -> None:
    """Finetune condition encoders + decoder on single cells; validation on 'valid' drugs; logs to MLflow."""
    from ..api import ScPert

    cfg = load(FinetuneConfig, config, [f"data.path={data}", f"data.split={split}", f"model.pretrained={pretrained}",
                                        f"out={out}", f"tracking.uri={tracking}", *set_])
    m = ScPert(cfg).train(data, split=split, track=True)
    r = m.result
    typer.echo(f"run_id {r.run_id}  model {r.model_dir}  best val logFC r {r.val_metrics.get('val_logfc_pearson'):.3f}")
    line, drug = m.meta["cells"][0], (m.meta["drugs"] or ["DRUG"])[0]
    typer.echo(f"predict with: scpert predict --model {r.run_id or r.model_dir} --tracking {tracking} "
               f"--drug {drug} --cell-line {line} --dose 1.0 --out pred.h5ad")


@app.command("predict")
def predict(
    model: str = typer.Option(..., help="finetuned model: folder, MLflow run id, models:/NAME@ALIAS or models:/NAME/VERSION"),
    cell_line: str = typer.Option(..., "--cell-line", help="a cell line the model was finetuned on"),
    dose: float = typer.Option(..., help="dose in uM"),
    out: Path = typer.Option(..., help="output h5ad"),
    drug: str | None = typer.Option(None, help="drug name (its SMILES as in the training data)"),
    smiles: str | None = typer.Option(None, help="SMILES (any molecule; needs a morgan/descriptors model)"),
    data: Path | None = typer.Option(None, help="h5ad with control cells of the line (default: the control cells "
                                                "saved with the model)"),
    n_cells: int | None = typer.Option(None, "--n-cells", help="default: one per control cell"),
    tracking: str = typer.Option("sqlite:///mlflow.db", help="MLflow tracking URI (for run ids and models:/ URIs)"),
    seed: int = 0,
) -> None:
    """Per-cell predictions from the line's control cells -> h5ad (drug, smiles, dose_um, cell_line in .obs; gene ids
    and symbols in .var)."""
    from ..api import predict_h5ad

    if not drug and not smiles:
        raise ConfigError("pass --drug or --smiles", field="--drug")
    con = console.current()
    if con is not None:  # library output (MLflow, torch warnings) next to the predictions, not in ./scpert_logs/
        con.set_log_path(out.parent / f"{out.stem}.libraries.log")
    p = predict_h5ad(model, data, out, drug=drug, smiles=smiles, cell_line=cell_line, dose_um=dose,
                     n_cells=n_cells, seed=seed, tracking=tracking)
    typer.echo(f"wrote {p}")


@app.command("benchmark")
def benchmark(
    data: Path | None = typer.Option(None, help="h5ad per schema.py (simulated or a real sci-Plex3 from `scpert data sciplex`)"),
    split: str = typer.Option("split_chemcpa_ood", help="obs split column; test drugs are held out"),
    shards: Path | None = typer.Option(None, "--shards", help="LINCS shards (`scpert data lincs`): signatures for the knn_lincs baseline"),
    pretrained: str | None = typer.Option(None, help="MLflow pretraining run id or checkpoint dir (adds pretrained variant)"),
    methods: str | None = typer.Option(None, help="comma list, e.g. control,mean_drug,ridge,scpert_lstm_morgan_scratch (default: all; quick: key ones)"),
    seeds: int = typer.Option(3, help="number of seeds (0..n-1)"),
    quick: bool = typer.Option(False, help="demo budget: fewer variants, few steps"),
    out: Path = typer.Option(..., help="output folder (benchmark.md, results.csv, plots/)"),
    tracking: str | None = typer.Option("sqlite:///mlflow.db", help="MLflow URI for the benchmark run"),
    truth: Path | None = typer.Option(None, help="simulator output folder for the oracle row (default: <data folder>/simulated)"),
    headline: bool = typer.Option(False, help="run the frozen headline config (configs/benchmark_headline.toml) into --out"),
) -> None:
    """Every method over seeds on the held-out test drugs -> benchmark.md (paper Table 2 metrics + logFC CIs)."""
    from ..evaluate.accuracy import run_benchmark

    if headline:
        from ..evaluate.headline import run_headline

        given = [n for n, v in (("--data", data), ("--methods", methods), ("--shards", shards),
                                ("--pretrained", pretrained), ("--truth", truth)) if v]
        if given:
            raise ConfigError(f"--headline runs the committed config; {', '.join(given)} would not be used",
                              field="--headline", hint="drop them, or run without --headline")

        run_headline(out, tracking_uri=tracking)
        out = out / "benchmark"
    elif data is None:
        raise ConfigError("pass --data (or --headline)", field="--data")
    else:
        run_benchmark(data, split, shards_dir=shards, pretrained=pretrained,
                      methods=[m for m in methods.split(",") if m] if methods else None, seeds=tuple(range(seeds)),
                      quick=quick, out_dir=out, tracking_uri=tracking, truth=truth)
    typer.echo((out / "benchmark.md").read_text())


@bench_app.command("finetune")
def bench_finetune(
    data: Path = typer.Option(..., "--data", help="Processed sci-Plex3-style AnnData (`scpert data sciplex`)."),
    split: str = typer.Option("split_chemcpa_ood", help="obs split column; held-out drugs are not trained on"),
    epochs: int = typer.Option(2, help="Our epochs (each one pass over the training cells); the median is used."),
    cpa_epochs: int = typer.Option(3, help="CPA epochs (median epoch time is used)."),
    threads: int = typer.Option(2, help="torch threads for both."),
    pretrained: str = typer.Option(None, help="MLflow pretraining run id or checkpoint dir (default: scratch)."),
    predict_cells: int = typer.Option(20_000, help="Cells predicted for our prediction throughput."),
    cpa: bool = typer.Option(True, help="Measure CPA too (needs `scpert baselines setup cpa`)."),
    decoders: str = typer.Option("factor", help="Our decoders to measure, comma-separated (e.g. factor,lstm)."),
    batch: int = typer.Option(None, help="Cells per step (default: 512 for factor, 64 for the sequence decoders)."),
) -> None:
    """Finetuning epoch time (training cells/s) and prediction cells/s of our model vs CPA (cpa-tools), same data,
    same machine, one run."""
    from ..bench.finetune import run_finetune_bench

    if not data.exists():
        raise InputFileError("AnnData file not found", path=data, hint="make it with `scpert data sciplex`")
    run_finetune_bench(data, split=split, epochs=epochs, cpa_epochs=cpa_epochs, threads=threads,
                       pretrained=pretrained, predict_cells=predict_cells, with_cpa=cpa,
                       decoders=tuple(d.strip() for d in decoders.split(",") if d.strip()), batch=batch)
