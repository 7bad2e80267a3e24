"""The readout (finetune/readout.py): equals ridge with structure features alone, falls back to the baseline when
no feature helps, keeps a block that carries the signal, and never reads the query's response."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from scpert_dist.errors import ConfigError
from scpert_dist.finetune.readout import Readout, ReadoutConfig


def mean_base(Y):
    return lambda tr, q: np.repeat(Y[tr].mean(0, keepdims=True), len(q), 0)


def toy(n=60, p=40, G=30, signal=1.0, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 2, size=(n, p)).astype(float)       # bits, like a Morgan fingerprint
    W = rng.normal(size=(p, G))
    common = rng.normal(size=G) * 2
    Y = common + signal * (X - X.mean(0)) @ W / np.sqrt(p) + rng.normal(size=(n, G))
    return X, Y


def test_one_structure_block_is_ridge_with_the_same_alpha():
    X, Y = toy()
    tr, q = np.arange(50), np.arange(50, 60)
    r = Readout(ReadoutConfig(select=False)).fit(Y[tr], np.arange(50), mean_base(Y[tr]), kernels={"morgan": X[tr]})
    pred = r.predict(np.repeat(Y[tr].mean(0, keepdims=True), 10, 0), kernels={"morgan": X[q]})
    ref = Ridge(alpha=r.ridge_alpha("morgan")).fit(X[tr], Y[tr]).predict(X[q])
    np.testing.assert_allclose(pred, ref, rtol=1e-6, atol=1e-8)
    # and the alpha is the one inner CV picked, not the grid's first
    assert r.report["weights"]["morgan"] in r.cfg.weights


def test_noise_features_fall_back_to_the_baseline_exactly():
    rng = np.random.default_rng(1)
    X, Y = toy(signal=0.0, seed=1)
    noise = rng.normal(size=(len(Y), 50))
    r = Readout().fit(Y, np.arange(len(Y)), mean_base(Y), kernels={"noise": noise})
    assert r.report["kept"] == []
    base_q = np.repeat(Y.mean(0, keepdims=True), 5, 0)
    np.testing.assert_allclose(r.predict(base_q, kernels={"noise": rng.normal(size=(5, 50))}), base_q)


def test_the_block_with_signal_is_kept_and_beats_the_baseline_on_new_drugs():
    X, Y = toy(n=120, signal=2.0, seed=2)
    noise = np.random.default_rng(3).normal(size=(120, 40))
    tr, q = np.arange(90), np.arange(90, 120)
    r = Readout().fit(Y[tr], tr, mean_base(Y[tr]), kernels={"noise": noise[tr], "morgan": X[tr]})
    assert r.report["kept"][0] == "morgan"
    base_q = np.repeat(Y[tr].mean(0, keepdims=True), len(q), 0)
    p = r.predict(base_q, kernels={"noise": noise[q], "morgan": X[q]})

    def score(P):
        return np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(P, Y[q], strict=True)])

    assert score(p) > score(base_q) + 0.05


def test_aligned_block_scales_a_signature_measured_elsewhere():
    rng = np.random.default_rng(4)
    n, G = 80, 50
    S = rng.normal(size=(n, G))                  # the drug's signature in another context
    Y = 0.5 * S + rng.normal(size=(n, G)) * 0.5
    r = Readout().fit(Y, np.arange(n), mean_base(Y), aligned={"source": S})
    assert r.report["kept"] == ["source"]
    b = r._fit[0]["source"][0]
    assert 0.4 < b < 0.6


def test_folds_never_split_a_drug_and_bad_blocks_are_named():
    X, Y = toy(n=40)
    groups = np.repeat(np.arange(10), 4)        # 4 doses per drug
    seen = []

    def base(tr, q):
        seen.append((set(groups[tr]), set(groups[q])))
        return np.repeat(Y[tr].mean(0, keepdims=True), len(q), 0)

    Readout().fit(Y, groups, base, kernels={"morgan": X})
    assert all(not (a & b) for a, b in seen if a != b)
    with pytest.raises(ConfigError, match="morgan"):
        Readout().fit(Y, groups, base, kernels={"morgan": X[:10]})
    with pytest.raises(ConfigError, match="at least 2 training drugs"):
        Readout().fit(Y, np.zeros(len(Y)), base, kernels={"morgan": X})


def test_the_fast_weight_grid_equals_solving_each_weight():
    X, Y = toy(n=50, seed=5)
    Z = np.random.default_rng(6).normal(size=(50, 20))
    r = Readout()
    r.fit(Y, np.arange(50), mean_base(Y), kernels={"morgan": X, "other": Z})
    # refit the inner folds and compare the eigen-trick grid with direct solves, with a block already kept
    r2 = Readout(ReadoutConfig(select=False))
    r2._X, r2._D, r2._Y = {"morgan": X, "other": Z}, {}, Y
    r2._G = {k: v @ v.T for k, v in r2._X.items()}
    from scpert_dist.finetune.readout import _group_folds, _kernel_scale
    r2._scale = {k: _kernel_scale(G) for k, G in r2._G.items()}
    base = mean_base(Y)
    r2._folds = [(tr, te, base(tr, te), base(tr, tr), {k: r2._centred(k, tr, tr, te) for k in r2._X})
                 for tr, te in _group_folds(np.arange(50), 5, 0)]
    grid = r2._cv_grid({"morgan": 0.3}, [], "other")
    direct = [r2._cv({"morgan": 0.3, "other": w}, []) for w in r2.cfg.weights]
    np.testing.assert_allclose(grid, direct, rtol=1e-8, atol=1e-10)
