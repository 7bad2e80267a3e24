"""The field's metrics beside ours: Arc's cell-eval and pertpy's E-distance, computed by those libraries on a
small single-cell fixture (tests/sc_fixture.py) and on the real sci-Plex3 pseudobulk with biolord's released
predictions. The numbers asserted are the libraries' own; where a metric of theirs and one of ours are defined
alike, they must agree."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scpert_dist.errors import GeneMappingError, MetadataError, ValueRangeError
from scpert_dist.evaluate import field_metrics as FM

sys.path.insert(0, str(Path(__file__).parent))
from conftest import run_cli  # noqa: E402
from sc_fixture import make_adata  # noqa: E402

TRUTH = "sciplex/real/sciplex3_native_ood_pseudobulk_9drugs_x3lines_2000genes.parquet"
BIOLORD = "sciplex/real/biolord_native_ood_predictions"


@pytest.fixture(scope="module")
def cells():
    """Held-out conditions (2 drugs x 2 doses x 2 lines) of the fixture with their lines' vehicle cells, labelled
    as the libraries want (obs condition, vehicle label, cell_line)."""
    a = make_adata(n_drugs=6, n_genes=50, cells=24, n_ctl=48, n_test=2)
    o = a.obs
    keep = (o["split_chemcpa_ood"] == "test").to_numpy() | o["is_control"].to_numpy()
    a = a[keep].copy()
    a.obs[FM.PERT] = np.where(a.obs["is_control"], FM.CONTROL,
                              [f"{d} @ {x:g}" for d, x in zip(a.obs["drug"], a.obs["dose_um"], strict=True)])
    return a


# The first full-profile evaluation in a process compiles the libraries' numba kernels: pdex's DE 14 s and UMAP's
# neighbour graph (clustering_agreement) 19 s, plus 8 s of imports (measured at load 8 on 2 cores; 67 s for this test
# alone); warm, it takes ~2 s, as in the full suite after test_benchmark.py (its benchmark compiles both first).
@pytest.mark.slow
def test_perfect_and_vehicle_predictions_on_single_cells(cells):
    """A perfect prediction gets cell-eval's best values and pertpy's E-distance 0; predicting vehicle cells gets a
    pearson_delta near 0, lower discrimination and a clearly positive E-distance. pertpy's E-distance equals our
    V-statistic energy distance (tests/reference_metrics.py) on the same cells."""
    from tests.reference_metrics import energy_distance_v as energy_distance

    per = FM.field_metrics(cells, cells.copy(), context_col="cell_line")
    assert len(per) == 8 and set(per["cell_line"]) == {"A549", "MCF7"}
    assert np.allclose(per["pearson_delta"], 1) and np.allclose(per["mae"], 0) and np.allclose(per["edistance"], 0)
    assert (per["discrimination_score_l1"] == 1).all() and (per["clustering_agreement"] == 1).all()
    has_de = per["de_nsig_counts_real"] > 0
    assert has_de.sum() >= 6 and (per.loc[has_de, "overlap_at_N"] == 1).all()  # no DE genes: cell-eval says 0
    assert (per["cell_eval_errors"] == "").all() and (per["clipped"] == 0).all()
    assert {"precision_at_N", "de_direction_match", "pr_auc", "mse_delta", "pearson_edistance"} <= set(per.columns)

    pred = cells.copy()
    rng = np.random.default_rng(0)
    X = pred.X.copy()
    for ln in ("A549", "MCF7"):
        line = (pred.obs["cell_line"] == ln).to_numpy()
        ctl = np.flatnonzero(line & pred.obs["is_control"].to_numpy())
        trt = np.flatnonzero(line & ~pred.obs["is_control"].to_numpy())
        X[trt] = X[rng.choice(ctl, len(trt))]
    pred.X = X
    veh = FM.field_metrics(cells, pred, context_col="cell_line")
    assert abs(veh["pearson_delta"].mean()) < 0.2 and veh["pearson_delta"].mean() < per["pearson_delta"].mean() - 0.7
    assert veh["discrimination_score_l1"].mean() < 0.9 and (veh["edistance"] > 0.5).all()
    for _, r in veh.iterrows():
        m_true = ((cells.obs["cell_line"] == r["cell_line"]) & (cells.obs[FM.PERT] == r["perturbation"])).to_numpy()
        ours = energy_distance(pred.X[m_true], cells.X[m_true])
        assert r["edistance"] == pytest.approx(ours, rel=1e-4)


@pytest.mark.slow  # cold numba compile as above when run alone (~45 s); ~5 s warm
def test_pearson_delta_is_our_logfc_r_in_the_benchmark(cells):
    """Through the benchmark's own path (ScoringCells, evaluate_predictor, the Recorder): observed change against
    the SCORE vehicle half, predicted change against the FIT half, for cell-eval as for us, so its pearson_delta is
    our logfc_pearson on every condition and seed (the baselines clip at 0: nothing is clipped)."""
    from scpert_dist.evaluate.baselines.simple import ControlPredictor, MeanDrugPredictor
    from scpert_dist.evaluate.metrics import ScoringCells, evaluate_predictor
    from scpert_dist.evaluate.predictor import FitContext

    a = make_adata(n_drugs=6, n_genes=50, cells=24, n_ctl=48, n_test=2)
    sc = ScoringCells(a, "split_chemcpa_ood")
    ctx = FitContext(genes=list(a.var_names))
    for pr in (MeanDrugPredictor(), ControlPredictor()):
        rec: dict = {}
        ours = evaluate_predictor(FM.Recorder(pr, rec), a, "split_chemcpa_ood", ctx=ctx, seeds=(0, 1), n_cells=64,
                                  cells=sc)
        theirs = FM.benchmark_scores(rec, sc, pr.name)
        assert len(theirs) == len(ours) == 16 and (theirs["n_pred"] == 64).all() and (theirs["clipped"] == 0).all()
        both = ours.merge(theirs, on=["method", "seed", "drug", "cell_line", "dose_um"])
        assert len(both) == 16
        assert np.allclose(both["pearson_delta"], both["logfc_pearson"], atol=1e-4), pr.name
    assert abs(ours["logfc_pearson"].mean()) < 0.2  # the vehicle prediction: no association


@pytest.fixture(scope="module")
def truth_path(shared_data):
    p = shared_data / TRUTH
    if not p.is_file():
        pytest.skip("real pseudobulk table absent")
    return p


@pytest.mark.shared_data
def test_pseudobulk_mode_on_the_real_profiles(truth_path, shared_data, tmp_path):
    """Real sci-Plex3 pseudobulk: the truth as its own prediction scores pearson_delta 1, mae 0, discrimination 1;
    biolord's released predictions have 21% of values below 0, which cell-eval cannot take: set to 0, and then its
    pearson_delta is exactly our logFC r of the clipped prediction; the vehicle as prediction has no Pearson r in
    cell-eval (NaN; ours scores it 0). The DE metrics, clustering_agreement and pertpy's E-distance are not computed."""
    from scpert_dist.data.readers import pseudobulk as pbr
    from scpert_dist.evaluate import pseudobulk as pb

    truth = pbr.read_profiles(truth_path)
    keys, t, v = pb.truth_arrays(truth)
    perfect = FM.profile_scores(keys, t, t, v, truth.genes, method="truth")
    assert len(perfect) == 27 and np.allclose(perfect["pearson_delta"], 1) and np.allclose(perfect["mae"], 0)
    assert (perfect["discrimination_score_l1"] == 1).all()
    assert not {"overlap_at_N", "edistance", "de_nsig_counts_real", "clustering_agreement"} & set(perfect.columns)
    assert set(FM.PSEUDOBULK_METRICS) <= set(perfect.columns)

    out = tmp_path / "biolord.parquet"
    pbr.biolord_table(shared_data / BIOLORD, truth.genes, out)
    bio = FM.pseudobulk_file_scores(truth_path, out)
    assert 0.15 < bio["clipped"].mean() < 0.3 and (bio["method"] == "biolord").all()
    p = pb.align(pbr.read_profiles(out), pbr.Profiles(keys.assign(profile=pbr.TREATED), t, truth.genes))
    ours_clipped = pb.score_arrays(keys, t, np.clip(p, 0, None), v)
    ours_raw = pb.score_arrays(keys, t, p, v)
    both = bio.merge(ours_clipped, on=["drug", "cell_line"])
    assert np.allclose(both["pearson_delta"], both["logfc_pearson"], atol=1e-5)
    assert abs(bio["pearson_delta"].mean() - ours_raw["logfc_pearson"].mean()) < 0.01  # 0.595 vs 0.591
    assert bio["discrimination_score_l1"].mean() > 0.6  # well above chance (~0.56 with 9 drugs per line)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's ConstantInputWarning, raised inside cell-eval
        veh = FM.profile_scores(keys, t, v.copy(), v, truth.genes, method="vehicle")
    assert veh["pearson_delta"].isna().all() and (veh["clipped"] == 0).all()


