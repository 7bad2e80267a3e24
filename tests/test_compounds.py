"""Compound matching on the real sci-Plex3 design table vs the real LINCS compound tables; feature cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scpert_dist.data.drugs import morgan_fingerprints
from scpert_dist.data.readers.compounds import (
    drug_features,
    lincs_compounds,
    match_compounds,
    name_keys,
    sciplex_compounds,
)


def test_name_keys():
    assert name_keys("Tozasertib (VX-680, MK-0457)") == ["tozasertibvx680mk0457", "tozasertib", "vx680", "mk0457"]
    assert "sns314" in name_keys("SNS-314 Mesylate")


def test_match_on_small_tables_salt_and_name():
    sci = pd.DataFrame({"name": ["Imatinib Mesylate", "Foo (BAR-1)", "Nothing"],
                        "SMILES": ["Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1.CS(=O)(=O)O",
                                   "CCO", "c1ccccc1O"]})
    lin = pd.DataFrame({"pert_id": ["BRD-1", "BRD-2", "BRD-3"], "pert_iname": ["imatinib", "bar-1", "x"],
                        "smiles": ["Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1", "not a smiles", "CCC"]})
    r = match_compounds(sci, lin, progress=False)
    assert r["lincs_by_inchikey"].tolist() == ["BRD-1", "", ""]  # salt stripped; bad LINCS SMILES skipped
    assert r["lincs_by_name"].tolist() == ["BRD-1", "BRD-2", ""]
    assert r["matched_any"].tolist() == [True, True, False]


@pytest.mark.slow
@pytest.mark.shared_data
def test_match_real_tables(shared_data):
    """SOURCES.md: by InChIKey block 126 of 188, by name 94. We get 126 by InChIKey; by name we get more (113),
    because name_keys also tries the aliases in parentheses (e.g. 'Fedratinib (SAR302503, TG101348)') and drops
    salt words ('Sorafenib Tosylate'). The extra name matches are real: almost all are confirmed by InChIKey."""
    sci = sciplex_compounds(shared_data)
    assert len(sci) == 188
    r = match_compounds(sci, lincs_compounds(shared_data), progress=False)
    n_ik, n_name = int(r["matched_inchikey"].sum()), int(r["matched_name"].sum())
    assert n_ik == 126
    assert 94 <= n_name <= 120
    ref = pd.read_csv(shared_data / "sciplex/sciplex3_compounds_with_lincs_overlap.csv")
    theirs = set(ref.loc[ref["lincs_match_name"].notna(), "name"])
    assert theirs <= set(r.loc[r["matched_name"], "name"])
    extra = r[r["matched_name"] & ~r["name"].isin(theirs)]
    assert extra["matched_inchikey"].mean() >= 0.85  # the extra name matches are the same molecules


def test_drug_features_cache(tmp_path):
    smi = ["CCO", "c1ccccc1O", "CCO"]
    a = drug_features(smi, "morgan", cache_dir=tmp_path, n_bits=256)
    np.testing.assert_array_equal(a, morgan_fingerprints(smi, n_bits=256))
    assert len(list(tmp_path.glob("morgan-*.npy"))) == 2
    b = drug_features(smi, "morgan", cache_dir=tmp_path, n_bits=256)
    np.testing.assert_array_equal(a, b)
    d = drug_features(smi[:2], "descriptors", cache_dir=tmp_path)
    assert d.shape[0] == 2 and d.dtype == np.float32 and len(list(tmp_path.glob("descriptors-*.npy"))) == 2
