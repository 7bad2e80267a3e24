"""Finetuning: condition encoders + pretrained gene-token encoder + decoder; per-cell prediction."""