@pytest.mark.shared_data
def test_cli_pseudobulk_lodo_prints_and_saves_the_field_table(truth_path, shared_data, tmp_path, monkeypatch,
                                                               capsys):
    """`scpert evaluate pseudobulk-lodo`: cell-eval's table beside ours, per method (and the --extra file), saved
    as <out>_field_metrics.csv; the libraries' progress bars and log records go to the log file, not the console."""
    from scpert_dist import console
    from scpert_dist.data.readers import pseudobulk as pbr

    pbr.biolord_table(shared_data / BIOLORD, pbr.read_profiles(truth_path).genes, tmp_path / "biolord.parquet")
    log = tmp_path / "libs.log"
    monkeypatch.setenv("SCPERT_LOG_FILE", str(log))
    console.uninstall()
    try:
        code, text = run_cli(monkeypatch, capsys, "evaluate", "pseudobulk-lodo", "--truth", truth_path,
                             "--metadata", shared_data, "--methods", "zero,mean", "--extra",
                             tmp_path / "biolord.parquet", "--out", tmp_path / "lodo.csv")
    finally:
        console.uninstall()
    assert code == 0, text
    assert "the field's metrics (cell-eval 0.8.2, pertpy 1.0.3" in text and "pearson_delta" in text
    assert "Iterating over perturbations" not in text and "WARNING" not in text, text
    assert "Iterating over perturbations" in log.read_text()
    field = pd.read_csv(tmp_path / "lodo_field_metrics.csv")
    assert set(field["method"]) == {"zero", "mean", "biolord"} and len(field) == 81
    by = field.groupby("method")["pearson_delta"].mean()
    ours = pd.read_csv(tmp_path / "lodo.csv").groupby("method")["logfc_pearson"].mean()
    assert np.isnan(by["zero"]) and ours["zero"] == 0  # cell-eval: no r for a constant change; ours: 0
    assert by["mean"] == pytest.approx(ours["mean"], abs=0.01)


