"""The gene-token BERT model: config + presets, encoder, pretraining heads, masking, metrics."""

from .config import PRESETS, TASKS, ModelConfig, flops_per_sample, model_config, parse_tasks
from .encoder import GeneTokenEncoder, count_parameters, naive_attention
from .heads import IGNORE_INDEX, PretrainModel, table1_metrics
from .masking import random_mask

__all__ = [
    "IGNORE_INDEX", "PRESETS", "TASKS", "GeneTokenEncoder", "ModelConfig", "PretrainModel", "count_parameters",
    "flops_per_sample", "model_config", "naive_attention", "parse_tasks", "random_mask", "table1_metrics",
]
