"""The real transfer benchmark (evaluate/transfer.py) on the CPC006 plate in A375 and HT115."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scpert_dist.errors import MetadataError
from scpert_dist.evaluate import transfer as TR
from scpert_dist.finetune.readout import ReadoutConfig

pytestmark = pytest.mark.shared_data

A375 = "lincs/plates/CPC006_A375_6H_X1/gctv13_01_zs.gctx"
HT115 = "lincs/plates/CPC006_HT115_6H_X1_X2/PRnet_demo_CPC006_HT115_6H_level3_n681x978.h5ad"


@pytest.fixture(scope="module")
def pair(shared_data):
    a = TR.load_context(shared_data / A375, shared_data, "A375")
    b = TR.load_context(shared_data / HT115, shared_data, "HT115")
    return TR.make_pair(a, b)


def test_the_two_contexts_share_the_plate_map(pair):
    # SOURCES.md: the same ~350 compounds in both lines; HT115 on two replicate plates
    assert 330 <= pair.n <= 354
    assert len(pair.target.genes) == 978
    assert pair.target.plates == ["CPC006_HT115_6H_X1", "CPC006_HT115_6H_X2"]
    assert (pair.source.meta["compound"] == pair.target.meta["compound"]).all()
    ceil = TR.replicate_ceiling(pair.target)
    assert len(ceil) > 250
    r = ceil["replicate_r"].mean()
    assert 0.1 < r < 0.3                           # a 6 h plate: noisy replicates (SOURCES.md: median 0.16)
    assert (ceil["ceiling_sb"] >= ceil["replicate_r"].clip(lower=0)).all()
    assert TR.replicate_ceiling(pair.source).empty  # A375: one plate, no replicate ceiling


def test_no_method_reads_the_test_compounds_target_signature(pair):
    tr, te = TR.folds_of(pair.n, 5, 0)[0]
    Y2 = pair.target.values.copy()
    Y2[te] = np.random.default_rng(0).normal(size=Y2[te].shape) * 5
    other = dataclasses.replace(pair, target=dataclasses.replace(pair.target, values=Y2))
    emb = {"scratch": pair.source.values[:, :16], "pretrained": pair.source.values[:, 16:48]}
    rc = ReadoutConfig(folds=3)
    a, _ = TR.predict_fold(pair, tr, te, TR.METHODS, emb, rc)
    b, _ = TR.predict_fold(other, tr, te, TR.METHODS, emb, rc)
    for m in TR.METHODS:
        np.testing.assert_allclose(a[m], b[m], err_msg=m)


def test_the_source_signature_carries_what_structure_does_not(pair, shared_data):
    """Real data: on held-out compounds the source-context signature predicts the target context better than the
    average compound, and the readout is at least as good as ridge on the source signature."""
    per, info = TR.run_direction(pair, [shared_data / HT115], shared_data, seeds=(7,), folds=3,
                                 methods=("zero", "mean", "ridge_source", "readout_signature_scratch"),
                                 cfg=TR.TransferConfig(pretrain_steps=0), direction="A375 -> HT115")
    m = per.groupby("method")["pearson"].mean()
    assert m["zero"] == 0
    assert m["ridge_source"] > m["mean"] + 0.01
    assert m["readout_signature_scratch"] >= m["ridge_source"] - 0.002
    assert info["readout_kept"]["readout_signature_scratch"]


def test_contexts_without_shared_compounds_are_refused(pair):
    lone = dataclasses.replace(pair.source, meta=pair.source.meta.assign(compound=[f"X{i}" for i in range(pair.n)]))
    with pytest.raises(MetadataError, match="share only"):
        TR.make_pair(lone, pair.target)
