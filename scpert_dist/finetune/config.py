"""Finetuning configuration (loaded with `scpert_dist.config.load`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FinetuneModelConfig:
    """Shapes of the finetune model (used when training from scratch; a pretrained encoder brings its own)."""

    preset: str = "tiny"        # model preset for the gene-token encoder when pretrained = "none"
    decoder: str = "lstm"       # lstm | gru | mlp | transformer
    gene_block: int = 16        # genes per decoder step (sequential decoders run over G/gene_block steps)
    drug_rep: str = "morgan"    # learned | morgan | descriptors
    cond_hidden: int = 64       # hidden width of the condition MLPs


@dataclass
class FinetuneConfig:
    """One finetuning run: data, starting point, model, optimisation, tracking."""

    data: str = ""                      # h5ad per schema.py
    split: str = "split_random"         # obs column with train/valid/test
    pretrained: str = "none"            # MLflow run id | checkpoint dir | none (scratch)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    lr: float = 1e-3
    epochs: int = 3
    batch: int = 64
    steps_per_epoch: int = 50
    max_steps: int = 0                  # 0 = no cap
    seed: int = 0
    mmd_weight: float = 0.0             # optional energy-distance term on each batch
    tracking: str = "sqlite:///mlflow.db"
    experiment: str = "scpert-finetune"
    out: str = "finetune_out"           # local model folder
