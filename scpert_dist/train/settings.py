"""The pretraining config: one dataclass per section, read from TOML/YAML + `--set section.key=value` overrides.

    data        the shards and the validation split
    model       the architecture: a size preset + size overrides (`model.config.ModelSpec`)
    objective   what the model is trained to do: the task set, the mask ratio, gene-token sampling
    optim       how: AdamW, its schedule, batch size, epochs, step cap
    scaling     Ray Train workers and the DDP / DeepSpeed backend
    checkpoint  interval, storage, run name, failures survived
    tracking    MLflow

Each setting has one definition, here or in `ModelSpec`, validated in its section's `__post_init__`. The step
(`train/step.py`) takes the `optim` and `objective` sections as they are. Test-only behaviour (fault injection, per-row
accounting) is not configured here: tests pass callbacks to `run_pretraining` (train/callbacks.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import ClassVar

from ..config import at_least
from ..errors import ConfigError
from ..model.config import ModelSpec, parse_tasks


@dataclass
class DataSection:
    shards: str = ""
    """Folder of Parquet shards + manifest.json (from `scpert data lincs`)."""
    val_fraction: float = 0.05
    """Fraction of signatures held out (by id hash) for the Table-1 metrics."""
    verify: bool = True
    """Check every shard's sha256 against the manifest before training."""
    overlap: bool = True
    """Start the next epoch's Ray Data stream in a background thread while the current epoch trains (at most one
    epoch ahead), so the step does not wait for each stream's start-up (false: start it when the epoch begins).
    Measured side by side by `scpert bench pretrain` (benchmarks/RESULTS.md, "Epoch boundaries")."""
    shuffle_buffer: int = 16_384
    """Rows shuffled together. Each epoch the shards' row groups are permuted by (seed, epoch) and dealt to the
    workers; a worker then permutes the rows within windows of this many rows of its row groups (whole row groups,
    at least one; 0 = the rows of each row group in stored order). Memory per worker: about one window plus one row
    group per CPU it reserves (64 + 8 MB per CPU of 978-gene float32 rows at the default; rows of all 12,328 genes
    are 12.6x wider: 1,024 rows there are 8 row groups, 50 MB). A restart decodes its window again. See
    data/shards/stream.py."""


@dataclass
class Objective:
    """What pretraining optimises: the task set (one head per task), the masking, and the genes a step reads."""

    tasks: str = "mask"
    """'+'-joined subset of mask, cell, drug, dose (e.g. 'mask+cell+drug+dose'); kept in that order."""
    mask_ratio: float = 0.15
    """Fraction of gene tokens masked per signature, at least one per row (the paper compared 0.15 and 0.8)."""
    gene_sample: int = 0
    """Gene tokens per step (0 = every gene): each step reads a fresh random subset of the panel, as scGPT samples
    genes; attention costs O(tokens^2), so 256 of 978 makes a step ~8x cheaper. The encoder still reads any gene
    set at inference (a token is its gene's embedding + its value)."""

    def __post_init__(self) -> None:
        self.tasks = "+".join(parse_tasks(self.tasks))
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}", field="objective.mask_ratio")
        at_least(self, "objective", 0, "gene_sample")

    @property
    def heads(self) -> tuple[str, ...]:
        """The task names, one head each (model.heads.PretrainModel)."""
        return tuple(self.tasks.split("+"))


