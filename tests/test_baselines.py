import numpy as np
import pytest

from scpert_dist.evaluate import metrics as M
from scpert_dist.evaluate.baselines.base import Condition, FitContext
from scpert_dist.evaluate.baselines.linear import RidgePredictor
from scpert_dist.evaluate.baselines.simple import ControlPredictor, MeanDrugPredictor, RandomDrugsPredictor
from tests.sc_fixture import make_adata


@pytest.fixture(scope="module")
def adata():
    return make_adata()


def test_baselines_shapes(adata):
    ctx = FitContext(genes=list(adata.var_names))
    train = adata[adata.obs.split_chemcpa_ood == "train"]
    ctl = adata[(adata.obs.cell_line == "A549") & adata.obs.is_control]
    row = adata.obs[adata.obs.drug == "drug11"].iloc[0]
    cond = Condition("drug11", row.smiles, "A549", 10.0)
    for p in (ControlPredictor(), MeanDrugPredictor(), RandomDrugsPredictor(), RidgePredictor()):
        out = p.fit(train, ctx).predict(ctl, cond, 37, np.random.default_rng(0))
        assert out.shape == (37, adata.n_vars) and np.isfinite(out).all()


def test_ridge_beats_control_on_logfc(adata):
    ctx = FitContext(genes=list(adata.var_names))
    r = M.evaluate_predictor(RidgePredictor(), adata, "split_chemcpa_ood", ctx=ctx, seeds=[0])
    c = M.evaluate_predictor(ControlPredictor(), adata, "split_chemcpa_ood", ctx=ctx, seeds=[0])
    assert r["logfc_pearson"].mean() > c["logfc_pearson"].mean() + 0.2
