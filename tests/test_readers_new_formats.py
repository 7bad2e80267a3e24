"""The real files added 2026-12-04 (SOURCES.md) through the readers, with the counts SOURCES.md states: L1000 level 3
as AnnData (CPC006 in HT115, two replicate plates), a plate that measured 489 of the 978 landmarks (masked, never
zero-filled, through ingest -> Ray Data stream -> loss and Table-1 metrics), level 4 on Affymetrix probe ids, and
scPerturb's sci-Plex3 189 x 189 tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli

from scpert_dist.data.readers.l1000 import read_l1000
from scpert_dist.data.readers.plates import replicate_signatures, shared_compounds
from scpert_dist.data.readers.scperturb import CORRELATION, EDISTANCE, read_scperturb_table
from scpert_dist.data.shards.format import read_manifest, shard_paths, verify_shards
from scpert_dist.data.shards.ingest import ingest_gctx
from scpert_dist.errors import GeneMappingError, MetadataError, ValueRangeError

pytestmark = pytest.mark.shared_data

HT115 = Path("lincs/plates/CPC006_HT115_6H_X1_X2/PRnet_demo_CPC006_HT115_6H_level3_n681x978.h5ad")
A375_ZS = Path("lincs/plates/CPC006_A375_6H_X1/gctv13_01_zs.gctx")
MUC = Path("lincs/plates/MUC.CP007_MCF7_24H_X1_B22/gex2norm_QNORM_n192x500.gct")
PROBES = Path("lincs/other/zs_with_rep_n9x22268.gctx")
EDIST = Path("sciplex/real/scperturb/pairwise_edist_SrivatsanTrapnell2020_sciplex3.csv")
PBCORR = Path("sciplex/real/scperturb/pseudobulk_correlations_SrivatsanTrapnell2020_sciplex3_tables.csv")


def landmark_table(shared: Path) -> pd.DataFrame:
    return pd.read_csv(shared / "lincs/l1000_landmark_genes.csv", dtype=str).sort_values(
        "position", key=lambda s: s.astype(int))


# ------------------------------------------------------------------------------ HT115 level 3 as AnnData
def test_ht115_h5ad_level3_two_replicate_plates(shared_data):
    wells = read_l1000(shared_data / HT115, metadata=shared_data, replicates="keep")
    m = wells.meta
    assert wells.level == 3 and wells.values.shape == (681, 978) and "replicate plates kept apart" in wells.transform
    assert set(wells.genes) == set(landmark_table(shared_data).gene_id) and int(wells.landmark.sum()) == 978
    assert any("978 of 978 mapped (959 by gene_symbol, 19 only by gene_symbol_gse92742)" in n for n in wells.notes)
    assert m.pert_type.value_counts().to_dict() == {"trt_cp": 661, "ctl_vehicle": 20}
    assert m.plate.value_counts().to_dict() == {"CPC006_HT115_6H_X2": 343, "CPC006_HT115_6H_X1": 338}
    trt = m[m.pert_type == "trt_cp"]
    assert trt.pert_id.nunique() == 354 and trt.dose_um.nunique() == 52 and trt.dose_um.value_counts().idxmax() == 10
    assert set(m.cell_id) == {"HT115"} and set(m.time_h) == {6.0}
    assert m.sig_id.iloc[0] == "CPC006_HT115_6H_X1_B5_DUO52HI53LO:H24"  # the LINCS inst id, AnnData's '-1' dropped
    assert len(wells.smiles) == 355 and np.abs(wells.values).max() <= 10  # SMILES from the file's own column
    sig = read_l1000(shared_data / HT115, metadata=shared_data)  # replicates collapsed by MODZ where the well repeats
    assert sig.values.shape == (367, 978) and int((sig.meta.n_replicates == 2).sum()) == 314
    assert sig.meta.sig_id.iloc[0] == "CPC006_HT115_6H:H24" and "MODZ over replicate plates" in sig.transform
    with pytest.raises(GeneMappingError) as e:
        read_l1000(shared_data / HT115, metadata=None)
    assert e.value.field == "var_names" and "--metadata" in e.value.hint


def test_replicate_signatures_and_the_compounds_the_two_cpc006_lines_share(shared_data):
    ht = replicate_signatures(shared_data / HT115, metadata=shared_data)
    a375 = replicate_signatures(shared_data / A375_ZS, metadata=shared_data)
    assert ht.values.shape == (661, 978) and ht.meta.replicate.value_counts().to_dict() == {2: 332, 1: 329}
    assert a375.values.shape == (355, 978) and set(a375.meta.replicate) == {1} and a375.level == 4
    assert (ht.meta.smiles != "").all() and (a375.meta.smiles == "").sum() == 1
    assert list(ht.meta.columns) == ["pert_id", "pert_iname", "smiles", "inchikey14", "dose_um", "cell_id", "time_h",
                                     "plate", "replicate", "n_wells"]
    assert shared_compounds(ht, a375) == {"a": 354, "b": 354, "by_brd": 344, "by_inchikey14": 339, "either": 345}
    x1, x2 = ht.replicate(1), ht.replicate(2)
    pairs = x1.meta.reset_index().merge(x2.meta.reset_index(), on=["pert_id", "dose_um"])
    r = np.array([np.corrcoef(x1.values[i], x2.values[j])[0, 1] for i, j in zip(pairs.index_x, pairs.index_y,
                                                                                strict=True)])
    # SOURCES.md: X1 vs X2 of the same compound, median 0.16 over 305 pairs, 25% above 0.3
    assert len(pairs) == 306 and 0.12 < np.median(r) < 0.2 and 0.18 < (r > 0.3).mean() < 0.3


def test_ht115_through_the_cli(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SCPERT_METADATA", raising=False)
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--gctx", shared_data / HT115, "--out", tmp_path / "o",
                         "--metadata", shared_data)
    assert code == 0, text
    man = read_manifest(tmp_path / "o")
    assert man["n_rows"] == 367 and man["n_genes"] == man["n_genes_measured"] == 978 and man["level"] == 3
    assert man["genes"] == landmark_table(shared_data).gene_id.tolist()
    assert man["compounds_without_smiles"]["n"] == 0 and "no SMILES" not in text
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--gctx", shared_data / HT115, "--out", tmp_path / "b")
    assert code == 2 and "GeneMappingError" in text and not (tmp_path / "b" / "manifest.json").exists()


# ------------------------------------------------------------------------------ 489 of 978 landmarks
def test_partial_panel_plate_reads_489_genes_and_drops_the_calibration_analytes(shared_data):
    t = read_l1000(shared_data / MUC)
    m = t.meta
    assert t.level == 3 and t.values.shape == (192, 489) and int(t.landmark.sum()) == 489
    assert any("500 rows -> 489 genes" in n and "11 rows without a gene id" in n and "CAL01" in n for n in t.notes)
    assert m.pert_type.value_counts().to_dict() == {"trt_cp": 156, "ctl_vehicle": 20, "trt_poscon": 12, "lma_x": 4}
    assert m[m.pert_type != "ctl_vehicle"].pert_id.nunique() + 1 == 32  # 32 perturbagens with DMSO
    assert m[m.pert_type == "trt_cp"].dose_um.nunique() == 14 and set(m.cell_id) == {"MCF7"}
    assert set(t.genes) < set(landmark_table(shared_data).gene_id)


def test_partial_panel_is_masked_through_ingest_stream_loss_and_metrics(shared_data, tmp_path, capsys):
    from scpert_dist.data.shards.stream import ShardStream
    from scpert_dist.model import PretrainModel, model_config, table1_metrics
    from scpert_dist.train.settings import Objective, OptimSection
    from scpert_dist.train.step import make_optimizer, train_step

    out = tmp_path / "muc"
    man = ingest_gctx(shared_data / MUC, out, metadata=shared_data, progress=True)
    said = capsys.readouterr().out
    assert "489 of the 978 landmark genes in the file; the other 489 are masked" in said
    assert "26 of 26 compounds have no SMILES" in said  # item 8: no --compounds and no SMILES column
    verify_shards(out)
    lm = landmark_table(shared_data)
    assert man["genes"] == lm.gene_id.tolist() and man["n_genes"] == 978 and man["n_genes_measured"] == 489
    assert man["n_rows"] == 176 and len(man["genes_missing"]) == 489 and man["compounds_without_smiles"]["n"] == 26
    x = np.stack(pd.read_parquet(shard_paths(out)[0]).expr.to_numpy())
    missing = np.isin(man["genes"], man["genes_missing"])
    assert np.isnan(x[:, missing]).all() and np.isfinite(x[:, ~missing]).all()  # NaN, never 0
    assert (x[:, ~missing] != 0).mean() > 0.95
    # the same values as the reader's z-scores on the measured genes
    ref = read_l1000(shared_data / MUC)
    keep = ref.meta.pert_type.isin(["trt_cp", "ctl_vehicle"]).to_numpy()
    col = [man["genes"].index(g) for g in ref.genes]
    np.testing.assert_array_equal(x[:, col], ref.values[keep])

    batch = next(ShardStream(str(out), seed=0, val_fraction=0.0).iter_epoch(0, rank=0, world=1, batch_size=32))
    expr = batch["expr"]
    assert expr.shape == (32, 978) and torch.isnan(expr[:, torch.from_numpy(missing)]).all()
    torch.manual_seed(0)
    model = PretrainModel(model_config("tiny", n_genes=978), "mask")
    optim, objective = OptimSection(), Objective(tasks="mask", mask_ratio=0.3)
    opt, sched = make_optimizer(model, optim, total_steps=4)
    mask = torch.rand(expr.shape, generator=torch.Generator().manual_seed(1)) < 0.3
    logs = train_step(model, {"expr": expr, "mask": mask}, opt, sched, optim, objective)
    assert np.isfinite(logs["loss"]) and np.isfinite(logs["grad_norm"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the loss is the MSE over masked AND measured positions only: the same as the loss of the measured genes alone
    model.eval()
    with torch.no_grad():
        out_all = model(expr, mask)
        full, _ = model.loss(out_all, {"expr": expr, "mask": mask})
        keep_pos = mask & torch.isfinite(expr)
        manual = ((out_all["mask_pred"] - torch.nan_to_num(expr))[keep_pos] ** 2).mean()
    assert torch.isclose(full, manual) and int(keep_pos.sum()) < int(mask.sum())
    t1 = table1_metrics(model, [{"expr": expr}], mask_ratio=0.3)
    assert np.isfinite(t1["mask_rmse"]) and t1["n_rows"] == 32


def test_partial_panel_without_the_landmark_table_keeps_the_489(shared_data, tmp_path):
    man = ingest_gctx(shared_data / MUC, tmp_path / "o", progress=False)
    assert man["n_genes"] == man["n_genes_measured"] == 489 and man["genes_missing"] == []
    assert "without the landmark table (--metadata) the rest of the 978-gene panel is unknown" in man["metadata"]


# ------------------------------------------------------------------------------ probe ids
def test_probe_id_level4_maps_through_the_landmark_table(shared_data, tmp_path):
    t = read_l1000(shared_data / PROBES, metadata=shared_data)
    note = next(n for n in t.notes if n.startswith("genes: "))
    assert "22,268 rows -> 12,752 genes (978 through affx_probe_id_gse92742" in note and "11,774 through" in note
    assert t.level == 4 and t.values.shape == (9, 12752) and int(t.landmark.sum()) == 978
    assert t.meta.pert_iname.value_counts().to_dict() == {"tolimidone": 3, "elvitegravir": 3, "torin-1": 3}
    assert t.meta.plate.nunique() == 3 and set(t.meta.cell_id) == {"A375"}
    lm = landmark_table(shared_data)
    man = ingest_gctx(shared_data / PROBES, tmp_path / "lm", metadata=shared_data, progress=False)
    assert man["genes"] == lm.gene_id.tolist() and man["n_genes_measured"] == 978
    assert man["compounds_without_smiles"]["n"] == 0  # x_smiles of the file
    # the landmark probe of each gene is the one kept: its values are the file's row of that probe
    with h5py.File(shared_data / PROBES) as f:
        rid = [v.decode() for v in f["0/META/ROW/id"][:]]
        raw = f["0/DATA/0/matrix"][:]
    probe_col = {p: i for i, p in enumerate(rid)}
    x = np.stack(pd.read_parquet(shard_paths(tmp_path / "lm")[0]).expr.to_numpy())
    want = np.clip(raw[:, [probe_col[p] for p in lm.affx_probe_id_gse92742]], -10, 10)
    np.testing.assert_allclose(x, want, rtol=1e-6)
    # no probe column and no pr_gene_id: refused by name, saying what was tried
    bare = tmp_path / "bare.gctx"
    shutil.copy(shared_data / PROBES, bare)
    with h5py.File(bare, "r+") as f:
        del f["0/META/ROW/pr_gene_id"]
    with pytest.raises(GeneMappingError) as e:
        read_l1000(bare, metadata=None)
    assert "Affymetrix probe ids" in str(e.value) and "affx_probe_id_gse92742" in str(e.value)
    assert "--metadata" in e.value.hint and e.value.field == "id (probe ids)"
    assert read_l1000(bare, metadata=shared_data).values.shape == (9, 978)


# ------------------------------------------------------------------------------ scPerturb tables
def test_scperturb_tables(shared_data, tmp_path):
    e = read_scperturb_table(shared_data / EDIST, metadata=shared_data)
    c = read_scperturb_table(shared_data / PBCORR, metadata=shared_data)
    assert (e.kind, c.kind) == (EDISTANCE, CORRELATION) and e.values.shape == c.values.shape == (189, 189)
    assert e.control == c.control == "control" and set(e.names) == set(c.names) and len(e.drugs) == 188
    assert sum(bool(x) for x in e.compound) == 188 and e.compound[e.names.index("control")] == ""
    assert np.allclose(e.values, e.values.T) and np.allclose(np.diag(c.values), 1)
    ctl = e.to_control()
    assert len(ctl) == 188 and (ctl > 0).all() and ctl.idxmax().startswith("Quisinostat")
    assert len(e.among_drugs()) == 188 * 187 // 2 and e.among_drugs().min() < 0  # estimator noise around 0
    raw = pd.read_csv(shared_data / EDIST, index_col=0)
    bad = raw.copy()
    bad.iloc[3, 5] += 0.5
    bad.to_csv(tmp_path / "asym_edist.csv")
    with pytest.raises(ValueRangeError, match="not symmetric"):
        read_scperturb_table(tmp_path / "asym_edist.csv")
    bad = raw.rename(index={"control": "ctrl"}, columns={"control": "ctrl"})
    bad.to_csv(tmp_path / "noctl_edist.csv")
    with pytest.raises(MetadataError, match="control"):
        read_scperturb_table(tmp_path / "noctl_edist.csv")
    bad = raw.rename(index={"Thiotepa": "Thiotepa-X"}, columns={"Thiotepa": "Thiotepa-X"})
    bad.to_csv(tmp_path / "unknown_edist.csv")
    assert read_scperturb_table(tmp_path / "unknown_edist.csv").values.shape == (189, 189)  # no compound table
    with pytest.raises(MetadataError, match="not sci-Plex3 compounds"):
        read_scperturb_table(tmp_path / "unknown_edist.csv", metadata=shared_data)
    shuffled = raw.iloc[::-1, :]  # rows in another order than the columns: aligned by name
    shuffled.to_csv(tmp_path / "rev_edist.csv")
    t = read_scperturb_table(tmp_path / "rev_edist.csv")
    np.testing.assert_allclose(t.frame().loc[e.names, e.names].to_numpy(), e.values)


def test_cpc006_a375_without_smiles_tables_says_so(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SCPERT_METADATA", raising=False)
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--gctx", shared_data / A375_ZS, "--out",
                         tmp_path / "a")
    assert code == 0 and "354 of 354 compounds have no SMILES" in text and "GELDANAMYCIN" in text.upper()
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--gctx", shared_data / A375_ZS, "--out",
                         tmp_path / "b", "--compounds", shared_data / "drugs/chemcpa_lincs_drugs_smiles.csv")
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    ns = man["compounds_without_smiles"]
    # chemCPA's BRD table lacks some of the plate's compounds: named on the console with their count
    assert code == 0 and ns["of"] == 354 and 0 < ns["n"] < 30 and f"{ns['n']} of 354 compounds have no SMILES" in text