@dataclass
class OptimSection:
    """AdamW with a linear-warmup + cosine schedule, and how long it runs."""

    MOVED: ClassVar[dict[str, str]] = {"gene_sample": "objective.gene_sample"}

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warmup steps before cosine decay."""
    grad_clip: float = 1.0
    """Max global grad norm (<= 0 disables clipping)."""
    batch_size: int = 32
    """Signatures per worker per step."""
    epochs: int = 1
    """Passes over the training rows."""
    max_steps: int = 0
    """Stop after this many steps (0 = run all epochs)."""

    def __post_init__(self) -> None:
        at_least(self, "optim", 0, "lr", strict=True)
        at_least(self, "optim", 1, "batch_size", "epochs")
        at_least(self, "optim", 0, "warmup_steps", "max_steps")


@dataclass
class ScalingSection:
    num_workers: int = 2
    """Ray Train workers (one process each; one GPU each with use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs (DeepSpeed by default there)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs each worker reserves; < 1 leaves room for Ray Data's read tasks on small machines."""
    backend: str = "auto"
    """'ddp' (torch DDP: gloo on CPU, NCCL on GPU), 'deepspeed' (ZeRO), or 'auto' (deepspeed on GPU, ddp on CPU)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 1, 2 or 3."""
    bf16: bool = True
    """bf16 mixed precision (GPU / DeepSpeed only)."""
    torch_threads: int = 0
    """Intra-op threads per worker (0 = cores / workers)."""
    placement_strategy: str = "PACK"
    """Ray placement of the workers: PACK (fill a node first) or SPREAD (one per node where possible)."""


@dataclass
class CheckpointSection:
    every_n_steps: int = 50
    """Checkpoint (and report) interval in steps."""
    num_to_keep: int = 2
    """Checkpoints kept by Ray Train."""
    storage: str = ""
    """Ray Train storage path (default ./scpert_runs/ray; a shared filesystem or s3:// on a multi-node cluster)."""
    name: str = ""
    """Run folder name under storage (default: a fresh name). Re-use it with --resume."""
    max_failures: int = 2
    """Worker failures survived by restarting from the last checkpoint."""


@dataclass
class TrackingSection:
    uri: str = ""
    """MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."""
    experiment: str = "scpert-pretrain"
    """MLflow experiment."""
    run_name: str = ""
    """MLflow run name (default: the Ray run name)."""
    log_every: int = 5
    """Log step metrics every N steps."""


@dataclass
class PretrainConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSpec = field(default_factory=ModelSpec)
    objective: Objective = field(default_factory=Objective)
    optim: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    seed: int = 0
    """Seed of model init, masking and shuffling."""

    def __post_init__(self):
        if self.scaling.backend not in ("auto", "ddp", "deepspeed"):
            raise ConfigError(f"scaling.backend must be auto, ddp or deepspeed, not '{self.scaling.backend}'",
                              field="scaling.backend")
        if self.scaling.zero_stage not in (1, 2, 3):
            raise ConfigError("scaling.zero_stage must be 1, 2 or 3", field="scaling.zero_stage")
        if not 0 <= self.data.val_fraction < 0.5:
            raise ConfigError("data.val_fraction must be in [0, 0.5)", field="data.val_fraction")
        if self.scaling.num_workers < 1:
            raise ConfigError("scaling.num_workers must be >= 1", field="scaling.num_workers")

    def pretraining_hash(self) -> str:
        """Hash of what defines the pretrained weights (data, model, objective, optimisation, seed, workers): the key
        by which sweeps find a pretraining in MLflow and the headline caches its own. The dict hashed is the one of the
        layouts before the `objective` section (tasks and mask ratio under `model`, gene_sample under `optim`; the
        model's d_model/n_layers/dropout overrides, 0/-1 = the preset's), so pretrainings cached under those layouts
        keep their key; only a task set spelled other than its canonical '+'-joined form gets a new one."""
        data = {k: v for k, v in dataclasses.asdict(self.data).items() if k != "overlap"}  # scheduling, not weights
        ov = dict(self.model.overrides)
        o = self.objective
        model = {"preset": self.model.preset, "tasks": o.tasks, "mask_ratio": o.mask_ratio,
                 "d_model": ov.pop("d_model", 0), "n_layers": ov.pop("n_layers", 0), "dropout": ov.pop("dropout", -1.0),
                 **({"overrides": ov} if ov else {})}
        optim = {**dataclasses.asdict(self.optim), "gene_sample": o.gene_sample}
        d = {"data": data, "model": model, "optim": optim, "seed": self.seed, "workers": self.scaling.num_workers}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