def test_bad_inputs_are_named_errors(cells):
    """What cell-eval or pertpy would refuse (or silently renormalise) stops with a named error first."""
    other = cells[:, ::-1].copy()
    with pytest.raises(GeneMappingError, match="different genes"):
        FM.field_metrics(cells, other)
    no_ctl = cells[cells.obs[FM.PERT] != FM.CONTROL].copy()
    with pytest.raises(MetadataError, match="no control rows"):
        FM.field_metrics(cells, no_ctl)
    counts = cells.copy()
    counts.X = np.round(np.expm1(counts.X))
    with pytest.raises(ValueRangeError, match="not log-normalised"):
        FM.field_metrics(counts, counts.copy())
    fewer = cells[cells.obs[FM.PERT] != cells.obs[FM.PERT].iloc[-1]].copy()
    with pytest.raises(MetadataError, match="on one side only"):
        FM.field_metrics(cells, fewer, context_col="cell_line")
    nan = cells.copy()
    nan.X[0, 0] = np.nan
    with pytest.raises(ValueRangeError, match="NaN"):
        FM.field_metrics(cells, nan)


def test_library_output_goes_to_the_log_file(tmp_path, capfd):
    """Inside `console.library_output`: a logger's own stderr handler (as pdex attaches at import), prints, tqdm
    bars and Python warnings all reach the installed console's log file, none the terminal; the logger's handlers
    are back afterwards."""
    from tqdm import tqdm

    from scpert_dist import console

    lib = logging.getLogger("fake_library")
    own = logging.StreamHandler(sys.stderr)
    lib.addHandler(own)
    console.uninstall()
    con = console.install("test")
    con.set_log_path(tmp_path / "lib.log")
    try:
        with console.library_output("fake_library"):
            lib.warning("a library warning")
            print("a library print")
            for _ in tqdm(range(3), desc="a library bar"):
                pass
            warnings.warn("a library python warning", UserWarning, stacklevel=1)
    finally:
        console.uninstall()
    text = (tmp_path / "lib.log").read_text()
    for s in ("fake_library WARNING a library warning", "a library print", "a library bar", "a library python warning"):
        assert s in text
    out, err = capfd.readouterr()
    assert "a library" not in out + err.replace(str(tmp_path / "lib.log"), "")
    assert lib.handlers == [own]
    lib.removeHandler(own)
