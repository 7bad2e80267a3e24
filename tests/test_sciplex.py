"""sci-Plex3 reader + `scpert data sciplex` on realistic h5ad built from the real design table and landmark ids."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpert_dist.data.readers.sciplex import detect_normalization, read_sciplex
from scpert_dist.errors import MetadataError

pytestmark = pytest.mark.shared_data


def design_obs(shared: Path, n: int, seed: int = 0) -> pd.DataFrame:
    d = pd.read_csv(shared / "sciplex/sciplex3_hash_design_SupplTable3.tsv.gz", sep="\t")
    rng = np.random.default_rng(seed)
    treated = d[d["vehicle"] == False]  # noqa: E712
    drugs = rng.choice(treated["name"].unique(), size=12, replace=False)
    ood = ["Dacinostat (LAQ824)", "Givinostat (ITF2357)", "Hesperadin"]
    sub = treated[treated["name"].isin(list(drugs) + ood)]
    veh = d[d["vehicle"] == True]  # noqa: E712
    rows = pd.concat([sub.sample(n - n // 10, replace=True, random_state=seed),
                      veh.sample(n // 10, replace=True, random_state=seed)])
    obs = pd.DataFrame({
        "product_name": np.where(rows["vehicle"], "Vehicle", rows["name"].astype(str)),
        "dose": rows["dose"].astype(float).to_numpy(),  # nM
        "cell_type": rows["cell_type"].to_numpy(),
        "vehicle": rows["vehicle"].astype(bool).to_numpy(),
        "SMILES": np.where(rows["vehicle"], "", rows["SMILES"].astype(str)),
        "replicate": rows["replicate"].to_numpy(),
    })
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return obs


def make_h5ad(shared: Path, path: Path, *, n: int = 300, n_lm: int = 120, n_other: int = 30, seed: int = 0,
              versions: bool = False, style: str = "sciplex", normalized: bool = False) -> ad.AnnData:
    lm = pd.read_csv(shared / "lincs/l1000_landmark_genes.csv", dtype=str)
    rng = np.random.default_rng(seed)
    pick = lm.sample(n_lm, random_state=seed)
    ens = pick["ensembl_id"].tolist() + [f"ENSG9{i:010d}" for i in range(n_other)]
    if versions:
        ens = [f"{e}.{i % 7 + 1}" for i, e in enumerate(ens)]
    var = pd.DataFrame({"gene_short_name": pick["gene_symbol"].tolist() + [f"FAKE{i}" for i in range(n_other)],
                        "entrez_id": pick["gene_id"].tolist() + [""] * n_other}, index=ens)
    obs = design_obs(shared, n, seed)
    mu = rng.gamma(2.0, 2.0, size=len(var)) * rng.lognormal(0, 0.5, size=(len(obs), 1))
    counts = rng.negative_binomial(2, 2 / (2 + mu)).astype(np.float32)
    X = sp.csr_matrix(counts)
    if normalized:
        lib = counts.sum(1, keepdims=True)
        X = sp.csr_matrix(np.log1p(counts / np.maximum(lib, 1) * 1e4).astype(np.float32))
    if style == "scperturb":
        obs = obs.rename(columns={"product_name": "perturbation", "dose": "dose_value", "cell_type": "cell_line",
                                  "SMILES": "smiles"}).drop(columns=["vehicle"])
        obs["perturbation"] = obs["perturbation"].replace({"Vehicle": "control"})
        obs["dose_value"] = obs["dose_value"] / 1000.0
        obs["dose_unit"] = "uM"
    a = ad.AnnData(X=X, obs=obs, var=var)
    a.write_h5ad(path)
    return a


def test_raw_counts_normalised_once_and_rereading_is_stable(shared_data, tmp_path, caplog):
    src = tmp_path / "raw.h5ad"
    a = make_h5ad(shared_data, src, versions=True)
    caplog.set_level("INFO")
    out = read_sciplex(src, metadata=shared_data)
    u = out.uns["scpert"]
    assert u["input_state"] == "raw_counts" and u["normalization_applied"]
    assert "raw counts" in caplog.text
    # hand computation (numpy, not scanpy)
    c = a.X.toarray().astype(np.float64)
    expect = np.log1p(c / c.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(out.X.toarray() if sp.issparse(out.X) else out.X, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.layers["counts"].toarray(), c)
    # genes: 120 landmark Ensembl ids with version suffixes -> 120 Entrez; 30 unmapped stay
    assert u["gene_mapping"]["n_mapped"] == 120 and u["gene_mapping"]["panel_size"] == 978
    assert out.var["is_landmark"].sum() == 120
    lm = pd.read_csv(shared_data / "lincs/l1000_landmark_genes.csv", dtype=str)
    assert set(out.var_names[out.var["is_landmark"]]) <= set(lm["gene_id"])
    # obs contract
    ctrl = out.obs["is_control"].to_numpy()
    assert ctrl.sum() == 30 and (out.obs["drug"][ctrl] == "control").all()
    assert (out.obs["dose_um"][ctrl] == 0).all() and (out.obs["smiles"][ctrl] == "").all()
    np.testing.assert_allclose(out.obs["dose_um"][~ctrl].to_numpy(), a.obs["dose"][~ctrl].to_numpy() / 1000)
    # write, re-read: not normalised again
    p2 = tmp_path / "ours.h5ad"
    out.write_h5ad(p2)
    again = read_sciplex(p2, metadata=shared_data)
    assert again.uns["scpert"]["input_state"] == "ours" and not again.uns["scpert"]["normalization_applied"]
    np.testing.assert_allclose(np.asarray(again.X.todense() if sp.issparse(again.X) else again.X),
                               np.asarray(out.X.todense() if sp.issparse(out.X) else out.X))
    assert list(again.var_names) == list(out.var_names)
    np.testing.assert_array_equal(again.obs["dose_um"], out.obs["dose_um"])


def test_scperturb_names_uM_and_already_normalised(shared_data, tmp_path):
    src = tmp_path / "scp.h5ad"
    a = make_h5ad(shared_data, src, style="scperturb", normalized=True)
    out = read_sciplex(src, metadata=shared_data)
    assert out.uns["scpert"]["input_state"] == "log_normalized"
    assert not out.uns["scpert"]["normalization_applied"] and "counts" not in out.layers
    np.testing.assert_allclose(out.X.toarray(), a.X.toarray())
    ctrl = out.obs["is_control"].to_numpy()
    assert ctrl.sum() == 30
    np.testing.assert_allclose(out.obs["dose_um"][~ctrl], a.obs["dose_value"][~ctrl])  # already uM
    assert out.uns["scpert"]["columns"]["drug"] == "perturbation"


def test_detect_normalization_evidence():
    rng = np.random.default_rng(1)
    c = rng.poisson(3, size=(50, 40)).astype(np.float32)
    assert detect_normalization(sp.csr_matrix(c))["state"] == "raw_counts"
    ln = np.log1p(c / c.sum(1, keepdims=True) * 1e4)
    ev = detect_normalization(ln)
    assert ev["state"] == "log_normalized" and abs(ev["expm1_row_sum_median"] - 1e4) < 1


def test_landmarks_only_and_hvg(shared_data, tmp_path):
    src = tmp_path / "raw.h5ad"
    make_h5ad(shared_data, src)
    lo = read_sciplex(src, metadata=shared_data, landmarks_only=True)
    assert lo.n_vars == 120 and lo.var["is_landmark"].all()
    hv = read_sciplex(src, metadata=shared_data, hvg=10)
    assert hv.n_vars == 130 and hv.var["is_landmark"].sum() == 120


def test_missing_columns_lists_what_exists(shared_data, tmp_path):
    src = tmp_path / "bad.h5ad"
    a = make_h5ad(shared_data, src)
    a.obs = a.obs.drop(columns=["dose"])
    a.write_h5ad(src)
    with pytest.raises(MetadataError) as e:
        read_sciplex(src, metadata=shared_data)
    msg = str(e.value)
    assert "dose" in msg and "--dose-col" in msg and "product_name" in msg and str(src) in msg


def _cli(*args) -> subprocess.CompletedProcess:
    """The real `scpert` entry point (scpert_dist.cli.main), in-process to save interpreter start-up."""
    import contextlib
    import io

    from scpert_dist.cli import main

    out, err, rc = io.StringIO(), io.StringIO(), 0
    old = sys.argv
    sys.argv = ["scpert", "data", "sciplex", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        rc = e.code
    finally:
        sys.argv = old
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def test_cli_end_to_end_and_bad_inputs(shared_data, tmp_path):
    src = tmp_path / "raw.h5ad"
    a = make_h5ad(shared_data, src)
    out = tmp_path / "out.h5ad"
    r = _cli("--h5ad", src, "--out", out, "--metadata", shared_data, "--split", "kfold", "--folds", "3")
    assert r.returncode == 0, r.stderr
    res = ad.read_h5ad(out)
    assert [c for c in res.obs if c.startswith("split_")] == [f"split_kfold3_{i}" for i in range(3)]
    assert "120/978" in r.stdout
    out2 = tmp_path / "ood.h5ad"
    assert _cli("--h5ad", src, "--out", out2, "--metadata", shared_data).returncode == 0  # default chemcpa_ood
    res = ad.read_h5ad(out2)
    test = set(res.obs.loc[res.obs["split_chemcpa_ood"] == "test", "drug"])
    assert test == {"Dacinostat (LAQ824)", "Givinostat (ITF2357)", "Hesperadin"}  # the chemCPA OOD drugs in the fixture
    assert list(res.uns["scpert"]["splits"]["test_drugs"]) == sorted(test)

    def bad(path: Path, *extra) -> subprocess.CompletedProcess:
        o = tmp_path / f"o_{path.stem}.h5ad"
        r = _cli("--h5ad", path, "--out", o, "--metadata", shared_data, *extra)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert not o.exists() and not list(tmp_path.glob(f".o_{path.stem}*"))
        return r

    # no drug/dose/cell columns
    p = tmp_path / "nocols.h5ad"
    ad.AnnData(X=a.X, obs=a.obs[["replicate"]], var=a.var).write_h5ad(p)
    r = bad(p)
    assert "MetadataError" in r.stderr and "--drug-col" in r.stderr
    # invalid SMILES
    p = tmp_path / "badsmi.h5ad"
    b = a.copy()
    b.obs["SMILES"] = b.obs["SMILES"].astype(str)
    drug = b.obs.loc[~b.obs["vehicle"], "product_name"].iloc[0]
    b.obs.loc[b.obs["product_name"] == drug, "SMILES"] = "C1CC(("
    b.write_h5ad(p)
    r = bad(p)
    assert "SmilesError" in r.stderr and drug in r.stderr
    # genes that do not map
    p = tmp_path / "nogenes.h5ad"
    ad.AnnData(X=a.X, obs=a.obs, var=pd.DataFrame(index=[f"XYZ{i}" for i in range(a.n_vars)])).write_h5ad(p)
    assert "GeneMappingError" in bad(p).stderr
    # empty split: too many folds
    assert "SplitError" in bad(src, "--split", "kfold", "--folds", "999").stderr
    # unwritable output
    r = _cli("--h5ad", src, "--out", tmp_path / "no" / "such" / "dir" / "o.h5ad", "--metadata", shared_data)
    assert r.returncode == 2 and "OutputError" in r.stderr


REAL_H5AD = "sciplex/real/sciplex3_chemcpa_format_n2247x2000_SHUFFLED_LABELS.h5ad"


def test_real_chemcpa_h5ad_layout_shapes_and_panel(shared_data):
    """The real chemCPA-layout file (only the cell line label is true): layout detected, 2,247 cells x 2,000
    genes, 749 per line, doses read as nM, almost the whole landmark panel present by symbol."""
    from scpert_dist.data.readers.sciplex import detect_layout, panel_coverage

    src = shared_data / REAL_H5AD
    if not src.is_file():
        pytest.skip("real sci-Plex3 h5ad absent")
    assert detect_layout(ad.read_h5ad(src, backed="r").obs) == "chemcpa"
    a = read_sciplex(src, metadata=shared_data)
    assert a.shape == (2247, 2000)
    assert a.obs["cell_line"].value_counts().to_dict() == {"A549": 749, "K562": 749, "MCF7": 749}
    assert a.uns["scpert"]["input_state"] == "log_normalized" and not a.uns["scpert"]["normalization_applied"]
    # nM -> uM (labels are shuffled across rows, so some non-control rows carry a control's dose 0)
    assert set(np.round(a.obs["dose_um"], 3)) == {0.0, 0.01, 0.1, 1.0, 10.0}
    cov = panel_coverage(a)
    assert cov["panel_size"] == 978 and 950 <= cov["present"] <= 978 and len(cov["missing"]) == 978 - cov["present"]


def test_real_vs_simulated_cell_stats(shared_data, tmp_path):
    """Real per-line statistics next to the simulator's on the shared panel genes: a real sparse 3'-tag library
    (most values zero) and a super-Poisson mean-variance slope in both sources."""
    from scpert_dist.data.readers.sciplex import cell_stats, compare_cell_stats
    from scpert_dist.data.simulate import simulate

    src = shared_data / REAL_H5AD
    if not src.is_file():
        pytest.skip("real sci-Plex3 h5ad absent")
    simulate(tmp_path / "sim", preset="tiny", metadata=shared_data, seed=0, progress=False)
    t = compare_cell_stats(src, tmp_path / "sim/sciplex/sciplex3_sim.h5ad", shared_data)
    assert set(t["source"]) == {"real", "simulated"} and t["n_genes"].nunique() == 1
    real = t[t["source"] == "real"].set_index("cell_line")
    assert list(real["cells"]) == [749, 749, 749]
    assert (real["zero_fraction"] > 0.7).all() and (real["mv_slope"] > 1.2).all()
    assert (t["lib_median"] > 0).all()
    with pytest.raises(MetadataError):
        cell_stats(read_sciplex(src, metadata=shared_data), ["NOT_A_GENE"])
    # the command prints the layout, the panel coverage and the same table
    import contextlib
    import io

    from scpert_dist.cli import main

    buf, old, rc = io.StringIO(), sys.argv, 0
    sys.argv = ["scpert", "evaluate", "cellstats", "--real", str(src), "--sim",
                str(tmp_path / "sim/sciplex/sciplex3_sim.h5ad"), "--metadata", str(shared_data),
                "--out", str(tmp_path / "stats.csv")]
    try:
        with contextlib.redirect_stdout(buf):
            main()
    except SystemExit as e:
        rc = e.code
    finally:
        sys.argv = old
    assert rc in (0, None) and "layout chemcpa" in buf.getvalue()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "stats.csv"), t, check_dtype=False)
