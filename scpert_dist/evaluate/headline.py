"""The frozen headline benchmark (`scpert_dist/configs/benchmark_headline.toml`): simulate -> ingest -> prepare with
the config's seeds (cached in `<out>/data/`, rebuilt when the config's data or split section or the simulator's
source changes), then `run_benchmark` with its methods and seeds; the table says which config, simulator source and
simulated data it ran on."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import PACKAGED, load, packaged_or_file, to_dict
from ..data.readers.sciplex import prepare_sciplex
from ..data.shards.ingest import ingest_gctx
from ..data.simulate import PRESETS, simulate
from ..errors import ConfigError
from ..paths import sha256_file
from ..train.settings import PretrainConfig
from .accuracy import method_names, run_benchmark

HEADLINE = PACKAGED / "benchmark_headline.toml"


@dataclass
class HeadlineData:
    preset: str = "default"
    sim_seed: int = 1130
    metadata: str = "synthetic"
    extra_genes: int = 200
    truth: str = ""
    """the simulator's hidden truth ('calibrated' | 'legacy'); '' = the preset's"""

    def __post_init__(self) -> None:
        PRESETS.check(self.preset, field="data.preset")


@dataclass
class HeadlineSplit:
    name: str = "chemcpa_ood"
    seed: int = 1130


@dataclass
class HeadlineBench:
    seeds: list[int] = field(default_factory=lambda: [1130, 1131, 1132])
    quick: bool = True
    methods: list[str] = field(default_factory=list)


@dataclass
class HeadlinePretrain:
    """The pretraining the *_pretrained variants start from: the config's own simulated LINCS side, cached in
    `<out>/data/pretrained/` while this section, the data and the simulator are unchanged."""

    config: str = "pretrain_tiny.toml"
    """base pretraining config (a packaged name or a file)"""
    set: list[str] = field(default_factory=list)
    """overrides of it, `section.key=value` (e.g. optim.epochs=2)"""


@dataclass
class HeadlineConfig:
    data: HeadlineData = field(default_factory=HeadlineData)
    split: HeadlineSplit = field(default_factory=HeadlineSplit)
    benchmark: HeadlineBench = field(default_factory=HeadlineBench)
    pretrain: HeadlinePretrain = field(default_factory=HeadlinePretrain)


def simulator_digest() -> str:
    """sha256 (16 hex) of the simulator's source files (data/simulate/*.py): the config cannot freeze the code."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((Path(__file__).resolve().parent.parent / "data" / "simulate").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _prepare_data(cfg: HeadlineConfig, root: Path) -> tuple[Path, Path, Path]:
    """(processed h5ad, shards, simulator folder) of the config, made unless `root` already holds them for it."""
    stamp = root / "HEADLINE_DATA.json"
    want = {"data": asdict(cfg.data), "split": asdict(cfg.split), "simulator_source": simulator_digest()}
    sim, shards, processed = root / "simulated", root / "shards", root / "sciplex3_sim_processed.h5ad"
    if stamp.is_file() and json.loads(stamp.read_text()) == want and processed.is_file():
        return processed, shards, sim
    meta = None if cfg.data.metadata == "synthetic" else cfg.data.metadata
    root.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    kw = {"truth": cfg.data.truth} if cfg.data.truth else {}
    simulate(sim, preset=cfg.data.preset, metadata=meta, seed=cfg.data.sim_seed, extra_genes=cfg.data.extra_genes,
             **kw)
    bulk = sim / "bulk"
    ingest_gctx(bulk / "lincs_level5.gctx", shards, siginfo=bulk / "siginfo.txt", geneinfo=bulk / "geneinfo.txt",
                compounds=bulk / "compounds.txt", metadata=meta, rows_per_shard=1000)
    prepare_sciplex(sim / "sciplex" / "sciplex3_sim.h5ad", processed, split=cfg.split.name, seed=cfg.split.seed,
                    metadata=meta, manifest=shards / "manifest.json", landmarks_only=True)
    stamp.write_text(json.dumps(want, indent=2))
    return processed, shards, sim


