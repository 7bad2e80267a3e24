"""The correlation scores every stage shares: Pearson r, R2, and the logFC r (predicted vs observed change from
vehicle), the one score finetuning validates on (finetune/validate.py) and the benchmark reports
(evaluate/metrics.py: sound_metrics). Plain numpy; at the bottom of the import graph so training and evaluation
use the same implementation."""

from __future__ import annotations

import numpy as np


def pearson(a, b) -> float:
    """Pearson r of two vectors (float64); NaN when either is constant."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def r2(true, pred) -> float:
    """Coefficient of determination of pred for true (1 - SSres/SStot)."""
    true = np.asarray(true, float)
    pred = np.asarray(pred, float)
    sst = ((true - true.mean()) ** 2).sum()
    return float(1 - ((true - pred) ** 2).sum() / sst) if sst > 0 else float("nan")


def logfc_pearson(true_mean, pred_mean, control_mean, pred_control_mean=None) -> float:
    """Pearson r over genes of the predicted change (pred_mean - pred_control_mean) against the observed change
    (true_mean - control_mean); `pred_control_mean` defaults to `control_mean` (the benchmark gives the vehicle half
    the method saw, the observed change uses the other half: evaluate/metrics.py)."""
    control_mean = np.asarray(control_mean, float)
    pred_base = control_mean if pred_control_mean is None else np.asarray(pred_control_mean, float)
    return pearson(np.asarray(true_mean, float) - control_mean, np.asarray(pred_mean, float) - pred_base)
