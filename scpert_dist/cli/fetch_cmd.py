"""`scpert data fetch`: download the public LINCS / sci-Plex3 releases (resumable, verified)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..data.fetch import fetch as run_fetch
from . import data_app


@data_app.command("fetch")
def fetch(
    dataset: str = typer.Argument(..., help="lincs | sciplex3"),
    out: Path = typer.Option(..., "--out", help="Folder to download into (created; files already there are verified "
                                                "and skipped, so files downloaded by hand can be placed here)."),
    what: str | None = typer.Option(
        None, "--what", help="Comma-separated files, or all. lincs: level5,siginfo,geneinfo,compoundinfo,cellinfo "
                             "(default: the first four); sciplex3: see --dry-run."),
    release: str | None = typer.Option(
        None, "--release", help="lincs: beta (CMap LINCS 2020, default) | gse92742 | gse70138; "
                                "sciplex3: chemcpa (default) | scperturb | gse139944."),
    base_url: str | None = typer.Option(
        None, "--base-url", help="A mirror with the release's layout (default: the publisher; env SCPERT_FETCH_BASE_URL)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files, URLs and sizes; download nothing."),
    decompress: bool = typer.Option(
        True, "--decompress/--no-decompress", help="Gunzip .gctx.gz downloads after verification (GEO releases)."),
    keep_gz: bool = typer.Option(False, "--keep-gz", help="Keep the verified .gz next to its decompressed file."),
    retries: int = typer.Option(2, "--retries", min=0, help="Resume attempts within one run after a dropped connection."),
    timeout: float = typer.Option(60.0, "--timeout", min=1.0, help="Seconds to wait for the server."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Download the public files a real run needs (LINCS GCTX + tables, sci-Plex3 h5ad): resumable (a rerun continues
    a .part file), atomic, verified against the publisher's checksums where published, else by size."""
    run_fetch(dataset, out, release=release, what=what, base_url=base_url, dry_run=dry_run, progress=not quiet,
              decompress=decompress, keep_gz=keep_gz, retries=retries, timeout=timeout, echo=typer.echo)