def _pretrain(cfg: HeadlineConfig, root: Path, shards: Path, tracking_uri) -> dict:
    """The config's pretraining on the simulated LINCS shards (Ray Train, tracked in MLflow), or the cached one:
    {'checkpoint_dir', 'run_id', 'wall_s', 'steps', 'samples', ...} (also in `<root>/pretrained/PRETRAIN.json`)."""
    from ..train.pretrain import run_pretraining

    folder = root / "pretrained"
    stamp = folder / "PRETRAIN.json"
    data_stamp = json.loads((root / "HEADLINE_DATA.json").read_text())
    want = {"pretrain": asdict(cfg.pretrain), "data": data_stamp}
    if stamp.is_file():
        rec = json.loads(stamp.read_text())
        if rec.get("want") == want and Path(rec["checkpoint_dir"]).is_dir():
            print(f"benchmark: pretraining cached ({rec['steps']} steps, {rec['wall_s'] / 60:.1f} min when made): "
                  f"{rec['checkpoint_dir']}", flush=True)
            return rec
    folder.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    pc = load(PretrainConfig, packaged_or_file(cfg.pretrain.config, field="pretrain.config", pattern="pretrain_*.toml"), [
        *cfg.pretrain.set, f"data.shards={shards.resolve()}", f"tracking.uri={uri}",
        f"checkpoint.storage={(folder / 'ray').resolve()}", f"checkpoint.name=headline-{time.strftime('%Y%m%d-%H%M%S')}"])
    t0 = time.time()
    res = run_pretraining(pc)
    rec = {"want": want, "checkpoint_dir": res.checkpoint_dir, "run_id": res.run_id, "tracking_uri": uri,
           "wall_s": round(time.time() - t0, 1), "steps": int(res.metrics.get("step", 0)),
           "samples": int(res.metrics.get("step", 0)) * pc.optim.batch_size * pc.scaling.num_workers,
           "metrics": res.metrics, "config": to_dict(pc)}
    stamp.write_text(json.dumps(rec, indent=2, default=str))
    return rec


def load_headline(config: Path | None = None) -> HeadlineConfig:
    """The config (default: the frozen headline), checked before any data is made: known methods, a preset the
    simulator has, at least one seed (ConfigError naming the field)."""
    cfg = load(HeadlineConfig, Path(config) if config else HEADLINE)
    known = method_names(cfg.benchmark.quick)
    bad = [m for m in cfg.benchmark.methods if m not in known]
    if bad:
        raise ConfigError(f"unknown methods {bad}", path=str(config or HEADLINE), field="benchmark.methods",
                          hint=f"available: {known}")
    if any(m.endswith("_pretrained") for m in cfg.benchmark.methods):  # a bad pretraining section: before any data
        load(PretrainConfig, packaged_or_file(cfg.pretrain.config, field="pretrain.config", pattern="pretrain_*.toml"),
             cfg.pretrain.set)
    if not cfg.benchmark.seeds:
        raise ConfigError("no seeds", path=str(config or HEADLINE), field="benchmark.seeds", hint="e.g. [1130]")
    return cfg


def run_headline(out: Path, *, config: Path | None = None, tracking_uri=None):
    """Run the frozen headline (or another config of the same form) into `out`/benchmark; returns the summary."""
    path = Path(config) if config else HEADLINE
    cfg = load_headline(path)
    out = Path(out)
    processed, shards, sim = _prepare_data(cfg, out / "data")
    b = cfg.benchmark
    pre = None
    if any(m.endswith("_pretrained") for m in b.methods):
        pre = _pretrain(cfg, out / "data", shards, tracking_uri)
    header = (f"Config `{path.name}`{' (the FROZEN headline)' if path == HEADLINE else ''}: simulator preset "
              f"`{cfg.data.preset}`, seed {cfg.data.sim_seed}, truth `{cfg.data.truth or 'preset'}`, "
              f"{cfg.data.metadata} metadata; split "
              f"`{cfg.split.name}` seed {cfg.split.seed}; {'quick' if b.quick else 'full'} budget. The config cannot "
              f"freeze the simulator's code: simulator source sha256 {simulator_digest()}, simulated h5ad sha256 "
              f"{sha256_file(sim / 'sciplex' / 'sciplex3_sim.h5ad')[:16]}.\n\n")
    if pre is not None:
        c = pre["config"]
        header += (f"Pretraining (the *_pretrained variants): preset `{c['model']['preset']}`, tasks "
                   f"`{c['objective']['tasks']}`, mask ratio {c['objective']['mask_ratio']}, {pre['steps']} steps of "
                   f"{c['optim']['batch_size']} x {c['scaling']['num_workers']} worker(s) = {pre['samples']} samples "
                   f"over the simulated LINCS shards, {pre['wall_s'] / 60:.1f} min wall on this machine when made "
                   f"(MLflow run {pre['run_id']}).\n\n")
    summary = run_benchmark(processed, cfg.split.name, shards_dir=shards, methods=b.methods or None,
                            pretrained=pre["checkpoint_dir"] if pre else None,
                            seeds=tuple(b.seeds), quick=b.quick, out_dir=out / "benchmark",
                            tracking_uri=tracking_uri, truth=sim, header=header)
    (out / "benchmark" / "config.toml").write_text(path.read_text())
    return summary
