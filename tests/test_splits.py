"""Splits on obs built from the real sci-Plex3 design table (drugs, doses) and on synthetic drug names."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scpert_dist.data.drugs import normalize_name
from scpert_dist.data.readers.splits import CHEMCPA_OOD_DRUGS, add_splits, chemcpa_lists
from scpert_dist.errors import SplitError


def _adata(names, doses, ctrl) -> ad.AnnData:
    obs = pd.DataFrame({"drug": np.where(ctrl, "control", names), "dose_um": np.where(ctrl, 0.0, doses),
                        "is_control": ctrl, "cell_line": "A549"}, index=[f"c{i}" for i in range(len(names))])
    return ad.AnnData(X=np.zeros((len(names), 2), np.float32), obs=obs)


@pytest.fixture(scope="module")
def real(shared_data):
    """One cell per (drug, dose, cell line) of the real design, with the design table's own drug names
    ('Givinostat (ITF2357)'; chemCPA writes 'Givinostat')."""
    d = pd.read_csv(shared_data / "sciplex/sciplex3_hash_design_SupplTable3.tsv.gz", sep="\t")
    d = d.drop_duplicates(["name", "dose", "cell_type", "vehicle"])
    ctrl = d["vehicle"].astype(bool).to_numpy()
    names = d["name"].fillna("Vehicle").astype(str)
    return _adata(names.to_numpy(), d["dose"].astype(float).to_numpy() / 1000, ctrl)


@pytest.mark.shared_data
def test_chemcpa_ood_real(shared_data, real):
    info = add_splits(real, "chemcpa_ood", metadata=shared_data)
    col = real.obs["split_chemcpa_ood"]
    test = set(real.obs["drug"][col == "test"])
    assert len(test) == 9 and set(info["test_drugs"]) == test
    assert {normalize_name(x.split(" (")[0]) for x in test} == {normalize_name(x) for x in CHEMCPA_OOD_DRUGS}
    valid = set(real.obs["drug"][col == "valid"])
    assert valid and not (valid & test)
    assert len(valid) >= 25
    assert not {n for n in valid if n.startswith(("JNJ-26854165", "TAK-901"))}  # chemCPA's missing-comma artefact: not validation
    assert info["artefacts"] == ["JNJ-26854165TAK-901"]
    assert (col[real.obs["is_control"]] == "train").all()
    ood, val, _ = chemcpa_lists(shared_data)
    assert ood == list(CHEMCPA_OOD_DRUGS) and len(val) == 31


@pytest.mark.shared_data
def test_cpa_and_kfold_real(real):
    info = add_splits(real, "cpa", seed=3)
    obs = real.obs
    t = obs[obs["split_cpa"] == "test"]
    assert set(t["drug"]) == set(info["test_drugs"])
    for d, g in t.groupby("drug"):
        assert (g["dose_um"] == obs.loc[obs["drug"] == d, "dose_um"].max()).all()
    held_lower = obs[obs["drug"].isin(info["test_drugs"]) & (obs["split_cpa"] != "test")]
    assert len(held_lower) > 0 and (held_lower["split_cpa"] == "train").all()
    assert not set(obs.loc[obs["split_cpa"] == "valid", "drug"]) & set(info["test_drugs"])

    info = add_splits(real, "kfold", folds=4, seed=1)
    drugs = set(obs.loc[~obs["is_control"], "drug"])
    seen: list[str] = []
    for c in info["columns"]:
        te = set(obs.loc[obs[c] == "test", "drug"])
        va = set(obs.loc[obs[c] == "valid", "drug"])
        assert va and not (va & te)
        seen += sorted(te)
    assert sorted(seen) == sorted(drugs)  # every drug tested exactly once


def test_same_seed_same_split_and_fallback():
    rng = np.random.default_rng(0)
    names = np.array([f"drug{i}" for i in rng.integers(0, 30, 600)])
    ctrl = rng.random(600) < 0.1
    a, b, c = (_adata(names, np.ones(600), ctrl) for _ in range(3))
    ia = add_splits(a, "chemcpa_ood", seed=7)
    add_splits(b, "chemcpa_ood", seed=7)
    add_splits(c, "chemcpa_ood", seed=8)
    assert "fallback" in ia and len(ia["test_drugs"]) == 9
    assert (a.obs["split_chemcpa_ood"] == b.obs["split_chemcpa_ood"]).all()
    assert not (a.obs["split_chemcpa_ood"] == c.obs["split_chemcpa_ood"]).all()
    for k in ("kfold", "cpa"):
        add_splits(a, k, seed=5, folds=3)
        add_splits(b, k, seed=5, folds=3)
    assert all((a.obs[x] == b.obs[x]).all() for x in a.obs if x.startswith("split_"))


def test_empty_split_errors():
    one = _adata(np.array(["d1"] * 10), np.ones(10), np.zeros(10, bool))
    with pytest.raises(SplitError):
        add_splits(one, "cpa")
    with pytest.raises(SplitError):
        add_splits(one, "kfold", folds=2)
    with pytest.raises(SplitError):
        add_splits(one, "nope")
