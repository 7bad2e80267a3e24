"""Every baseline, registered explicitly (a baseline that fails to import is an error, never a silent omission).
Each implements `evaluate.predictor.Predictor`."""

from __future__ import annotations

from .cpa_baseline import CpaPredictor
from .cvae import CvaePredictor
from .knn import KnnLincsPredictor
from .linear import RidgePredictor
from .simple import ControlPredictor, MeanDrugPredictor, RandomDrugsPredictor

BASELINES = [ControlPredictor, MeanDrugPredictor, RandomDrugsPredictor, RidgePredictor, KnnLincsPredictor,
             CvaePredictor, CpaPredictor]
"""In table order. CPA runs only where its separate Python 3.10 environment exists (`CpaPredictor.available()`)."""

__all__ = ["BASELINES", *(c.__name__ for c in BASELINES)]
