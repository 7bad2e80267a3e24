"""Drug representations: `learned` (table; cannot represent unseen drugs), `morgan`, `descriptors` (RDKit)."""

from __future__ import annotations

import warnings

import numpy as np

from ..data import drugs as D
from ..errors import ConfigError, SmilesError

REPS = ("learned", "morgan", "descriptors")


def features(rep: str, smiles: list[str]) -> np.ndarray:
    """Fixed features for `morgan` / `descriptors`; rows for '' (control) are zero."""
    if rep not in ("morgan", "descriptors"):
        raise ConfigError(f"drug rep {rep!r} has no fixed features", field="model.drug_rep")
    valid = [s for s in smiles if s]
    for s in valid:
        if not D.is_valid_smiles(s):
            raise SmilesError(f"invalid SMILES {s!r}", field="smiles", hint="fix the SMILES in the data or --smiles")
    dim = 1024 if rep == "morgan" else len(D.descriptor_names())
    out = np.zeros((len(smiles), dim), np.float32)
    idx = [i for i, s in enumerate(smiles) if s]
    if idx:
        f = D.morgan_fingerprints(valid) if rep == "morgan" else D.descriptors(valid)
        f = np.asarray(f, np.float32)
        if rep == "descriptors":
            f = np.sign(f) * np.log1p(np.abs(f))  # tame heavy-tailed descriptors
        out[idx] = np.nan_to_num(f)
    return out


def warn_learned_unseen(drug: str) -> None:
    warnings.warn(f"drug {drug!r} was not in training: the 'learned' drug representation gives it an untrained "
                  "vector, so its prediction is not informed by the drug; use drug_rep='morgan' for unseen drugs",
                  UserWarning, stacklevel=3)
