"""`scpert data lincs` (GCTX/GCT/table -> Parquet shards) and `scpert bench ingest`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import ConfigError, InputFileError
from . import bench_app, data_app


@data_app.command("lincs")
def lincs(
    out: Path = typer.Option(..., "--out", help="Output folder for shard-*.parquet + manifest.json."),
    gctx: Path | None = typer.Option(
        None, "--gctx", help="LINCS matrix: .gctx (streamed), .gct or .gct.gz (format read from the first bytes)."),
    table: Path | None = typer.Option(
        None, "--table", help="Instead of --gctx: a Parquet/CSV matrix (metadata columns + Entrez-id gene columns)."),
    siginfo: Path | None = typer.Option(
        None, help="sig_info / inst_info (GSE92742, GSE70138) or siginfo_beta (CMap 2020); default: embedded."),
    inst_info: Path | None = typer.Option(
        None, "--inst-info", help="inst_info table of the wells (joined on inst_id / distil_id), e.g. for level 3/4."),
    geneinfo: Path | None = typer.Option(None, help="gene_info (pr_is_lm) or geneinfo_beta (feature_space)."),
    compounds: Path | None = typer.Option(None, help="Compound table: pert_id + canonical_smiles (or smiles)."),
    all_genes: bool = typer.Option(False, "--all-genes", help="Keep every gene, not only the 978 landmarks."),
    rows_per_shard: int = typer.Option(50_000, help="Signatures per Parquet shard."),
    dtype: str = typer.Option("float32", help="expr dtype: float32 | float16."),
    metadata: str | None = typer.Option(
        None, help="Folder of public metadata (lincs/l1000_landmark_genes.csv); default $SCPERT_METADATA."),
    semi_synthetic: bool | None = typer.Option(
        None, "--semi-synthetic/--real", help="Mark the data semi-synthetic (default: detected)."),
    level: str | None = typer.Option(
        None, "--level", help="Data level: auto | 3 | 4 | 5 | asis (default: auto for --gctx, asis for --table). "
                              "2 (GEX) is refused; 3 is z-scored per plate; 4/5 are clipped to +-10."),
    zscore: str = typer.Option("plate", "--zscore", help="Level 3: z-score against the plate population | vehicle."),
    workers: int = typer.Option(
        1, "--workers", help="Worker processes that read and write shards in parallel (a level-4/5 .gctx; "
                             "the shards are the same for any count)."),
    backend: str = typer.Option(
        "process", "--backend", help="With --workers > 1: process (local worker processes) | ray (Ray tasks, "
                                     "num_cpus=1 each; on several nodes the .gctx and --out must be shared)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """LINCS L1000 -> Parquet shards (expr as fixed_size_list, zstd) + manifest.json; resumable, atomic."""
    from ..data.shards.ingest import ingest_gctx, ingest_table

    if (gctx is None) == (table is None):
        raise InputFileError("give exactly one of --gctx or --table", field="--gctx/--table",
                             hint="--gctx PATH.gctx|PATH.gct, or --table PATH.parquet|PATH.csv")
    kw = dict(siginfo=siginfo, geneinfo=geneinfo, compounds=compounds, all_genes=all_genes,
              rows_per_shard=rows_per_shard, dtype=dtype, metadata=metadata, semi_synthetic=semi_synthetic,
              progress=not quiet, workers=workers)
    if gctx is not None:
        man = ingest_gctx(gctx, out, inst_info=inst_info, level=level or "auto", zscore=zscore, backend=backend,
                          **kw)
    else:
        if inst_info is not None:
            raise InputFileError("--inst-info goes with --gctx (a table carries its metadata as columns)",
                                 field="--inst-info", hint="use --siginfo with --table, or drop --inst-info")
        man = ingest_table(table, out, level=level or "asis", **kw)
    typer.echo(f"{man['n_rows']} signatures x {man['n_genes']} genes, {len(man['cells'])} cells, "
               f"{len(man['drugs'])} drugs, {len(man['shards'])} shard(s) -> {out} ({man['transform']})")


@bench_app.command("ingest")
def bench_ingest(
    rows: int = typer.Option(20_000, help="Signatures in the synthetic GCTX."),
    genes: int = typer.Option(978, help="Genes in the synthetic GCTX (all are kept)."),
    rows_per_shard: int = typer.Option(5_000, help="Rows per Parquet shard."),
    workdir: Path | None = typer.Option(None, help="Scratch folder (default: a temporary folder, removed)."),
    workers: str = typer.Option("1,2", "--workers", help="Worker counts to compare, side by side in this run."),
    repeats: int = typer.Option(2, "--repeats", help="Interleaved runs per worker count (the best is shown)."),
) -> None:
    """Raw h5py read vs GCTX->Parquet ingest (MB/s), the ingest with 1 vs 2 worker processes (MB/s, rows/s, ratio),
    and Ray Data streaming: fixed_size_list vs one column/gene."""
    from ..bench.ingest import run_ingest_bench

    try:
        counts = [int(w) for w in workers.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--workers {workers!r} is not a comma-separated list of integers", field="--workers",
                          hint="e.g. --workers 1,2") from None
    run_ingest_bench(rows=rows, genes=genes, rows_per_shard=rows_per_shard, workdir=workdir, workers=counts,
                     repeats=repeats)
