"""The Predictor contract shared by every baseline and our finetuned model: `fit(train AnnData, FitContext)`, then
`predict(control cells, Condition, n_cells, rng)` -> [n_cells, G] predicted cells."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


@dataclass
class Condition:
    """One perturbed population to predict: a drug at a dose in a cell line."""

    drug: str
    smiles: str
    cell_line: str
    dose_um: float


@dataclass
class FitContext:
    """What a predictor may use besides the training cells."""

    genes: list[str]
    """adata.var_names (model gene ids)."""
    lincs: Any = None
    """LincsSignatures or None (bulk signatures for kNN / a LINCS drug representation)."""
    seed: int = 0
    query: list = None
    """The held-out conditions that will be asked for (drug, SMILES, line, dose; never their cells). Only methods
    that must register every drug up front use it (CPA's drug vocabulary and RDKit embeddings)."""


def sample_cells(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of x drawn at random (without replacement while x has enough): the control cells a baseline predicts
    from."""
    return x[rng.choice(len(x), size=n, replace=len(x) < n)]


class Predictor(Protocol):
    name: str

    def fit(self, train: AnnData, ctx: FitContext) -> Predictor: ...

    def predict(self, controls: AnnData, cond: Condition, n_cells: int,
                rng: np.random.Generator) -> np.ndarray:
        """[n_cells, n_genes] log-normalised expression, one row per predicted cell."""
        ...
