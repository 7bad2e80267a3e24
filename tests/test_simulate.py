"""Simulator: real metadata carried through, formats the ingestion expects, and a ground truth that is real."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scpert_dist.data.simulate import PRESETS, simulate


@pytest.fixture(scope="module")
def sim_real(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_real")
    summary = simulate(out, preset="tiny", metadata=shared_data, seed=0, progress=False)
    return out, summary, ad.read_h5ad(out / "sciplex" / "sciplex3_sim.h5ad")


def _log_norm(x) -> np.ndarray:
    x = np.asarray(x.todense(), dtype=np.float64)
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4)


def _pseudobulk_lfc(a, mask, vehicle_mask) -> np.ndarray:
    """log mean normalised expression of the selected cells minus that of vehicle cells (independent of the truth)."""
    e = np.asarray(a.X.todense(), dtype=np.float64)
    e = e / e.sum(1, keepdims=True) * 1e4
    return np.log(e[mask].mean(0) + 0.1) - np.log(e[vehicle_mask].mean(0) + 0.1)


@pytest.mark.shared_data
def test_real_metadata_genes_lines_smiles_gctx(sim_real, shared_data):
    out, summary, a = sim_real
    assert "real public metadata" in summary["metadata"] and summary["semi_synthetic"]
    lm = pd.read_csv(shared_data / "lincs/l1000_landmark_genes.csv", dtype={"gene_id": str}).sort_values("position")
    geneinfo = pd.read_csv(out / "bulk/geneinfo.txt", sep="\t", dtype={"pr_gene_id": str})
    assert geneinfo.pr_gene_id.tolist() == lm.gene_id.tolist()
    assert a.var.entrez_id.tolist()[:978] == lm.gene_id.tolist()
    assert a.var.index.tolist()[:978] == lm.ensembl_id.tolist()
    assert a.n_vars == 978 + 200
    assert set(a.obs.cell_type) == {"A549", "MCF7", "K562"}
    # vehicle mean tracks the real basal profile of its line (and better than another line's profile)
    basal = pd.read_parquet(shared_data / "lincs/l1000_transigen_basal_modz_x1_n165x978.parquet").set_index("cell_id")
    for line in ("A549", "MCF7", "K562"):
        m = _log_norm(a.X[((a.obs.cell_type == line) & a.obs.vehicle).to_numpy()][:, :978]).mean(0)
        r = np.corrcoef(m, basal.loc[line, lm.gene_id].to_numpy())[0, 1]
        assert r > 0.5, (line, r)
    # SMILES come from the real design table
    design = pd.read_csv(shared_data / "sciplex/sciplex3_hash_design_SupplTable3.tsv.gz", sep="\t")
    smi = design.dropna(subset=["name"]).drop_duplicates("name").set_index("name").SMILES
    treated = a.obs[~a.obs.vehicle].drop_duplicates("product_name")
    assert len(treated) == 24
    for name, s in zip(treated.product_name, treated.SMILES, strict=True):
        assert smi[name] == s
    assert (a.obs.product_name[a.obs.vehicle] == "Vehicle").all() and (a.obs.dose[a.obs.vehicle] == 0).all()
    assert sorted(a.obs.dose[~a.obs.vehicle].unique()) == [10.0, 100.0, 1000.0, 10000.0]
    # the 9 chemCPA OOD drugs: all on the single-cell side; those LINCS measured also on the bulk side
    ood = pd.read_csv(shared_data / "sciplex/chemcpa_sciplex_split_ood_finetuning_drugs.csv")
    ov = pd.read_csv(shared_data / "sciplex/sciplex3_compounds_with_lincs_overlap.csv")
    ov_ood = ov[ov.chemcpa_name.isin(ood[ood.role == "ood"].chemcpa_drug_name)]
    assert len(ov_ood) == 9 and set(ov_ood.name) <= set(a.obs.product_name)
    np.string_ = np.bytes_
    from cmapPy.pandasGEXpress.parse import parse

    g = parse(str(out / "bulk/lincs_level5.gctx"))
    cols = {"sig_id", "pert_id", "pert_iname", "pert_type", "cell_id", "pert_idose", "pert_itime"}
    assert cols <= set(g.col_metadata_df.columns)
    assert {"pr_gene_id", "pr_gene_symbol", "pr_is_lm"} <= set(g.row_metadata_df.columns)
    assert g.data_df.index.tolist() == lm.gene_id.tolist()
    assert g.data_df.shape[1] == summary["n_bulk_signatures"] and np.abs(g.data_df.to_numpy()).max() <= 10
    cm = g.col_metadata_df
    assert set(cm.pert_type) == {"trt_cp", "ctl_vehicle"}
    measured = ov_ood[ov_ood.in_lincs_by_inchikey14]
    assert len(measured) == 6 and set(measured.name) <= set(cm.pert_iname)
    assert {b.split("|")[0] for b in measured.lincs_brd_ids_by_inchikey14} <= set(cm.pert_id)
    siginfo = pd.read_csv(out / "bulk/siginfo.txt", sep="\t")
    assert siginfo.sig_id.tolist() == g.data_df.columns.tolist()
    assert "SEMI-SYNTHETIC" in (out / "bulk/SEMI_SYNTHETIC.txt").read_text()
    assert a.uns["scpert_simulation"]["semi_synthetic"] and a.X.dtype.kind == "i" and a.uns["semi_synthetic"]
    assert json.loads((out / "SIMULATION.json").read_text())["label"] == "semi-synthetic"


@pytest.mark.shared_data
def test_truth_structure_dose_subpops_counts(sim_real):
    out, _, a = sim_real
    from scpert_dist.data.drugs import morgan_fingerprints, tanimoto

    ce = np.load(out / "truth/compound_effects.npz")
    rng = np.random.default_rng(0)
    idx = rng.choice(len(ce["smiles"]), size=300, replace=False)
    fp = np.asarray(morgan_fingerprints(list(ce["smiles"][idx]))).astype(bool)
    sim = tanimoto(fp, fp)
    corr = np.corrcoef(ce["effect"][idx].astype(np.float64))
    iu = np.triu_indices(len(idx), 1)
    hi, lo = corr[iu][sim[iu] > 0.5], corr[iu][sim[iu] < 0.15]
    assert len(hi) >= 10 and hi.mean() > lo.mean() + 0.2, (len(hi), hi.mean(), lo.mean())

    t = np.load(out / "truth/sciplex_truth.npz", allow_pickle=False)
    norms = np.linalg.norm(t["lfc"], axis=-1)  # drug, line, dose
    assert (np.diff(norms.mean((0, 1))) > 0).all()
    # empirical pseudobulk logFC (from counts) at 10 uM tracks the truth
    rs = []
    for i, d in enumerate(t["drugs"]):
        for j, line in enumerate(t["lines"]):
            veh = (a.obs.cell_type == line) & a.obs.vehicle
            m = (a.obs.product_name == d) & (a.obs.cell_type == line) & (a.obs.dose == 10000.0)
            if np.linalg.norm(t["lfc"][i, j, 3]) > 3:
                rs.append(np.corrcoef(_pseudobulk_lfc(a, m.to_numpy(), veh.to_numpy()), t["lfc"][i, j, 3])[0, 1])
    assert len(rs) >= 10 and np.median(rs) > 0.4, (len(rs), np.median(rs))

    # sub-populations respond differently: slope of each subpop's logFC on the population truth
    slopes = {}
    for sp in ("cycling", "stressed"):
        xs, ys = [], []
        for i, d in enumerate(t["drugs"]):
            for j, line in enumerate(t["lines"]):
                veh = ((a.obs.cell_type == line) & a.obs.vehicle & (a.obs.sim_subpop == sp)).to_numpy()
                m = ((a.obs.product_name == d) & (a.obs.cell_type == line) & (a.obs.dose >= 1000)
                     & (a.obs.sim_subpop == sp)).to_numpy()
                if m.sum() >= 2 and veh.sum() >= 5:
                    xs.append(t["lfc"][i, j, 3])
                    ys.append(_pseudobulk_lfc(a, m, veh))
        x, y = np.concatenate(xs), np.concatenate(ys)
        slopes[sp] = float(x @ y / (x @ x))
    # (measured with the calibrated truth: cycling 0.56, stressed 0.15; large effects flatten the log of the mean)
    assert slopes["cycling"] > 2.5 * slopes["stressed"] and slopes["stressed"] < 0.4, slopes

    # counts are overdispersed: variance > mean for expressed genes within vehicle cells of a line
    v = np.asarray(a.X[((a.obs.cell_type == "A549") & a.obs.vehicle).to_numpy()].todense(), dtype=np.float64)
    keep = v.mean(0) > 2
    assert np.median(v[:, keep].var(0) / v[:, keep].mean(0)) > 1.5


@pytest.mark.shared_data
def test_bulk_signature_tracks_single_cell_response(sim_real):
    out, _, a = sim_real
    np.string_ = np.bytes_
    from cmapPy.pandasGEXpress.parse import parse

    g = parse(str(out / "bulk/lincs_level5.gctx"))
    cm = g.col_metadata_df
    match, mismatch = [], []
    drugs = [d for d in a.obs.product_name[~a.obs.vehicle].unique() if d in set(cm.pert_iname)]
    assert len(drugs) >= 10
    emp = {}
    for d in drugs:
        for line in ("A549", "MCF7", "K562"):
            veh = ((a.obs.cell_type == line) & a.obs.vehicle).to_numpy()
            m = ((a.obs.product_name == d) & (a.obs.cell_type == line) & (a.obs.dose >= 1000)).to_numpy()
            emp[d, line] = _pseudobulk_lfc(a, m, veh)[:978]
    for d in drugs:
        for line in ("A549", "MCF7", "K562"):
            sel = (cm.pert_iname == d) & (cm.cell_id == line)
            if not sel.any():
                continue
            z = g.data_df.loc[:, sel.to_numpy()].to_numpy().mean(1)
            match.append(np.corrcoef(z, emp[d, line])[0, 1])
            other = drugs[(drugs.index(d) + 1) % len(drugs)]
            mismatch.append(np.corrcoef(z, emp[other, line])[0, 1])
    assert len(match) >= 20
    assert np.mean(match) > np.mean(mismatch) + 0.1 and np.mean(match) > 0.15, (np.mean(match), np.mean(mismatch))


def test_determinism_and_presets(tmp_path):
    assert {"tiny", "default", "large", "bench", "calib"} <= set(PRESETS)
    assert PRESETS["tiny"].n_bulk < PRESETS["default"].n_bulk < PRESETS["large"].n_bulk
    assert PRESETS["bench"].cells_per_condition >= 100 and PRESETS["bench"].noise == "calibrated"
    assert all(p.truth == "calibrated" for p in PRESETS.values())
    s1 = simulate(tmp_path / "a", preset="tiny", seed=3, extra_genes=10, progress=False)
    s2 = simulate(tmp_path / "b", preset="tiny", seed=3, extra_genes=10, progress=False)
    simulate(tmp_path / "c", preset="tiny", seed=4, extra_genes=10, progress=False)
    assert s1["metadata"].startswith("synthetic metadata") and s1["n_genes_sc"] == 978 + 10
    a1, a2, a3 = (ad.read_h5ad(tmp_path / k / "sciplex/sciplex3_sim.h5ad") for k in "abc")
    assert (a1.X != a2.X).nnz == 0 and a1.obs.equals(a2.obs)
    assert a1.X.shape != a3.X.shape or (a1.X != a3.X).nnz > 0
    t1, t2 = (np.load(tmp_path / k / "truth/sciplex_truth.npz")["lfc"] for k in "ab")
    assert np.array_equal(t1, t2)
    assert (tmp_path / "a/bulk/siginfo.txt").read_bytes() == (tmp_path / "b/bulk/siginfo.txt").read_bytes()
    assert s1["n_cells"] == s2["n_cells"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-c", "from scpert_dist.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_writes_files_with_synthetic_metadata(tmp_path, monkeypatch):
    import os

    env = {k: v for k, v in os.environ.items() if k != "SCPERT_METADATA"}
    out = tmp_path / "sim"
    r = _cli("data", "simulate", "--out", str(out), "--preset", "tiny", "--seed", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert "synthetic metadata" in r.stdout
    s = json.loads((out / "SIMULATION.json").read_text())
    for f in s["files"]:
        assert (out / f).is_file(), f
    assert s["metadata"].startswith("synthetic metadata") and s["semi_synthetic"]
    a = ad.read_h5ad(out / "sciplex/sciplex3_sim.h5ad")
    assert a.obs.cell_type.str.startswith("SYN-").all()
    assert not list(out.rglob(".tmp-*"))
    # bad input: named error, exit 2, no output folder content
    bad = tmp_path / "bad"
    r = _cli("data", "simulate", "--out", str(bad), "--preset", "huge", env=env)
    assert r.returncode == 2 and "ConfigError" in r.stderr and "preset" in r.stderr
    assert not (bad / "SIMULATION.json").exists()
    r = _cli("data", "simulate", "--out", str(bad), "--preset", "tiny", "--truth", "linear", env=env)
    assert r.returncode == 2 and "ConfigError" in r.stderr and "truth" in r.stderr
    assert not (bad / "SIMULATION.json").exists()
    r = _cli("data", "simulate", "--out", str(bad), "--metadata", str(tmp_path / "nope"), env=env)
    assert r.returncode == 2 and "metadata" in r.stderr
    assert not (bad / "SIMULATION.json").exists()
