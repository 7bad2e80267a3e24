"""Finetuning configuration (loaded with `scpert_dist.config.load`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FinetuneModelConfig:
    """Shapes of the finetune model (used when training from scratch; a pretrained encoder brings its own)."""

    preset: str = "tiny"        # model preset for the gene-token encoder when pretrained = "none"
    decoder: str = "factor"     # factor (per-gene factors x MLP of the pooled cell state) | lstm | gru | mlp | transformer
    gene_block: int = 16        # genes per decoder step (lstm / gru / transformer run over G/gene_block steps)
    drug_rep: str = "morgan"    # learned | morgan | descriptors | lincs (the drug's LINCS signature, encoded)
    cond_hidden: int = 64       # hidden width of the condition MLPs
    shift_head: bool = True     # low-rank per-gene shift head (drug vector . per-gene factors from gene embeddings)
    freeze_encoder: bool = True  # True: encoder frozen, token states cached once for a control pool per line
    control_pool: int = 96      # control cells per line whose encoder states are cached (frozen) / sampled


@dataclass
class FinetuneConfig:
    """One finetuning run: data, starting point, model, optimisation, tracking."""

    data: str = ""                      # h5ad per schema.py
    split: str = "split_random"         # obs column with train/valid/test
    pretrained: str = "none"            # MLflow run id | checkpoint dir | none (scratch)
    lincs_shards: str = ""              # LINCS shard folder: needed by drug_rep = lincs
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    lr: float = 1e-3
    epochs: int = 3
    batch: int = 64
    steps_per_epoch: int = 50
    max_steps: int = 0                  # 0 = no cap
    seed: int = 0
    mmd_weight: float = 0.0             # optional energy-distance term on each batch
    cells_per_cond: int = 8             # a batch = batch // cells_per_cond conditions x cells_per_cond cells
    cond_weight: float = 1.0            # weight of the condition-mean logFC loss (vs the all-cell mean logFC)
    cond_steps: int = 200               # warm start: full-batch steps of the shift head on training condition means
    cond_lr: float = 1e-2               # learning rate of that warm start
    weight_decay: float = 1e-4
    threads: int = 0                    # torch intra-op threads (0 = leave as is)
    tracking: str = "sqlite:///mlflow.db"
    experiment: str = "scpert-finetune"
    out: str = "finetune_out"           # local model folder
