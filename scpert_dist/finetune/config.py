"""The finetuning config: one dataclass per section (loaded with `scpert_dist.config.load`, changed with
`config.replace_at` / `with_overrides`).

    data       the AnnData, its split column, the LINCS shards the `lincs` drug representation reads
    model      where the encoder comes from and what is built around it (decoder, drug representation, shift head)
    objective  what the loss weighs
    optim      AdamW, batches, epochs, the shift head's warm start
    tracking   MLflow

Every field is validated once, in its section's `__post_init__`: a typo in a decoder or drug representation (CLI
`--set`, a TOML, a sweep YAML) stops with a ConfigError naming the field and the registered names before any data is
read. The names are the registries' (`scpert_dist/registry.py`: DECODERS, DRUG_REPS; `model/config.py`: PRESETS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import at_least
from ..errors import ConfigError
from ..model.config import PRESETS
from ..registry import DECODERS, DRUG_REPS


@dataclass
class FinetuneData:
    path: str = ""
    """h5ad with the obs columns of schema.py (`scpert data sciplex` / `simulate`)."""
    split: str = "split_random"
    """obs column with train / valid / test per cell (training drugs, validation drugs for model selection, held-out
    drugs never looked at)."""
    lincs_shards: str = ""
    """LINCS shard folder (`scpert data lincs`): read by drug_rep = lincs."""


@dataclass
class FinetuneModelConfig:
    pretrained: str = "none"
    """Encoder to start from: a pretraining MLflow run id, models:/ URI or checkpoint folder; none = from scratch."""
    preset: str = "tiny"
    """Encoder size preset when pretrained = none (a pretrained encoder brings its own sizes)."""
    decoder: str = "factor"
    """Decoder (DECODERS): factor (per-gene factors x MLP of the pooled cell state; no loop over genes) | lstm | gru |
    mlp | transformer."""
    gene_block: int = 16
    """Genes per decoder step (lstm / gru / transformer run over G / gene_block steps)."""
    drug_rep: str = "morgan"
    """Drug representation (DRUG_REPS): learned | morgan | descriptors | lincs (the drug's LINCS signature, encoded)."""
    cond_hidden: int = 64
    """Hidden width of the condition MLPs."""
    shift_head: bool = True
    """Low-rank per-gene shift head (drug vector . per-gene factors from the gene embeddings)."""
    freeze_encoder: bool = True
    """True: the encoder is frozen and its states cached once for a control pool per line."""
    control_pool: int = 96
    """Control cells per line whose encoder states are cached (frozen) / sampled."""

    def __post_init__(self) -> None:
        DECODERS.check(self.decoder)
        DRUG_REPS.check(self.drug_rep)
        PRESETS.check(self.preset, field="model.preset")
        at_least(self, "model", 1, "gene_block", "cond_hidden", "control_pool")

    @property
    def scratch(self) -> bool:
        """No pretrained encoder: 'none', 'scratch' or empty."""
        return not self.pretrained or self.pretrained.lower() in ("none", "scratch")


@dataclass
class FinetuneObjective:
    cond_weight: float = 1.0
    """Weight of the condition-mean logFC loss (vs the all-cell mean logFC)."""
    mmd_weight: float = 0.0
    """Weight of an energy-distance term on each batch (0 = off)."""

    def __post_init__(self) -> None:
        at_least(self, "objective", 0, "cond_weight", "mmd_weight")


@dataclass
class FinetuneOptim:
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    epochs: int = 3
    """Epochs (the best one by validation-drug logFC r is kept)."""
    steps_per_epoch: int = 50
    """Steps per epoch."""
    batch_size: int = 64
    """Cells per step: batch_size // cells_per_cond conditions x cells_per_cond cells."""
    cells_per_cond: int = 8
    """Cells of one condition in a batch."""
    max_steps: int = 0
    """Stop after this many steps (0 = no cap)."""
    cond_steps: int = 200
    """Warm start: full-batch steps of the shift head on the training condition means."""
    cond_lr: float = 1e-2
    """Learning rate of that warm start."""

    def __post_init__(self) -> None:
        at_least(self, "optim", 0, "lr", "cond_lr", strict=True)
        at_least(self, "optim", 1, "epochs", "steps_per_epoch", "batch_size", "cells_per_cond")
        at_least(self, "optim", 0, "max_steps", "cond_steps")


@dataclass
class FinetuneTracking:
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI."""
    experiment: str = "scpert-finetune"
    """MLflow experiment."""


@dataclass
class FinetuneConfig:
    """One finetuning run: data, starting point and model, objective, optimisation, tracking."""

    MOVED: ClassVar[dict[str, str]] = {
        "data": "data.path", "split": "data.split", "lincs_shards": "data.lincs_shards",
        "pretrained": "model.pretrained", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
        "epochs": "optim.epochs", "steps_per_epoch": "optim.steps_per_epoch", "batch": "optim.batch_size",
        "cells_per_cond": "optim.cells_per_cond", "max_steps": "optim.max_steps", "cond_steps": "optim.cond_steps",
        "cond_lr": "optim.cond_lr", "cond_weight": "objective.cond_weight", "mmd_weight": "objective.mmd_weight",
        "tracking": "tracking.uri", "experiment": "tracking.experiment"}
    """Keys of the flat layout before the sections, and where they live now."""

    data: FinetuneData = field(default_factory=FinetuneData)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    objective: FinetuneObjective = field(default_factory=FinetuneObjective)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    tracking: FinetuneTracking = field(default_factory=FinetuneTracking)
    seed: int = 0
    """Seed of initialisation, batches and validation draws."""
    threads: int = 0
    """torch intra-op threads (0 = leave as is)."""
    out: str = "finetune_out"
    """Local model folder."""

    def __post_init__(self) -> None:
        if DRUG_REPS[self.model.drug_rep].needs_pretrained and (self.model.scratch or not self.data.lincs_shards):
            raise ConfigError(f"drug_rep={self.model.drug_rep!r} encodes each drug's LINCS signature with the "
                              "pretrained encoder", field="model.pretrained" if self.model.scratch else
                              "data.lincs_shards", hint="give model.pretrained=RUN|DIR and data.lincs_shards=DIR "
                                                        "(from `scpert data lincs`)")
