"""The notebook API: the README's example block runs as written on a chemCPA-layout sci-Plex3 AnnData, and
what it returns is what the docs say."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from ft_fixture import make_adata

from scpert_dist import ScPert
from scpert_dist.errors import MetadataError

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_block() -> str:
    text = README.read_text()
    m = re.search(r"<!-- notebook-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its notebook-example block"
    return m.group(1)


def _chemcpa_layout(a: ad.AnnData) -> ad.AnnData:
    """The fixture's cells in chemCPA's published layout: product_name, dose in nM, cell_type, SMILES, control."""
    o = a.obs
    b = a.copy()
    b.obs = b.obs.drop(columns=list(o.columns))
    b.obs["product_name"] = np.where(o["is_control"], "Vehicle", o["drug"].astype(str))
    b.obs["dose"] = o["dose_um"].to_numpy() * 1000.0
    b.obs["cell_type"] = o["cell_line"].astype(str).to_numpy()
    b.obs["SMILES"] = o["smiles"].astype(str).to_numpy()
    b.obs["control"] = o["is_control"].astype(int).to_numpy()
    b.obs["split_ood"] = o["split_test"].astype(str).to_numpy()
    return b


def test_readme_notebook_example_runs_as_written(tmp_path, monkeypatch):
    a, names = make_adata(n_drugs=6, cells_per=6, n_genes=24)
    _chemcpa_layout(a).write_h5ad(tmp_path / "sciplex3.h5ad")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_readme_block(), str(README), "exec"), ns)  # noqa: S102 - our own documentation
    pred, again, adata = ns["pred"], ns["again"], ns["adata"]
    n_ctl = int((adata.obs["is_control"] & (adata.obs["cell_line"] == "A549")).sum())
    assert pred.n_obs > 0 and pred.n_vars == a.n_vars and list(pred.var_names) == list(a.var_names)
    assert (pred.obs["smiles"] == "CC(=O)Nc1ccc(O)cc1").all() and (pred.obs["dose_um"] == 1.0).all()
    assert pred.X.std(0).mean() > 0  # per-cell heterogeneity, not one mean profile
    # doses became uM, vehicle rows controls; the saved model predicts from its own control cells
    assert adata.obs.loc[~adata.obs["is_control"], "dose_um"].isin([0.1, 1.0, 10.0]).all()
    assert (tmp_path / "my_model" / "controls.h5ad").is_file()
    p2 = again.predict(drug=names[-1], cell_line="MCF7", dose=10.0, n_cells=12)
    assert p2.shape == (12, a.n_vars) and (p2.obs["drug"] == names[-1]).all()
    assert p2.obs["smiles"].iloc[0] and p2.obs["smiles"].iloc[0] != names[-1]
    assert n_ctl > 0


def test_setup_anndata_names_a_missing_column_and_a_bad_unit():
    a, _ = make_adata(n_drugs=4, cells_per=4, n_genes=12)
    b = _chemcpa_layout(a)
    with pytest.raises(MetadataError, match="product"):
        ScPert.setup_anndata(b, drug_key="product", dose_key="dose", cell_line_key="cell_type")
    with pytest.raises(MetadataError, match="dose unit"):
        ScPert.setup_anndata(b, drug_key="product_name", dose_key="dose", cell_line_key="cell_type", dose_unit="ug")
    assert "drug" not in b.obs  # nothing half-written
