"""Hypothesis property tests: dose parsing (beyond tests/test_doses.py), gene mapping onto the landmark panel, and
the evaluation metrics. Each property runs a bounded number of examples (well under a few seconds each)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scpert_dist.data.readers.doses import parse_dose_um
from scpert_dist.data.readers.genes import map_genes
from scpert_dist.errors import MetadataError
from scpert_dist.evaluate.metrics import paper_metrics, pearson, r2, sound_metrics

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SHARED  # noqa: E402
from reference_metrics import energy_distance_v  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pos = st.floats(min_value=1e-3, max_value=1e5, allow_nan=False, allow_infinity=False)


# -------------------------------------------------------------------------------------------------------- doses
@FAST
@given(pos, st.sampled_from(["nM", "uM", "pM"]), st.sampled_from(["", " ", "  "]), st.booleans())
def test_dose_spacing_and_unit_case_do_not_matter(x, unit, space, upper):
    u = unit.upper() if upper else unit.lower()
    assert parse_dose_um(f"{x}{space}{u}") == pytest.approx(parse_dose_um(f"{x} {unit}"), rel=1e-12)


@FAST
@given(pos, st.sampled_from(["pM", "nM", "uM", "µM", "mM", "M"]))
def test_dose_unit_column_equals_unit_in_the_string(x, unit):
    assert parse_dose_um(x, unit) == pytest.approx(parse_dose_um(f"{x} {unit}"), rel=1e-12)
    assert parse_dose_um(str(x), unit) == parse_dose_um(x, unit)


@FAST
@given(pos, pos, st.sampled_from(["pM", "nM", "uM", "mM"]))
def test_dose_parsing_is_monotone_and_positive(x, y, unit):
    a, b = parse_dose_um(f"{x} {unit}"), parse_dose_um(f"{y} {unit}")
    assert a > 0 and b > 0
    assert (a < b) == (x < y) and (a == b) == (x == y)


@FAST
@given(pos, st.sampled_from([("nM", "uM"), ("uM", "mM"), ("pM", "nM"), ("uM", "nM")]))
def test_conflicting_units_always_raise(x, units):
    with pytest.raises(MetadataError):
        parse_dose_um(f"{x} {units[0]}", units[1])


@FAST
@given(pos, st.sampled_from(["%", "ug/ml", "mg/kg", "ng", "x"]))
def test_non_molar_units_always_raise(x, unit):
    with pytest.raises(MetadataError, match="unit"):
        parse_dose_um(f"{x} {unit}")


# ----------------------------------------------------------------------------------------------- gene mapping
def _panel() -> pd.DataFrame:
    """The real landmark table when the public files are present; otherwise a synthetic panel of the same shape
    (Entrez-like ids, symbols, versionless Ensembl ids)."""
    if SHARED is not None and (SHARED / "lincs" / "l1000_landmark_genes.csv").is_file():
        from scpert_dist.data.readers.genes import landmark_table

        t = landmark_table(SHARED)
    else:
        n = 200
        t = pd.DataFrame({"gene_id": [str(1000 + 7 * i) for i in range(n)],
                          "gene_symbol": [f"GENE{i}A" for i in range(n)],
                          "ensembl_id": [f"ENSG{100000000 + 13 * i:011d}" for i in range(n)],
                          "gene_symbol_gse92742": [""] * n})
    # rows whose keys are unique, so each input id points at exactly one panel gene
    t = t[(t["ensembl_id"] != "") & ~t["ensembl_id"].duplicated(keep=False)
          & ~t["gene_symbol"].str.upper().duplicated(keep=False)]
    return t.reset_index(drop=True)


PANEL = _panel()
KEYS = {"entrez": "gene_id", "symbol": "gene_symbol", "ensembl": "ensembl_id"}


def _random_case(s: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if f else c for c, f in zip(s, flips + [False] * len(s), strict=False))


@st.composite
def gene_inputs(draw):
    rows = draw(st.lists(st.integers(0, len(PANEL) - 1), min_size=1, max_size=40, unique=True))
    key = draw(st.sampled_from(sorted(KEYS)))
    ids = [str(PANEL.loc[r, KEYS[key]]) for r in rows]
    n_junk = draw(st.integers(0, 5))
    ids += [f"NOTAGENE{i}" for i in range(n_junk)]
    return key, rows, ids


@FAST
@given(gene_inputs(), st.data())
def test_version_suffix_and_case_never_change_the_mapping(inp, data):
    key, rows, ids = inp
    base = map_genes(ids, table=PANEL)
    assert base.entrez[: len(rows)] == [str(PANEL.loc[r, "gene_id"]) for r in rows]
    assert all(e == "" for e in base.entrez[len(rows):])
    changed = []
    for s in ids:
        if s.startswith("ENS") and data.draw(st.booleans()):
            s = f"{s}.{data.draw(st.integers(1, 99))}"
        if key != "entrez":
            s = _random_case(s, data.draw(st.lists(st.booleans(), max_size=len(s))))
        changed.append(s)
    assert map_genes(changed, table=PANEL).entrez == base.entrez


@FAST
@given(gene_inputs(), st.randoms(use_true_random=False))
def test_permuting_inputs_permutes_the_mapping(inp, rnd):
    _, _, ids = inp
    perm = list(range(len(ids)))
    rnd.shuffle(perm)
    base = map_genes(ids, table=PANEL)
    shuffled = map_genes([ids[i] for i in perm], table=PANEL)
    assert shuffled.entrez == [base.entrez[i] for i in perm]
    assert shuffled.by == [base.by[i] for i in perm]
    assert sorted(shuffled.unmapped_panel) == sorted(base.unmapped_panel)


# ------------------------------------------------------------------------------------------------------ metrics
finite = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_infinity=False, width=64)


def _cells(n_min=3, n_max=12, genes=8):
    return st.integers(n_min, n_max).flatmap(lambda n: arrays(np.float64, (n, genes), elements=finite))


def _gauss_cells(n_min=3, n_max=12, genes=8):
    """Cells drawn from a seeded Gaussian with a drawn per-gene mean/scale (no constant rows, little filtering)."""
    def make(args):
        n, seed, spread = args
        rng = np.random.default_rng(seed)
        return rng.normal(rng.normal(0, 3, genes), spread, (n, genes))

    return st.tuples(st.integers(n_min, n_max), st.integers(0, 2**31 - 1), st.floats(0.1, 5)).map(make)


def _nondegenerate(x: np.ndarray) -> bool:
    return np.all(x.std(axis=-1) > 1e-3) if x.ndim == 2 else x.std() > 1e-3


@FAST
@given(arrays(np.float64, 20, elements=finite), arrays(np.float64, 20, elements=finite),
       st.floats(0.01, 100), st.floats(-50, 50))
def test_pearson_affine_invariance_and_sign(a, b, scale, shift):
    assume(_nondegenerate(a) and _nondegenerate(b))
    r = pearson(a, b)
    assert -1 - 1e-9 <= r <= 1 + 1e-9
    assert pearson(a, scale * b + shift) == pytest.approx(r, abs=1e-6)
    assert pearson(a, -scale * b + shift) == pytest.approx(-r, abs=1e-6)
    assert pearson(a, b) == pytest.approx(pearson(b, a), abs=1e-12)


@FAST
@given(_gauss_cells(), st.floats(0.05, 20), st.floats(-5, 5), st.integers(0, 2**31 - 1))
def test_paper_metrics_invariant_to_affine_rescaling_of_prediction(true, scale, shift, seed):
    """mean / DE Pearson and `dis` (per-cell Pearson) are unchanged when the prediction is rescaled a*x+b, a>0;
    the logFC R2 is not scale-free, so it must change for a != 1 (unless degenerate)."""
    assume(_nondegenerate(true))
    rng = np.random.default_rng(seed)
    pred = true[rng.permutation(len(true))] + rng.normal(0, 1, true.shape)
    assume(_nondegenerate(pred) and _nondegenerate(pred.mean(0)) and _nondegenerate(true.mean(0)))
    de50, de10 = np.arange(true.shape[1]), np.arange(4)
    assume(_nondegenerate(true.mean(0)[de10]) and _nondegenerate(pred.mean(0)[de10]))
    m1 = paper_metrics(true, pred, de50, de10, rng=np.random.default_rng(1))
    m2 = paper_metrics(true, scale * pred + shift, de50, de10, rng=np.random.default_rng(1))
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], abs=1e-6), k


@FAST
@given(_gauss_cells(), st.integers(0, 2**31 - 1))
def test_perfect_prediction_scores_perfectly(true, seed):
    assume(_nondegenerate(true) and _nondegenerate(true.mean(0)))
    rng = np.random.default_rng(seed)
    control = true + rng.normal(0, 1, true.shape)
    assume(_nondegenerate(true.mean(0) - control.mean(0)))
    s = sound_metrics(true, true, control, np.arange(true.shape[1]))
    assert s["logfc_pearson"] == pytest.approx(1.0) and s["logfc_r2"] == pytest.approx(1.0)
    assert s["energy_distance"] <= 1e-9  # unbiased (U-statistic): the same cells score -2/n x their mean distance
    assert r2(true.mean(0), true.mean(0)) == pytest.approx(1.0)


@FAST
@given(_cells(), _cells(), st.integers(0, 2**31 - 1))
def test_energy_distance_nonnegative_symmetric_zero_on_identical(x, y, seed):
    """The V-statistic (the reference the unbiased metric is tested against, tests/reference_metrics.py)."""
    energy_distance = energy_distance_v
    d = energy_distance(x, y)
    assert d >= -1e-9
    assert d == pytest.approx(energy_distance(y, x), abs=1e-9)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    # the same set in another order (and duplicated) is still distance 0 (V-statistic)
    perm = np.random.default_rng(seed).permutation(len(x))
    assert energy_distance(x, x[perm]) == pytest.approx(0.0, abs=1e-9)
    assert energy_distance(x, np.concatenate([x, x])) == pytest.approx(0.0, abs=1e-9)
    # shifting a set away increases the distance
    assert energy_distance(x, x + 100.0) > 0


@FAST
@given(_gauss_cells(), st.integers(0, 2**31 - 1))
def test_dis_of_a_set_against_itself_is_one(x, seed):
    assume(_nondegenerate(x))
    n, genes = len(x), np.arange(x.shape[1])
    m = paper_metrics(x, x, genes, genes, n_true=n, n_pred=n, rng=np.random.default_rng(seed))
    assert m["dis"] == pytest.approx(1.0) and m["mean"] == pytest.approx(1.0)
    # dis (paper_metrics' own, the one the benchmark reports) never exceeds 1 against any other set either
    other = x[::-1] * 0.5 + 1.0 + np.random.default_rng(seed).normal(0, 1, x.shape)
    o = paper_metrics(x, other, genes, genes, n_true=n, n_pred=n, rng=np.random.default_rng(seed))
    assert o["dis"] <= 1 + 1e-9 and not math.isnan(m["dis"])
