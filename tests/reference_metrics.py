"""Reference implementations the metric tests compare the package's metrics with (test scaffolding, not package
code)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist


def energy_distance_v(x, y) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| of the two empirical distributions (Euclidean, V-statistic: the
    within means include i=j): 0 for identical sets, biased upwards for two samples of one population (the package
    scores with the unbiased U-statistic, `metrics.energy_distance_unbiased`)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())
