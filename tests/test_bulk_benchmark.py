"""Unseen compounds in real L1000 plates (CPC006: 354 compounds, 6 h; LJP009: 59 kinase inhibitors x 6 doses,
24 h): splits, SMILES resolution, every method with a tiny budget, the same-compound references, the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from scpert_dist.errors import SplitError
from scpert_dist.evaluate import bulk as B

CPC = "lincs/plates/CPC006_A375_6H_X1/gctv13_01_zs.gctx"
LJP = "lincs/plates/LJP009_A375_24H_X1_B20/LJP009_A375_24H_X1_B20_ZSPCQNORM_n371x978.gct.gz"


@pytest.fixture(scope="module")
def plates(shared_data):
    ps = [shared_data / CPC, shared_data / LJP]
    if not all(p.is_file() for p in ps):
        pytest.skip("real L1000 plates absent")
    return ps


@pytest.fixture(scope="module")
def both(plates, shared_data):
    return B.load_plates(plates, shared_data)


def test_smiles_and_compound_disjoint_folds(both):
    """353 of 354 CPC006 compounds and all LJP009 compounds get a SMILES; k-fold test sets partition the
    evaluable wells and never share a compound with their training set; plate mode scores only unseen compounds."""
    m = both.meta
    trt = m[m["pert_type"] == "trt_cp"]
    cpc = trt[trt["plate"].str.startswith("CPC006")]
    assert cpc["pert_id"].nunique() == 354 and cpc.loc[cpc["smiles"] != "", "pert_id"].nunique() == 353
    ljp = trt[trt["plate"].str.startswith("LJP009")]
    assert (ljp["smiles"] != "").all() and ljp["pert_id"].nunique() == 59
    ev = B.evaluable(both)
    splits = B.kfold_splits(both, 5, seed=0)
    tests = np.concatenate([te for _, te in splits])
    assert len(tests) == len(set(tests)) == ev.sum()
    for tr, te in splits:
        assert not set(m["compound"].iloc[tr]) & set(m["compound"].iloc[te])
        assert not set(m["compound"].iloc[B._pool(both, te)]) & set(m["compound"].iloc[te])
    tr, te = B.plate_split(both, "gctv13_01_zs.gctx")
    assert (m["plate"].iloc[te].str.startswith("CPC006")).all() and len(te) > 300
    assert not set(m["compound"].iloc[tr]) & set(m["compound"].iloc[te])
    with pytest.raises(SplitError):
        B.plate_split(both, "no_such_plate")
    with pytest.raises(SplitError):
        B.kfold_splits(both, 1)


def test_baselines_on_ljp009(plates, shared_data):
    """2-fold over LJP009 with the quick baselines: the null scores r 0 and chance precision by construction."""
    per, info = B.run_bulk([plates[1]], shared_data, folds=2, methods=("zero", "mean", "knn"), seeds=(0,))
    r = per.groupby("method")["pearson"].mean()
    assert r["zero"] == 0 and r["mean"] > 0.1
    z = per[per["method"] == "zero"]
    assert np.allclose(z["precision_up50"], 50 / 978)
    assert sum(s["test_wells"] for s in info["splits"]) == info["evaluable_wells"]
    assert B.dose_series_plates(per) == ["LJP009_A375_24H_X1"]


@pytest.mark.slow
def test_every_method_tiny_budget_on_ljp009(plates, shared_data):
    """3-fold over LJP009 with every method (tiny pretraining/fit budget): the null scores 0 by construction, the
    mean of the training compounds is positively correlated with unseen compounds' signatures, and the
    pretraining saw only the training signatures."""
    cfg = B.OursConfig(pretrain_steps=2, fit_steps=10)
    per, info = B.run_bulk([plates[1]], shared_data, folds=3, methods=B.METHODS, seeds=(0,), cfg=cfg)
    r = per.groupby("method")["pearson"].mean()
    assert set(r.index) == set(B.METHODS) and r["zero"] == 0
    assert r["mean"] > 0.1
    assert per.groupby("method").size().nunique() == 1  # every method scored on the same wells
    for s in info["splits"]:
        assert s["pretraining"]["steps"] == 2 and s["pretraining"]["signatures"] < info["wells"]
        assert s["ridge_alpha"] in B.ALPHAS
    d = B.paired_bulk(per, B.best_baseline(per))
    assert (d["lo"] <= d["diff"]).all() and (d["diff"] <= d["hi"]).all()


def test_same_compound_references_on_ljp009(plates, shared_data):
    """Neighbouring doses of the same compound predict a well far better than zero: the data carry a
    compound-specific signal (the bar an unseen-compound model could approach)."""
    ref = B.noise_reference([plates[1]], shared_data)
    nb = ref[ref["method"] == "same_compound_neighbour_dose"]
    assert nb["compound"].nunique() >= 55 and nb["pearson"].mean() > 0.2
