"""Small, realistic shard folders for pretraining tests, made by the real pipeline (simulator -> GCTX -> ingest)."""

from __future__ import annotations

from pathlib import Path


def simulated_shards(root: Path, metadata=None, rows_per_shard: int = 250) -> Path:
    """Tiny semi-synthetic LINCS-shaped GCTX (the simulator; real metadata when given) ingested into shards."""
    from scpert_dist.data.shards.ingest import ingest_gctx
    from scpert_dist.data.simulate import simulate

    sim = root / "sim"
    simulate(sim, preset="tiny", metadata=metadata, seed=0, progress=False)
    bulk = sim / "bulk"
    out = root / "shards"
    ingest_gctx(bulk / "lincs_level5.gctx", out, siginfo=bulk / "siginfo.txt", geneinfo=bulk / "geneinfo.txt",
                compounds=bulk / "compounds.txt", metadata=metadata, rows_per_shard=rows_per_shard, progress=False)
    return out


def real_l1000_shards(root: Path, shared: Path, rows_per_shard: int = 100) -> Path:
    """The real 272 level-5 cmapR signatures (3 compounds, 65 cell lines) ingested into shards."""
    from scpert_dist.data.shards.ingest import ingest_table

    out = root / "real_shards"
    ingest_table(shared / "lincs" / "l1000_cmapR_modz_level5_n272x978.parquet", out, metadata=shared,
                 rows_per_shard=rows_per_shard, progress=False)
    return out
