"""kNN on LINCS (the paper's baseline): the k training drugs nearest to the test drug by cosine distance of their
LINCS signatures in the same cell line; their cells (same line, dose-matched when present) are resampled with
weights 1/distance. Fallback when the test drug (or the line) has no LINCS signature, or fewer than k training
drugs have one: k random training drugs in the line (the paper's 'random' baseline); counted in `n_fallback`."""
from __future__ import annotations

import numpy as np

from ... import schema as S
from ..predictor import Condition, FitContext


class KnnLincsPredictor:
    name = "knn_lincs"

    def __init__(self, k: int = 5):
        self.k = k

    def fit(self, train, ctx: FitContext):
        o = train.obs
        self.lincs = ctx.lincs
        self.X = S.dense(train.X)
        self.trt = ~o[S.OBS_CONTROL].to_numpy(bool)
        self.line = o[S.OBS_CELL_LINE].astype(str).to_numpy()
        self.drug = o[S.OBS_DRUG].astype(str).to_numpy()
        self.dose = o[S.OBS_DOSE].to_numpy(float)
        self.smiles = dict(zip(self.drug, o[S.OBS_SMILES].astype(str), strict=True))
        self.n_fallback = 0
        self.last_neighbours: list[tuple[str, float]] = []
        return self

    def _sig(self, drug: str, smiles: str, line: str):
        if self.lincs is None:
            return None
        s = self.lincs.get(drug, line)
        if s is None and smiles:
            s = self.lincs.get(smiles, line)
        return s

    def neighbours(self, cond: Condition) -> list[tuple[str, float]] | None:
        q = self._sig(cond.drug, cond.smiles, cond.cell_line)
        if q is None:
            return None
        cands = sorted(set(self.drug[self.trt & (self.line == cond.cell_line)]))
        d = []
        for c in cands:
            s = self._sig(c, self.smiles.get(c, ""), cond.cell_line)
            if s is not None:
                cos = float(q @ s / max(np.linalg.norm(q) * np.linalg.norm(s), 1e-12))
                d.append((c, 1.0 - cos))
        if len(d) < self.k:
            return None
        return sorted(d, key=lambda t: t[1])[: self.k]

    def predict(self, controls, cond: Condition, n_cells: int, rng) -> np.ndarray:
        nb = self.neighbours(cond)
        m = self.trt & (self.line == cond.cell_line)
        if nb is None:
            self.n_fallback += 1
            drugs = sorted(set(self.drug[m]))
            pick = rng.choice(drugs, size=min(self.k, len(drugs)), replace=False)
            nb = [(str(p), 1.0) for p in pick]
        self.last_neighbours = nb
        md = m & np.isclose(self.dose, cond.dose_um)
        rows, w = [], []
        for drug, dist in nb:
            r = np.flatnonzero((md if (md & (self.drug == drug)).any() else m) & (self.drug == drug))
            rows.append(r)
            w.append(np.full(len(r), 1.0 / max(dist, 1e-6) / len(r)))
        rows, w = np.concatenate(rows), np.concatenate(w)
        return self.X[rng.choice(rows, size=n_cells, replace=True, p=w / w.sum())]
