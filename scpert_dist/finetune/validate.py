"""Model selection during finetuning: logFC Pearson on the VALIDATION drugs' conditions (never test drugs)."""

from __future__ import annotations

import numpy as np
import torch

from .data import Prepared, condition_groups


def _predict_condition_means(model, prep: Prepared, keys: list, n_cells: int, rng, pool, chunk: int) -> np.ndarray:
    """[n_conditions, G] mean predicted expression over n_cells control cells of each condition's line."""
    drug = np.repeat([k[0] for k in keys], n_cells)
    line = np.repeat([k[1] for k in keys], n_cells)
    dose = torch.from_numpy(np.repeat(np.array([k[2] for k in keys], np.float32), n_cells))
    cidx = torch.tensor([prep.cells.index(c) for c in line])
    if pool is not None:
        pi = np.concatenate([pool.sample(k[1], n_cells, rng) for k in keys])
        Xc = pool.X[pi]
    else:
        Xc = prep.X[np.concatenate([rng.choice(prep.ctl_by_line[k[1]], size=n_cells) for k in keys])]
    preds = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(drug), chunk):
            sl = slice(i, i + chunk)
            ctrl = torch.from_numpy(Xc[sl])
            if pool is not None:
                preds.append(model.head(pool.h[torch.from_numpy(pi[sl])], ctrl, prep.drug_input(drug[sl]),
                                        cidx[sl], dose[sl]).numpy())
            else:
                preds.append(model(ctrl, prep.drug_input(drug[sl]), cidx[sl], dose[sl]).numpy())
    model.train()
    if pool is not None and not any(p.requires_grad for p in model.encoder.parameters()):
        model.encoder.eval()
    return np.concatenate(preds).reshape(len(keys), n_cells, -1).mean(1)


def logfc_pearson_groups(model, prep: Prepared, rows: np.ndarray, rng, n_cells: int = 64, pool=None,
                         chunk: int = 512) -> float:
    """Mean over conditions of Pearson(pred mean - control mean, true mean - control mean); with a ControlPool
    the predictions use its cached encoder states (fast, conditions batched), else the full model on sampled
    control cells of the line."""
    groups = condition_groups(prep, rows)
    keys = list(groups)
    if not keys:
        return float("nan")
    pm = _predict_condition_means(model, prep, keys, n_cells, rng, pool, chunk)
    cm = prep.control_means()
    scores = []
    for j, k in enumerate(keys):
        a, b = pm[j] - cm[k[1]], prep.X[groups[k]].mean(0) - cm[k[1]]
        if a.std() > 0 and b.std() > 0:
            scores.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(scores)) if scores else float("nan")
