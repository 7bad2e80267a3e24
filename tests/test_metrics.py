import numpy as np
import pytest

from scpert_dist.evaluate import metrics as M
from scpert_dist.evaluate.baselines.simple import ControlPredictor, MeanDrugPredictor, RandomDrugsPredictor
from scpert_dist.evaluate.predictor import FitContext
from tests.sc_fixture import make_adata


def test_pearson_r2_energy_by_hand():
    assert M.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)  # by hand: cov 2.5/sqrt(1*6.333)
    # r2: true [1,2,3] mean 2, SStot 2; pred [1,2,4] SSres 1 -> 0.5
    assert M.r2([1, 2, 3], [1, 2, 4]) == pytest.approx(0.5)
    # energy: x={0}, y={3,4} (1-D): 2*mean(3,4)=7 ; E|x-x'|=0 ; E|y-y'|=(0+1+1+0)/4=0.5 -> 6.5
    assert M.energy_distance([[0.0]], [[3.0], [4.0]]) == pytest.approx(6.5)
    x = np.random.default_rng(0).normal(size=(20, 3))
    assert M.energy_distance(x, x) == pytest.approx(0.0)


def test_paper_metrics_and_dis_by_hand():
    true = np.array([[1.0, 2, 3, 4], [2, 1, 4, 3]])
    pred = np.array([[1.0, 2, 3, 5], [4, 3, 2, 1]])
    d = M.paper_metrics(true, pred, np.array([0, 1, 2]), np.array([0, 1]), n_true=2, n_pred=2,
                        rng=np.random.default_rng(0))
    # means: true [1.5,1.5,3.5,3.5], pred [2.5,2.5,2.5,3]
    assert d["mean"] == pytest.approx(np.corrcoef([1.5, 1.5, 3.5, 3.5], [2.5, 2.5, 2.5, 3])[0, 1])
    # dis: true0 best match pred0 r=corr([1,2,3,4],[1,2,3,5]); true1 vs pred0 / pred1
    r00 = np.corrcoef([1, 2, 3, 4], [1, 2, 3, 5])[0, 1]
    r10 = np.corrcoef([2, 1, 4, 3], [1, 2, 3, 5])[0, 1]
    r11 = np.corrcoef([2, 1, 4, 3], [4, 3, 2, 1])[0, 1]
    assert d["dis"] == pytest.approx((r00 + max(r10, r11)) / 2)
    # DE10 = genes 0,1: true0 [1,2] ~ pred0 [1,2] (r 1); true1 [2,1] ~ pred1 [4,3] (r 1) -> 1
    assert d["dis_DE10"] == pytest.approx(1.0)


def test_sound_metrics_by_hand():
    ctl = np.array([[1.0, 1, 1, 1]])
    true = np.array([[2.0, 1, 0, 1]])     # logFC [1,0,-1,0]
    pred = np.array([[3.0, 1, -1, 1]])    # logFC [2,0,-2,0] -> r 1, r2 = 1 - 2/2 = 0
    s = M.sound_metrics(true, pred, ctl, np.array([0, 2]))
    assert s["logfc_pearson"] == pytest.approx(1.0)
    assert s["logfc_r2"] == pytest.approx(0.0)
    assert s["energy_distance"] == pytest.approx(2 * np.sqrt(2) - 0 - 0)


def test_cosine_rank_and_bootstrap():
    t = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1]}
    assert M.cosine_logfc_rank(t, t) == {"a": 0.0, "b": 0.0, "c": 0.0}
    swapped = {"a": [0, 1, 0], "b": [1, 0, 0], "c": [0, 0, 1]}
    r = M.cosine_logfc_rank(t, swapped)
    # a's prediction [0,1,0]: cos to a 0, b 1, c 0 -> b beats it (1), c ties (0.5) -> 1.5 / 2 others
    assert r["a"] == 0.75 and r["b"] == 0.75 and r["c"] == 0.0
    collapsed = {k: [1, 1, 1] for k in t}
    assert all(v == 0.5 for v in M.cosine_logfc_rank(t, collapsed).values())
    m, lo, hi = M.bootstrap_ci(np.arange(10.0), rng=np.random.default_rng(0))
    assert m == 4.5 and lo < 4.5 < hi and lo > 2 and hi < 7


@pytest.fixture(scope="module")
def adata():
    return make_adata()


def test_de_genes_finds_program_genes(adata):
    de = M.de_genes(adata, "A549", "drug0", n=10)
    assert len(de) == 10 and len(set(de)) == 10


def test_mean_metric_dominated_by_baseline(adata):
    ctx = FitContext(genes=list(adata.var_names))
    rows = {p.name: M.evaluate_predictor(p, adata, "split_chemcpa_ood", ctx=ctx, seeds=[0])
            for p in (ControlPredictor(), MeanDrugPredictor(), RandomDrugsPredictor())}
    c = rows["control"]
    assert c["mean"].mean() > 0.9          # the paper's metric says 'control' is excellent
    assert abs(c["logfc_pearson"].mean()) < 0.3   # but it predicts no change at all
    assert rows["mean_drug"]["logfc_pearson"].mean() > c["logfc_pearson"].mean() + 0.2
    import pandas as pd
    summ = M.summarize(pd.concat(rows.values()))
    assert set(summ.method) == {"control", "mean_drug", "random"} and (summ.n_drugs == 4).all()
    assert (summ["logfc_pearson_lo"] <= summ["logfc_pearson"]).all()
    md = M.markdown_table(summ)
    assert "| control |" in md and "[" in md


@pytest.mark.slow  # UMAP's numba compile: ~70 s on 2 loaded cores
def test_plots_write_pngs(tmp_path):
    from scpert_dist.evaluate.plots import logfc_scatter_grid, umap_true_vs_pred

    rng = np.random.default_rng(0)
    t = {f"d{i}": rng.normal(size=30) for i in range(3)}
    p1 = logfc_scatter_grid(t, {k: v + 0.1 for k, v in t.items()}, tmp_path / "s.png")
    p2 = umap_true_vs_pred(rng.normal(size=(40, 20)), rng.normal(1, 1, size=(40, 20)), tmp_path / "u.png",
                           control=rng.normal(size=(30, 20)))
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
