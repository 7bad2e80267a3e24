"""`scpert data lincs` (GCTX/GCT/table -> Parquet shards) and `scpert bench ingest`."""

from __future__ import annotations

from pathlib import Path

import typer

from . import bench_app, data_app


@data_app.command("lincs")
def lincs(
    out: Path = typer.Option(..., "--out", help="Output folder for shard-*.parquet + manifest.json."),
    gctx: Path | None = typer.Option(None, "--gctx", help="LINCS matrix: .gctx (streamed) or .gct (1.3)."),
    table: Path | None = typer.Option(
        None, "--table", help="Instead of --gctx: a Parquet/CSV matrix (metadata columns + Entrez-id gene columns)."),
    siginfo: Path | None = typer.Option(
        None, help="sig_info / inst_info (GSE92742, GSE70138) or siginfo_beta (CMap 2020); default: embedded."),
    geneinfo: Path | None = typer.Option(None, help="gene_info (pr_is_lm) or geneinfo_beta (feature_space)."),
    compounds: Path | None = typer.Option(None, help="Compound table: pert_id + canonical_smiles (or smiles)."),
    all_genes: bool = typer.Option(False, "--all-genes", help="Keep every gene, not only the 978 landmarks."),
    rows_per_shard: int = typer.Option(50_000, help="Signatures per Parquet shard."),
    dtype: str = typer.Option("float32", help="expr dtype: float32 | float16."),
    metadata: str | None = typer.Option(
        None, help="Folder of public metadata (lincs/l1000_landmark_genes.csv); default $SCPERT_METADATA."),
    semi_synthetic: bool | None = typer.Option(
        None, "--semi-synthetic/--real", help="Mark the data semi-synthetic (default: detected)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """LINCS L1000 -> Parquet shards (expr as fixed_size_list, zstd) + manifest.json; resumable, atomic."""
    from ..data.lincs import ingest_gctx, ingest_table
    from ..errors import InputFileError

    if (gctx is None) == (table is None):
        raise InputFileError("give exactly one of --gctx or --table", field="--gctx/--table",
                             hint="--gctx PATH.gctx|PATH.gct, or --table PATH.parquet|PATH.csv")
    kw = dict(siginfo=siginfo, geneinfo=geneinfo, compounds=compounds, all_genes=all_genes,
              rows_per_shard=rows_per_shard, dtype=dtype, metadata=metadata, semi_synthetic=semi_synthetic,
              progress=not quiet)
    man = ingest_gctx(gctx, out, **kw) if gctx is not None else ingest_table(table, out, **kw)
    typer.echo(f"{man['n_rows']} signatures x {man['n_genes']} genes, {len(man['cells'])} cells, "
               f"{len(man['drugs'])} drugs, {len(man['shards'])} shard(s) -> {out}")


@bench_app.command("ingest")
def bench_ingest(
    rows: int = typer.Option(20_000, help="Signatures in the synthetic GCTX."),
    genes: int = typer.Option(978, help="Genes in the synthetic GCTX (all are kept)."),
    rows_per_shard: int = typer.Option(5_000, help="Rows per Parquet shard."),
    workdir: Path | None = typer.Option(None, help="Scratch folder (default: a temporary folder, removed)."),
) -> None:
    """Raw h5py read vs GCTX->Parquet ingest (MB/s), and Ray Data streaming: fixed_size_list vs one column/gene."""
    from ..bench.ingest import run_ingest_bench

    run_ingest_bench(rows=rows, genes=genes, rows_per_shard=rows_per_shard, workdir=workdir)
