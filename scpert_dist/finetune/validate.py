"""Model selection during finetuning, and the scoring of a trained model on a data set's conditions: mean logFC r
over conditions (`stats.logfc_pearson`, the benchmark's score) of predictions made by the one prediction path
(`finetune/predict.py: predict_cells`). Finetuning validates on the VALIDATION drugs only, never the test drugs."""

from __future__ import annotations

import numpy as np
import torch

from ..stats import logfc_pearson
from .data import ControlPool, Prepared, condition_groups
from .predict import predict_cells


def condition_means(model, prep: Prepared, keys: list, n_cells: int, rng, pool: ControlPool,
                    chunk: int = 512) -> np.ndarray:
    """[n_conditions, G] mean predicted expression over n_cells control cells of each condition's line, drawn from
    the pool."""
    idx = np.concatenate([pool.sample(k[1], n_cells, rng) for k in keys])
    drug = np.repeat([k[0] for k in keys], n_cells)
    dose = torch.from_numpy(np.repeat(np.array([k[2] for k in keys], np.float32), n_cells))
    cidx = torch.tensor([prep.cells.index(k[1]) for k in keys]).repeat_interleave(n_cells)
    was = model.training
    model.eval()
    pred = predict_cells(model, pool, idx, prep.drug_input(drug), cidx, dose, chunk=chunk)
    model.train(was)
    if was and not any(p.requires_grad for p in model.encoder.parameters()):
        model.encoder.eval()  # a frozen encoder stays in eval mode while the rest trains
    return pred.reshape(len(keys), n_cells, -1).mean(1)


def logfc_pearson_groups(model, prep: Prepared, rows: np.ndarray, rng, n_cells: int = 64,
                         pool: ControlPool | None = None, chunk: int = 512) -> float:
    """Mean over the conditions of `rows` of the logFC r of the predicted against the observed condition mean (both
    against the line's mean control cell); predictions from `pool` (the training pool during finetuning), or from
    every control cell of the line."""
    groups = condition_groups(prep, rows)
    keys = list(groups)
    if not keys:
        return float("nan")
    pool = pool if pool is not None else ControlPool.every_control(model, prep)
    pm = condition_means(model, prep, keys, n_cells, rng, pool, chunk)
    cm = prep.control_means()
    scores = [logfc_pearson(prep.X[groups[k]].mean(0), pm[j], cm[k[1]]) for j, k in enumerate(keys)]
    scores = [s for s in scores if np.isfinite(s)]
    return float(np.mean(scores)) if scores else float("nan")
