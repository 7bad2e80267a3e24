"""The simulator against the real files: `scpert data calibrate` on the real sci-Plex3 cells, the real sci-Plex3
pseudobulk and a real L1000 plate, with every simulated statistic within its stated tolerance (bar the gaps
docs/calibration.md names); and a hidden truth that does not hand ridge on Morgan bits the answer."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from scpert_dist.data.simulate import calibrate as C

KNOWN_GAPS = {"r within HSP90", "K562 mv_slope"}
"""statistics the calib preset misses at seed 0 (docs/calibration.md says why)."""


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "SCPERT_METADATA"}
    return subprocess.run([sys.executable, "-c", "from scpert_dist.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _pairs(resp: C.Responses, drugs) -> np.ndarray:
    r = np.corrcoef(resp.lfc)
    k = resp.keys
    return np.array([r[i, j] for i in range(len(k)) for j in range(i + 1, len(k))
                     if k.drug[i] in drugs and k.drug[j] in drugs and k.drug[i] != k.drug[j]
                     and k.cell_line[i] == k.cell_line[j]])


@pytest.mark.shared_data
def test_real_side_matches_the_staged_biology(shared_data):
    """The real statistics the simulator is calibrated to: the staging notes' within-mechanism correlation ranges
    (all 2,000 genes, same line), lower between mechanisms; signature similarity rising with Tanimoto on the real
    A375 plate."""
    real = C.real_responses(shared_data)
    assert real.lfc.shape == (27, 2000)
    for mech, (lo, hi) in {"HDAC": (0.71, 0.98), "HSP90": (0.87, 0.96), "Aurora": (0.65, 0.78)}.items():
        r = _pairs(real, C.MECHANISMS[mech])
        assert lo - 0.01 <= r.min() and r.max() <= hi + 0.01, (mech, r.round(2))
    st = C.response_stats(real)
    assert st["r between mechanisms"] < min(st[f"r within {m}"] for m in C.MECHANISMS) - 0.3
    curve = C.real_curve(shared_data)
    bins = curve[curve["bin"] != "rms z"].set_index("bin")
    assert bins["pairs"].iloc[0] > 50000 and bins["pairs"].iloc[-1] >= 30
    assert bins["r"].iloc[-1] > bins["r"].iloc[0] + 0.04


@pytest.mark.slow
@pytest.mark.shared_data
def test_calibrate_command_within_tolerance(shared_data, tmp_path):
    out = tmp_path / "cal"
    r = _cli("data", "calibrate", "--metadata", str(shared_data), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "statistics within tolerance" in r.stdout and "r within HDAC" in r.stdout
    t = pd.read_csv(out / "calibration.csv")
    assert set(t.section) == {"cells", "responses", "bulk", "scPerturb"} and len(t) >= 40
    old = t[t.section != "scPerturb"]
    missed = {s for s, ok in zip(old.statistic, old.within, strict=True) if not ok}
    assert missed <= KNOWN_GAPS, old[~old.within]
    # scPerturb's 188-compound rows: computed on both sides; docs/calibration.md says where and by how much they miss
    scp = t[t.section == "scPerturb"].set_index("statistic")
    assert len(scp) == 12 and scp[["real", "simulated"]].notna().all().all()
    effect = scp.loc["share of compounds with an effect (E to control > 3 x noise level)"]
    assert effect.real == 1.0 and effect.simulated < 0.8  # the gap docs/calibration.md explains
    assert (out / "sim_scperturb" / "sciplex" / "sciplex3_sim.h5ad").is_file()
    # the tolerance column says what `within` checked; recheck a few by hand
    row = t.set_index("statistic")
    for line in ("A549", "K562", "MCF7"):
        assert abs(row.loc[f"{line} zero_fraction", "simulated"] - row.loc[f"{line} zero_fraction", "real"]) <= 0.03
    assert abs(row.loc["r within HDAC", "simulated"] - row.loc["r within HDAC", "real"]) <= 0.2
    assert row.loc["r within HDAC", "simulated"] > row.loc["r between mechanisms", "simulated"] + 0.2
    assert (out / "calibration.png").stat().st_size > 50_000
    assert (out / "sim" / "truth" / "sciplex_truth.npz").is_file()
    assert not list(out.rglob(".tmp-*"))


def test_calibrate_without_real_files_is_a_named_error(tmp_path):
    empty = tmp_path / "meta"
    empty.mkdir()
    out = tmp_path / "out"
    r = _cli("data", "calibrate", "--metadata", str(empty), "--out", str(out))
    assert r.returncode == 2 and "InputFileError" in r.stderr and "sciplex3_chemcpa_format" in r.stderr
    assert not out.exists()


@pytest.mark.shared_data
def test_calibrate_bad_preset_or_sim_folder_is_a_named_error(shared_data, tmp_path):
    out = tmp_path / "out"
    r = _cli("data", "calibrate", "--metadata", str(shared_data), "--out", str(out), "--preset", "huge")
    assert r.returncode == 2 and "ConfigError" in r.stderr and "preset" in r.stderr
    r = _cli("data", "calibrate", "--metadata", str(shared_data), "--out", str(out), "--sim", str(tmp_path / "nope"))
    assert r.returncode == 2 and "InputFileError" in r.stderr and "--sim" in r.stderr
    assert not out.exists()


def test_truth_is_not_the_morgan_bits():
    """Cross-validated ridge on Morgan bits (radius 2, 1024) explains the legacy truth's effects (a linear map of
    those bits) and clearly less of the calibrated truth's, on the same compounds (synthetic metadata: real NCI
    molecules). Measured: legacy 0.47, calibrated 0.03 (400 compounds); with the real metadata (600 LINCS + 188
    sci-Plex3 compounds) 0.29 vs 0.06."""
    r2 = C.truth_r2(None, n_compounds=400)
    assert r2["legacy"] > 0.3, r2
    assert r2["calibrated"] < 0.15 and r2["legacy"] - r2["calibrated"] > 0.25, r2


def test_analogs_share_a_mechanism_and_real_targets_fix_it():
    from scpert_dist.data.drugs import tanimoto
    from scpert_dist.data.simulate.metadata import load_metadata
    from scpert_dist.data.simulate.truth import CalibratedTruth, atom_pair_fingerprints, share_probability

    meta = load_metadata(None)
    smiles = list(meta.bulk_design.smiles.unique()[:300])
    targets = {smiles[0]: "HDAC", smiles[1]: "HDAC", smiles[2]: "HSP (e.g. HSP90)"}
    tr = CalibratedTruth(list(meta.basal.index), 0, smiles, 50, targets=targets)
    assert tr.mech_names[tr.cls[0]] == "HDAC" == tr.mech_names[tr.cls[1]] and tr.antiprolif[tr.cls[0]]
    assert tr.mech_names[tr.cls[2]] == "HSP (e.g. HSP90)"
    s = tanimoto(*(2 * [atom_pair_fingerprints(smiles)]))
    iu = np.triu_indices(len(smiles), 1)
    same = (tr.cls[:, None] == tr.cls[None])[iu]
    hi, lo = s[iu] > 0.6, s[iu] < 0.4
    # measured: 0.56 of the 81 pairs above 0.6 share a mechanism, 0.009 of those below 0.4
    assert hi.sum() >= 30 and same[hi].mean() > 0.4 > 0.05 > same[lo].mean(), (same[hi].mean(), same[lo].mean())
    assert share_probability(0.9) > 0.85 > 0.05 > share_probability(0.3)
    # the line-independent effect and the per-line response carry the mechanism: same-mechanism pairs correlate
    full = tr.full_response(np.arange(len(smiles)), np.zeros(len(smiles), int))
    r = np.corrcoef(full)[iu]
    active = (~tr.inactive[:, None] & ~tr.inactive[None])[iu]
    assert r[same & active].mean() > r[~same & active].mean() + 0.3


def test_edistance_closed_form_is_scperturbs_definition():
    """edistances' closed form equals scPerturb's definition computed from all pairwise squared distances
    (2 mean d(x, y) - mean over distinct pairs d(x, x') - the same for y), on unequal groups."""
    from scipy.spatial.distance import cdist

    from scpert_dist.data.simulate.scperturb import edistances

    rng = np.random.default_rng(3)
    sizes = {"a": 7, "b": 12, "c": 30}
    Z = np.vstack([rng.normal(k, 1 + k / 3, size=(n, 5)) for k, n in enumerate(sizes.values())])
    groups = np.repeat(list(sizes), list(sizes.values()))
    names, e = edistances(Z, groups)

    def ref(x, y):
        within = [cdist(v, v, "sqeuclidean").sum() / (len(v) * (len(v) - 1)) for v in (x, y)]
        return 2 * cdist(x, y, "sqeuclidean").mean() - within[0] - within[1]

    for i, gi in enumerate(names):
        for j, gj in enumerate(names):
            want = 0.0 if i == j else ref(Z[groups == gi], Z[groups == gj])
            assert abs(e[i, j] - want) < 1e-9 * max(1.0, abs(want))
    assert e[0, 1] > 0


@pytest.mark.shared_data
def test_scperturb_statistics_real_and_simulated(shared_data, tmp_path):
    """The scPerturb statistics on the real tables (every compound above the noise level; 23 of 188 strong), and
    the same pipeline on raw counts with known structure: the compounds with a program are far from control and
    correlate with their partner."""
    import anndata as ad

    from scpert_dist.data.readers.scperturb import read_scperturb_table
    from scpert_dist.data.simulate.scperturb import noise_level, sim_tables, table_stats

    e = read_scperturb_table(shared_data / C.REAL_EDIST, metadata=shared_data)
    c = read_scperturb_table(shared_data / C.REAL_PBCORR, metadata=shared_data)
    real = table_stats(e, c)
    assert real["share of compounds with an effect (E to control > 3 x noise level)"] == 1.0
    assert round(real["share of compounds with a strong effect (E to control > 3 x median)"] * 188) == 23
    assert 0 < noise_level(e) < e.to_control().min() and -0.5 < real["pseudobulk r between compounds p5"] < -0.3
    # raw counts pooled as scPerturb pools them: control, 6 compounds without an effect, 2 + 2 sharing a program
    rng = np.random.default_rng(0)
    n_genes, per = 300, 120
    base = rng.gamma(0.6, 1.0, n_genes)
    prog = {"A": np.zeros(n_genes), "B": np.zeros(n_genes)}
    prog["A"][:30], prog["B"][30:60] = 1.2, 1.2
    groups = {"control": None, **{f"null{i}": None for i in range(6)}, "A1": "A", "A2": "A", "B1": "B", "B2": "B"}
    X, names = [], []
    for g, pr in groups.items():
        mu = base * np.exp(prog[pr] if pr else 0)
        lib = rng.lognormal(np.log(2500), 0.3, per)
        X.append(rng.poisson(mu[None] / mu.sum() * lib[:, None]))
        names += [g] * per
    X = np.vstack(X)
    raw = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame({"product_name": names, "n_counts": X.sum(1)},
                                                               index=[f"c{i}" for i in range(len(X))]))
    se, sc_, info = sim_tables(raw)
    assert se.values.shape == sc_.values.shape == (11, 11) and se.control == "control" and 100 < info["cells_per_group"] <= per
    assert np.allclose(se.values, se.values.T) and np.allclose(np.diag(sc_.values), 1)
    ec = se.to_control()
    assert ec[["A1", "A2", "B1", "B2"]].min() > 10 * ec[[f"null{i}" for i in range(6)]].abs().max()
    r = sc_.frame()
    assert r.loc["A1", "A2"] > 0.8 and r.loc["B1", "B2"] > 0.8 and r.loc["A1", "B1"] < r.loc["A1", "A2"] - 0.5
    sim = table_stats(se, sc_)
    assert set(sim) == set(real)
    assert sim["share of compounds with a strong effect (E to control > 3 x median)"] == 0.4
