"""Pretraining in this process, without Ray: the plain-torch step (train/step.py) over rows of a matrix already in
memory. The real-data benchmarks (evaluate/bulk.py, evaluate/transfer.py) pretrain their encoders with it on a few
hundred to a few thousand real signatures; `scpert pretrain` (Ray Data -> Ray Train) is the path for shards."""

from __future__ import annotations

import time

import numpy as np

from .settings import Objective, OptimSection
from .step import make_optimizer, train_step


def pretrain_in_process(values: np.ndarray, *, preset: str, steps: int, batch: int, optim: OptimSection,
                        objective: Objective, seed: int = 0):
    """(PretrainModel after `steps` steps of `batch` random rows of `values` [n, G], what it saw). steps=0 returns
    the untrained model (the same initialisation for the same seed: the 'scratch' reference)."""
    import torch

    from ..model import PretrainModel, model_config

    torch.manual_seed(seed)
    model = PretrainModel(model_config(preset, n_genes=values.shape[1]), objective.heads)
    opt, sched = make_optimizer(model, optim, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        rows = rng.integers(0, len(values), size=min(batch, len(values)))
        losses.append(train_step(model, {"expr": torch.tensor(values[rows], dtype=torch.float32)}, opt, sched, optim,
                                 objective, generator=gen)["loss"])
    info = {"rows": len(values), "steps": steps, "batch": batch, "seconds": round(time.perf_counter() - t0, 1),
            "mask_loss_first10": float(np.mean(losses[:10])) if losses else float("nan"),
            "mask_loss_last10": float(np.mean(losses[-10:])) if losses else float("nan")}
    return model, info
