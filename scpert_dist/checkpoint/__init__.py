"""Every saved-model format in one place.

- `pretrained`: the pretrained encoder export (safetensors + JSON), read by finetuning.
- `finetuned`: the finetuned model folder, read by `scpert predict` and the notebook API.
- `resume`: the Ray Train / DeepSpeed resume state of a pretraining run.
- `resolve`: "MLflow run id, models:/name@alias, models:/name/version, or a folder" -> a local folder.
"""

from __future__ import annotations

from .pretrained import (
    FORMAT,
    META,
    WEIGHTS,
    check_panel,
    load_pretrained,
    save_pretrained,
    transfer_gene_embeddings,
)

__all__ = [
    "FORMAT",
    "META",
    "WEIGHTS",
    "check_panel",
    "load_pretrained",
    "save_pretrained",
    "transfer_gene_embeddings",
]
