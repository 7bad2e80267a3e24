"""Simple baselines: control (vehicle cells unchanged), mean of training drugs, random training drugs."""
from __future__ import annotations

import numpy as np

from ... import schema as S
from ..predictor import Condition, FitContext, sample_cells


class ControlPredictor:
    """Vehicle cells of the line, unchanged (the 'no effect' prediction)."""

    name = "control"

    def fit(self, train, ctx: FitContext):
        return self

    def predict(self, controls, cond: Condition, n_cells: int, rng) -> np.ndarray:
        return sample_cells(S.dense(controls.X), n_cells, rng)


class MeanDrugPredictor:
    """Controls shifted by the average training logFC in the line (dose-matched when that dose was trained)."""

    name = "mean_drug"

    def fit(self, train, ctx: FitContext):
        obs = train.obs
        X = S.dense(train.X)
        self.shift: dict[tuple, np.ndarray] = {}
        for line in obs[S.OBS_CELL_LINE].unique():
            in_line = (obs[S.OBS_CELL_LINE] == line).to_numpy()
            ctl = in_line & obs[S.OBS_CONTROL].to_numpy(bool)
            if not ctl.any():
                continue
            mu0 = X[ctl].mean(0)
            trt = in_line & ~obs[S.OBS_CONTROL].to_numpy(bool)
            per_dose: dict[float, list] = {}
            for (_drug, dose), idx in obs[trt].groupby([S.OBS_DRUG, S.OBS_DOSE], observed=True).indices.items():
                rows = np.flatnonzero(trt)[idx]
                per_dose.setdefault(float(dose), []).append(X[rows].mean(0) - mu0)
            for dose, lfcs in per_dose.items():
                self.shift[(line, dose)] = np.mean(lfcs, 0)
            if per_dose:
                self.shift[(line, None)] = np.mean([v for lf in per_dose.values() for v in lf], 0)
        return self

    def predict(self, controls, cond: Condition, n_cells: int, rng) -> np.ndarray:
        key = (cond.cell_line, float(cond.dose_um))
        shift = self.shift.get(key, self.shift.get((cond.cell_line, None), 0.0))
        return np.clip(sample_cells(S.dense(controls.X), n_cells, rng) + shift, 0, None)


class RandomDrugsPredictor:
    """Cells of k random training drugs in the same line (and dose when available), as the paper."""

    name = "random"

    def __init__(self, k: int = 5):
        self.k = k

    def fit(self, train, ctx: FitContext):
        obs = train.obs
        trt = ~obs[S.OBS_CONTROL].to_numpy(bool)
        self.X = S.dense(train.X)
        self.obs = obs.assign(_trt=trt)
        return self

    def predict(self, controls, cond: Condition, n_cells: int, rng) -> np.ndarray:
        o = self.obs
        m = o["_trt"].to_numpy() & (o[S.OBS_CELL_LINE] == cond.cell_line).to_numpy()
        md = m & np.isclose(o[S.OBS_DOSE].to_numpy(float), cond.dose_um)
        if md.any():
            m = md
        drugs = np.unique(o.loc[m, S.OBS_DRUG].astype(str))
        if len(drugs) == 0:
            return sample_cells(S.dense(controls.X), n_cells, rng)
        pick = rng.choice(drugs, size=min(self.k, len(drugs)), replace=False)
        rows = np.flatnonzero(m & o[S.OBS_DRUG].astype(str).isin(pick).to_numpy())
        return self.X[rng.choice(rows, size=n_cells, replace=len(rows) < n_cells)]
