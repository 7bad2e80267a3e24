"""Ridge baseline: drug features (Morgan fingerprint + log10 dose) -> per-gene logFC, one model per cell line;
the predicted shift is added to the line's control cells."""
from __future__ import annotations

import numpy as np

from ... import schema as S
from ...data.drugs import morgan_fingerprints
from ..predictor import Condition, FitContext


def _features(smiles: str, dose_um: float, n_bits: int) -> np.ndarray:
    fp = morgan_fingerprints([smiles], n_bits=n_bits)[0].astype(float)
    return np.concatenate([fp, [np.log10(dose_um + 1e-3)]])


class RidgePredictor:
    """Closed-form ridge (intercept unpenalised) per line on (drug, dose) mean logFCs of the training drugs."""

    name = "ridge"

    def __init__(self, alpha: float = 10.0, n_bits: int = 1024):
        self.alpha = alpha
        self.n_bits = n_bits

    def fit(self, train, ctx: FitContext):
        o = train.obs
        X = S.dense(train.X)
        ctl = o[S.OBS_CONTROL].to_numpy(bool)
        self.models: dict[str, tuple] = {}
        for line in o[S.OBS_CELL_LINE].astype(str).unique():
            ln = (o[S.OBS_CELL_LINE].astype(str) == line).to_numpy()
            if not (ln & ctl).any():
                continue
            mu0 = X[ln & ctl].mean(0)
            F, Y = [], []
            sub = o[ln & ~ctl]
            rows = np.flatnonzero(ln & ~ctl)
            for (_d, dose), idx in sub.groupby([S.OBS_DRUG, S.OBS_DOSE], observed=True).indices.items():
                F.append(_features(str(sub[S.OBS_SMILES].iloc[idx[0]]), float(dose), self.n_bits))
                Y.append(X[rows[idx]].mean(0) - mu0)
            if not F:
                continue
            F, Y = np.asarray(F), np.asarray(Y)
            fm, ym = F.mean(0), Y.mean(0)
            Fc = F - fm
            # dual form: W = Fc^T (Fc Fc^T + a I)^-1 (Y - ym)
            W = Fc.T @ np.linalg.solve(Fc @ Fc.T + self.alpha * np.eye(len(F)), Y - ym)
            self.models[line] = (fm, ym, W)
        return self

    def logfc(self, cond: Condition) -> np.ndarray:
        fm, ym, W = self.models[cond.cell_line]
        return ym + (_features(cond.smiles, cond.dose_um, self.n_bits) - fm) @ W

    def predict(self, controls, cond: Condition, n_cells: int, rng) -> np.ndarray:
        C = S.dense(controls.X)
        C = C[rng.choice(len(C), size=n_cells, replace=len(C) < n_cells)]
        return np.clip(C + self.logfc(cond), 0, None)
