"""Gene mapping onto the real LINCS landmark table (and onto a manifest panel)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from scpert_dist.data.readers.genes import landmark_table, map_genes, strip_version
from scpert_dist.errors import GeneMappingError


@pytest.fixture(scope="module")
def lm(shared_data):
    return pd.read_csv(shared_data / "lincs/l1000_landmark_genes.csv", dtype=str)


def test_strip_version():
    assert strip_version("ENSG00000113552.15") == "ENSG00000113552"
    assert strip_version("ENSG00000113552") == "ENSG00000113552"
    assert strip_version("HLA-A.1") == "HLA-A.1"  # not Ensembl: untouched


@pytest.mark.shared_data
def test_ensembl_with_versions_and_report(shared_data, lm):
    table = landmark_table(shared_data)
    sub = lm[lm["ensembl_id"].notna()].iloc[:200]
    ids = [f"{e}.{i % 9 + 1}" for i, e in enumerate(sub["ensembl_id"])] + ["ENSG99999999999", "NOTAGENE"]
    m = map_genes(ids, table=table)
    assert m.entrez[:200] == sub["gene_id"].tolist() and m.entrez[200:] == ["", ""]
    assert m.n_mapped == 200 and m.counts_by_key() == {"ensembl": 200}
    assert len(m.unmapped_panel) == 978 - 200
    assert "200 / 978" in m.report()


@pytest.mark.shared_data
def test_symbol_mapping_via_gse92742_symbol_and_case(shared_data, lm):
    table = landmark_table(shared_data)
    diff = lm[lm["gene_symbol"].str.upper() != lm["gene_symbol_gse92742"].str.upper()]
    assert len(diff) > 0, "the real table has renamed symbols"
    old = diff["gene_symbol_gse92742"].str.lower().tolist()  # old names, lower case
    m = map_genes(old, table=table)
    assert m.entrez == diff["gene_id"].tolist()
    assert set(m.by) == {"symbol_gse92742"}
    # current symbols via a symbols column, ids unmappable
    cur = lm["gene_symbol"].iloc[:50].tolist()
    m2 = map_genes([f"X{i}" for i in range(50)], symbols=cur, table=table)
    assert m2.entrez == lm["gene_id"].iloc[:50].tolist()


@pytest.mark.shared_data
def test_entrez_column_and_one_gene_per_panel_entry(shared_data, lm):
    table = landmark_table(shared_data)
    ent = lm["gene_id"].iloc[:10].tolist()
    m = map_genes(["a"] * 10 + ["b"], entrez=[f"{e}.0" for e in ent] + [ent[0]], table=table)
    assert m.entrez[:10] == ent and m.entrez[10] == ""  # a panel gene is taken once
    assert m.counts_by_key() == {"entrez": 10}


def test_manifest_panel_and_no_mapping(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"genes": ["1", "2", "3"], "gene_symbols": ["A1BG", "NAT2", "X"]}))
    table = landmark_table(None, tmp_path)
    m = map_genes(["nat2", "ZZZ"], table=table)
    assert m.entrez == ["2", ""] and m.n_mapped == 1 and m.panel_size == 3
    with pytest.raises(GeneMappingError) as e:
        map_genes(["Q1", "Q2"], table=table, path="x.h5ad")
    assert "x.h5ad" in str(e.value) and "none of 2 genes" in str(e.value)
    with pytest.raises(GeneMappingError):
        landmark_table(None, None)
