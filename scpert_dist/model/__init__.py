"""The gene-token BERT model: config + size presets (config.py, no torch), encoder, pretraining heads, masking,
metrics. The torch modules are imported on first use of their names, so configs validate without torch."""

from importlib import import_module

from .config import PRESETS, TASKS, ModelConfig, flops_per_sample, model_config, parse_tasks

_LAZY = {"GeneTokenEncoder": "encoder", "count_parameters": "encoder",
         "IGNORE_INDEX": "heads", "PretrainModel": "heads", "table1_metrics": "heads", "random_mask": "masking"}

__all__ = [
    "IGNORE_INDEX", "PRESETS", "TASKS", "GeneTokenEncoder", "ModelConfig", "PretrainModel", "count_parameters",
    "flops_per_sample", "model_config", "parse_tasks", "random_mask", "table1_metrics",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
