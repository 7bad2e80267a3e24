"""Train/valid/test splits over drugs, stored as data: an obs column `split_<name>` with 'train' | 'valid' | 'test'.

Kinds
-----
chemcpa_ood  chemCPA's `split_ood_finetuning`: its 9 OOD drugs -> test, its validation drugs -> valid, rest train.
             chemCPA's list has a missing-comma artefact, 'JNJ-26854165TAK-901' (one string): like chemCPA, neither
             JNJ-26854165 nor TAK-901 is in validation (they stay in train). If the 9 OOD drugs are absent from the
             data (synthetic data), 9 seeded held-out drugs are used instead and this is reported.
cpa          CPA-style: a seeded subset of drugs is held out at its highest dose only (those cells -> test).
kfold        seeded K-fold over drugs: column `split_kfold<K>_<i>`, fold i's drugs -> test; every drug is tested once.

Validation is always drawn from training drugs (never test drugs). Controls are always train.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputFileError, SplitError
from ...schema import OBS_CONTROL, OBS_DOSE, OBS_DRUG, SPLIT_PREFIX
from ..drugs import normalize_name
from .compounds import name_keys

log = logging.getLogger(__name__)

KINDS = ("chemcpa_ood", "cpa", "kfold")
CHEMCPA_SPLIT_CSV = "sciplex/chemcpa_sciplex_split_ood_finetuning_drugs.csv"
# The 9 OOD drug names of chemCPA's split_ood_finetuning (theislab/chemCPA, MIT, preprocessing/5_sciplex_ood_splits.py).
CHEMCPA_OOD_DRUGS = ("Dacinostat", "CUDC-907", "Givinostat", "CUDC-101", "Pirarubicin", "Hesperadin",
                     "Tanespimycin", "Trametinib", "Raltitrexed")
ARTEFACT = "JNJ-26854165TAK-901"


def _drugs(obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    ctrl = obs[OBS_CONTROL].to_numpy(bool)
    names = obs[OBS_DRUG].astype(str).to_numpy()
    return names, ctrl


def _check(col: pd.Series, name: str, need_valid: bool = True) -> pd.Series:
    counts = col.value_counts()
    for part in ("train", "test") + (("valid",) if need_valid else ()):
        if counts.get(part, 0) == 0:
            raise SplitError(f"split '{name}' has no '{part}' cells ({dict(counts)})", field=name,
                             hint="use data with more drugs, another --split, fewer --folds or another --seed")
    return col


def _pick_valid(train_drugs: list[str], rng: np.random.Generator, frac: float) -> set[str]:
    if len(train_drugs) < 2:
        return set()
    k = max(1, int(round(frac * len(train_drugs))))
    return set(rng.choice(sorted(train_drugs), size=min(k, len(train_drugs) - 1), replace=False).tolist())


def chemcpa_lists(metadata: str | Path | None) -> tuple[list[str], list[str], list[str]]:
    """(ood, validation, artefacts) names: from the metadata CSV, else the embedded 9 OOD names (no validation)."""
    if metadata is None:
        return list(CHEMCPA_OOD_DRUGS), [], []
    p = Path(metadata) / CHEMCPA_SPLIT_CSV
    if not p.is_file():
        raise InputFileError("chemCPA split table not found", path=str(p), hint="pass the public metadata folder")
    df = pd.read_csv(p)
    ood = df.loc[df["role"] == "ood", "chemcpa_drug_name"].astype(str).tolist()
    val = df.loc[df["role"] == "validation", "chemcpa_drug_name"].astype(str).tolist()
    arte = [v for v in val if v == ARTEFACT]
    val = [v for v in val if v != ARTEFACT]
    return ood, val, arte


def split_chemcpa_ood(obs: pd.DataFrame, *, seed: int = 0, metadata: str | Path | None = None,
                      valid_frac: float = 0.1, n_ood: int = 9) -> tuple[pd.Series, dict]:
    names, ctrl = _drugs(obs)
    ood, val, arte = chemcpa_lists(metadata)
    if arte:
        log.info("chemCPA validation list holds the missing-comma artefact %s: JNJ-26854165 and TAK-901 are "
                 "not validation drugs (as in chemCPA); they stay in train", arte)

    known = {normalize_name(n) for n in ood + val}

    def _key(n: str) -> str:  # 'Givinostat (ITF2357)' (design table) matches chemCPA's 'Givinostat'
        return next((k for k in [normalize_name(n), *name_keys(n)] if k in known), normalize_name(n))

    lookup = {n: _key(n) for n in set(names)}
    keys = np.array([lookup[n] for n in names])
    present = sorted(set(keys[~ctrl]))
    ood_k = {normalize_name(n) for n in ood} & set(present)
    info: dict = {"kind": "chemcpa_ood", "seed": seed, "artefacts": arte}
    rng = np.random.default_rng(seed)
    if len(ood_k) == 0:
        if len(present) < 3:
            raise SplitError(f"chemcpa_ood needs at least 3 drugs, the data has {len(present)}", field="drug",
                             hint="use data with more drugs")
        k = max(1, min(n_ood, len(present) - 2))  # 9 when the data has >= 11 drugs; leaves train + valid
        ood_k = set(rng.choice(present, size=k, replace=False).tolist())
        info["fallback"] = f"chemCPA's OOD drugs are absent from the data: {k} seeded held-out drugs used instead"
        log.warning(info["fallback"])
    val_k = ({normalize_name(n) for n in val} & set(present)) - ood_k
    if not val_k:
        val_k = _pick_valid([d for d in present if d not in ood_k], rng, valid_frac)
        info["valid_from"] = "seeded training drugs"
    col = np.full(len(obs), "train", dtype=object)
    col[np.isin(keys, list(ood_k)) & ~ctrl] = "test"
    col[np.isin(keys, list(val_k)) & ~ctrl] = "valid"
    info["test_drugs"] = sorted({n for n, c in zip(names, col, strict=False) if c == "test"})
    info["valid_drugs"] = sorted({n for n, c in zip(names, col, strict=False) if c == "valid"})
    return _check(pd.Series(col, index=obs.index, name=SPLIT_PREFIX + "chemcpa_ood"), "split_chemcpa_ood"), info


def split_cpa(obs: pd.DataFrame, *, seed: int = 0, frac: float = 0.2, valid_frac: float = 0.1) -> tuple[pd.Series, dict]:
    names, ctrl = _drugs(obs)
    dose = obs[OBS_DOSE].to_numpy(float)
    drugs = sorted(set(names[~ctrl]))
    if len(drugs) < 2:
        raise SplitError(f"cpa split needs at least 2 drugs, the data has {len(drugs)}", field="drug",
                         hint="use data with more drugs")
    rng = np.random.default_rng(seed)
    k = min(len(drugs) - 1, max(1, int(round(frac * len(drugs)))))
    held = set(rng.choice(drugs, size=k, replace=False).tolist())
    col = np.full(len(obs), "train", dtype=object)
    for d in held:
        m = (names == d) & ~ctrl
        col[m & (dose == dose[m].max())] = "test"
    # validation: a seeded 10% of the treated training cells of drugs that are not held out
    cand = np.flatnonzero((col == "train") & ~ctrl & ~np.isin(names, list(held)))
    nv = max(1, int(round(valid_frac * len(cand)))) if len(cand) > 1 else 0
    col[rng.choice(cand, size=nv, replace=False)] = "valid"
    info = {"kind": "cpa", "seed": seed, "test_drugs": sorted(held)}
    return _check(pd.Series(col, index=obs.index, name=SPLIT_PREFIX + "cpa"), "split_cpa"), info


def split_kfold(obs: pd.DataFrame, *, folds: int = 5, seed: int = 0, valid_frac: float = 0.1) -> tuple[dict[str, pd.Series], dict]:
    names, ctrl = _drugs(obs)
    drugs = sorted(set(names[~ctrl]))
    if folds < 2 or folds > len(drugs):
        raise SplitError(f"kfold needs 2 <= folds <= number of drugs ({len(drugs)}), got {folds}", field="folds",
                         hint="choose a smaller --folds")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(drugs)
    parts = np.array_split(perm, folds)
    cols, info = {}, {"kind": "kfold", "seed": seed, "folds": folds, "test_drugs": {}}
    for i, part in enumerate(parts):
        test = set(part.tolist())
        val = _pick_valid([d for d in drugs if d not in test], rng, valid_frac)
        col = np.full(len(obs), "train", dtype=object)
        col[np.isin(names, list(test)) & ~ctrl] = "test"
        col[np.isin(names, list(val)) & ~ctrl] = "valid"
        name = f"{SPLIT_PREFIX}kfold{folds}_{i}"
        cols[name] = _check(pd.Series(col, index=obs.index, name=name), name)
        info["test_drugs"][name] = sorted(test)
    return cols, info


def add_splits(adata, kind: str, *, seed: int = 0, folds: int = 5, metadata: str | Path | None = None) -> dict:
    """Add the split column(s) of `kind` to adata.obs in place; return info (test/valid drugs, fallbacks)."""
    if kind not in KINDS:
        raise SplitError(f"unknown split '{kind}'", field="split", hint=f"choose one of {', '.join(KINDS)}")
    obs = adata.obs
    if kind == "chemcpa_ood":
        col, info = split_chemcpa_ood(obs, seed=seed, metadata=metadata)
        cols = {col.name: col}
    elif kind == "cpa":
        col, info = split_cpa(obs, seed=seed)
        cols = {col.name: col}
    else:
        cols, info = split_kfold(obs, folds=folds, seed=seed)
    for name, col in cols.items():
        adata.obs[name] = pd.Categorical(col, categories=["train", "valid", "test"])
    info["columns"] = list(cols)
    return info
