"""Every real L1000 file in ../shared/data/lincs through read_l1000 and `scpert data lincs`, checked against the
shapes and counts SOURCES.md states (and, for plates with both levels, our level-3 z-scores against LINCS' own
level-4 file of the same plate)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from scpert_dist.data.readers.l1000 import read_l1000
from scpert_dist.data.shards.format import read_manifest, shard_paths, verify_shards
from scpert_dist.errors import InputFileError, MetadataError

pytestmark = pytest.mark.shared_data

CPC = Path("lincs/plates/CPC006_A375_6H_X1")
LJP = Path("lincs/plates/LJP009_A375_24H_X1_B20")
LJP_GEX = LJP / "LJP009_A375_24H_X1_B20_GEX_n384x978.gct.gz"
LJP_Q = LJP / "LJP009_A375_24H_X1_B20_QNORM_n371x978.gct.gz"
LJP_Z = LJP / "LJP009_A375_24H_X1_B20_ZSPCQNORM_n371x978.gct.gz"
OTHER = Path("lincs/other")
SLINKY = OTHER / "slinky_demo_level3_n581x978.gctx"
SLINKY_INFO = OTHER / "slinky_demo_inst_info.txt"


def landmarks(shared: Path) -> set[str]:
    return set(pd.read_csv(shared / "lincs/l1000_landmark_genes.csv", dtype=str).gene_id)




def close_to_lincs_level4(ours, theirs) -> None:
    """Our plate z-scores of the level-3 file reproduce the plate's published level-4 file."""
    assert ours.meta.sig_id.tolist() == theirs.meta.sig_id.tolist() and ours.genes == theirs.genes
    assert np.abs(ours.values - theirs.values).mean() < 1e-3
    per_well = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours.values, theirs.values, strict=True)]
    assert min(per_well) > 0.999


# ------------------------------------------------------------------------------ CPC006 (CMap plate, old field names)
def test_cpc006_level3_gct_gctx_and_level4(shared_data):
    gct = read_l1000(shared_data / CPC / "gctv13_01.gct")
    qn = read_l1000(shared_data / CPC / "gctv13_01_qnorm.gctx")
    zs = read_l1000(shared_data / CPC / "gctv13_01_zs.gctx")
    assert (gct.level, qn.level, zs.level) == (3, 3, 4)
    assert gct.transform.startswith("level 3: robust z-score per plate") and "no replicate plates" in gct.transform
    assert zs.transform == "level 4: clipped to +-10 as LINCS does"
    for t in (gct, qn, zs):
        m = t.meta
        assert t.values.shape == (371, 978) and t.values.dtype == np.float32
        assert set(t.genes) == landmarks(shared_data)
        assert m.pert_type.value_counts().to_dict() == {"trt_cp": 355, "ctl_vehicle": 16}  # upper case in the file
        assert 353 <= m[m.pert_type == "trt_cp"].pert_id.nunique() <= 354
        assert set(m[m.pert_type == "ctl_vehicle"].pert_iname) == {"DMSO"}
        assert m.pert_iname.iloc[0] == "GELDANAMYCIN"  # from pert_desc
        assert set(m.cell_id) == {"A375"} and set(m.time_h) == {6.0} and set(m.plate) == {"CPC006_A375_6H_X1"}
        assert m.dose_um.value_counts().idxmax() == 10.0  # exp_pert_dose + exp_pert_dose_unit 'UM'
        assert m[m.pert_type == "ctl_vehicle"].dose_um.isna().all()
        assert np.abs(t.values).max() <= 10
    with h5py.File(shared_data / CPC / "gctv13_01_zs.gctx") as f:
        assert f["0/DATA/0/matrix"][:].min() < -70  # the published level 4 runs to -75: clipped here
    close_to_lincs_level4(gct, zs)
    close_to_lincs_level4(qn, zs)


def test_cpc006_vehicle_reference(shared_data):
    plate = read_l1000(shared_data / CPC / "gctv13_01_qnorm.gctx", zscore="plate")
    veh = read_l1000(shared_data / CPC / "gctv13_01_qnorm.gctx", zscore="vehicle")
    dmso = (veh.meta.pert_type == "ctl_vehicle").to_numpy()
    assert "vs the plate vehicle wells" in veh.transform
    # the reference population is centred: its per-gene median is 0 (up to clipping and rounding)
    assert np.abs(np.median(veh.values[dmso], axis=0)).max() < 1e-3
    assert np.abs(np.median(plate.values, axis=0)).max() < 1e-3
    assert np.abs(np.median(plate.values[dmso], axis=0)).max() > 0.1  # DMSO wells are not the plate median
    per_well = [np.corrcoef(a, b)[0, 1] for a, b in zip(plate.values, veh.values, strict=True)]
    assert 0.8 < np.median(per_well) < 0.99


# ------------------------------------------------------------------------------ LJP009 (.gct.gz, levels 2/3/4)
def test_ljp009_levels(shared_data):
    with pytest.raises(InputFileError) as e:
        read_l1000(shared_data / LJP_GEX)
    assert e.value.field == "data level" and "level-2" in str(e.value) and "QNORM" in e.value.hint
    q, z = read_l1000(shared_data / LJP_Q), read_l1000(shared_data / LJP_Z)
    assert (q.level, z.level) == (3, 4)
    for t in (q, z):
        m = t.meta
        assert t.values.shape == (371, 978) and set(t.genes) == landmarks(shared_data)
        assert m.pert_type.value_counts().to_dict() == {"trt_cp": 345, "ctl_vehicle": 22, "trt_poscon": 4}
        trt = m[m.pert_type == "trt_cp"]
        assert trt.pert_id.nunique() == 59 and m[m.pert_type != "ctl_vehicle"].pert_id.nunique() == 63
        assert sorted(trt.dose_um.unique()) == [0.04, 0.12, 0.37, 1.11, 3.33, 10.0]  # 6 doses, 0.04-10 uM
        assert trt.groupby("pert_id").dose_um.nunique().max() == 6
        assert {"vorinostat", "tanespimycin"} <= set(m[m.pert_type == "trt_poscon"].pert_iname)
        assert set(m.time_h) == {24.0} and set(m.cell_id) == {"A375"}
    close_to_lincs_level4(q, z)


# ------------------------------------------------------------------------------ lincs/other and lincs/original
def test_core_a_contest_and_gene_id_example(shared_data):
    core = read_l1000(shared_data / OTHER / "CORE_A_level4_ZSPCINF_n40x12328.gctx")
    assert core.values.shape == (40, 12328) and core.level == 4 and np.abs(core.values).max() == 10
    assert set(core.meta.pert_type) == {"trt_cp"} and set(core.meta.cell_id) == {"KJ100"}
    assert landmarks(shared_data) <= set(core.genes)
    contest = read_l1000(shared_data / OTHER / "contest_modzs_ezid_n10x10174.gctx")
    assert contest.values.shape == (10, 10174) and contest.level == 5
    assert "parsed from the LINCS signature ids" in contest.source
    m = contest.meta
    assert set(m.cell_id) == {"A375"} and set(m.time_h) == {6.0} and set(m.dose_um) == {10.0}
    assert m.pert_id.iloc[0] == "BRD-A85280935" and set(m.pert_type) == {"trt_cp"}
    ex = read_l1000(shared_data / OTHER / "gene_id_example_data_n25x978.gctx")
    assert ex.values.shape == (25, 978) and ex.level == 3 and set(ex.genes) == landmarks(shared_data)
    assert any("absent metadata fields" in n and "pert_type" in n for n in ex.notes)
    assert (ex.meta.pert_type == "").all()


def test_slinky_inst_info_join_and_replicates(shared_data):
    with h5py.File(shared_data / SLINKY) as f:  # SOURCES.md's file name says n581x978; the file holds 131 x 12328
        assert f["0/DATA/0/matrix"].shape == (131, 12328) and "pert_type" not in f["0/META/COL"]
    t = read_l1000(shared_data / SLINKY, inst_info=shared_data / SLINKY_INFO)
    assert t.level == 3 and "MODZ over replicate plates" in t.transform
    assert any("joined 131 profiles on inst_id" in n for n in t.notes)
    m = t.meta
    # every well is in exactly one signature: the wells per type are SOURCES.md's inst_info counts
    assert m.groupby("pert_type").n_replicates.sum().to_dict() == {"ctl_vehicle": 59, "ctl_vector": 55,
                                                                   "trt_sh": 12, "trt_cp": 5}
    amox = m[m.pert_type == "trt_cp"].iloc[0]
    assert (amox.sig_id, amox.pert_iname, amox.n_replicates, amox.cell_id) == ("CPC020_MCF7_24H:P17", "amoxicillin",
                                                                              5, "MCF7")
    assert t.values.shape == (len(m), 12328) and np.abs(t.values).max() <= 10
    bare = read_l1000(shared_data / SLINKY)
    assert any("pert_type" in n for n in bare.notes)


def test_original_modzs_untouched(shared_data):
    t = read_l1000(shared_data / "lincs/original/modzs_n272x978.gctx")
    assert t.values.shape == (272, 978) and t.level == 5 and int(t.landmark.sum()) == 978
    with h5py.File(shared_data / "lincs/original/modzs_n272x978.gctx") as f:
        np.testing.assert_array_equal(t.values, f["0/DATA/0/matrix"][:])  # already within +-10 (float32 rounding)
    assert t.meta.pert_iname.value_counts().to_dict() == {"vemurafenib": 140, "atorvastatin": 94, "venlafaxine": 38}


# ------------------------------------------------------------------------------ content over extension
def test_format_from_first_bytes(shared_data, tmp_path):
    shutil.copy(shared_data / LJP_Z, tmp_path / "plate.gctx")  # gzip GCT named .gctx
    shutil.copy(shared_data / CPC / "gctv13_01_zs.gctx", tmp_path / "plate_zs.gct")  # HDF5 named .gct
    with gzip.open(shared_data / LJP_Z) as src:
        (tmp_path / "plain.gct.gz").write_bytes(src.read())  # plain GCT named .gct.gz
    assert read_l1000(tmp_path / "plate.gctx").values.shape == (371, 978)
    assert read_l1000(tmp_path / "plate_zs.gct").level == 4
    assert read_l1000(tmp_path / "plain.gct.gz").meta.pert_type.eq("trt_cp").sum() == 345
    (tmp_path / "junk.gctx").write_bytes(b"PK\x03\x04 a zip file, not HDF5")
    with pytest.raises(InputFileError, match="starts with"):
        read_l1000(tmp_path / "junk.gctx")


# ------------------------------------------------------------------------------ the CLI over every real file
def _pr_is_lmark_gct(shared: Path, dest: Path) -> None:
    """The LJP009 level-4 plate plus 22 non-landmark genes, landmarks flagged in a `pr_is_lmark` row column."""
    lines = gzip.open(shared / LJP_Z, "rt").read().splitlines()
    n_rows, n_cols, n_rmeta, n_cmeta = map(int, lines[1].split("\t"))
    out = [lines[0], "\t".join(map(str, (n_rows + 22, n_cols, n_rmeta + 1, n_cmeta)))]
    cells = [ln.split("\t") for ln in lines[2:]]
    out.append("\t".join([cells[0][0], "pr_is_lmark", *cells[0][1:]]))
    out += ["\t".join([c[0], "na", *c[1:]]) for c in cells[1:1 + n_cmeta]]
    data = cells[1 + n_cmeta:]
    out += ["\t".join([c[0], "Y", *c[1:]]) for c in data]
    for i, c in enumerate(data[:22]):
        extra = [f"extra_{i}", "N", *c[1:]]
        extra[1 + 6] = str(900000 + i)  # pr_gene_id column (6th row-meta field after id)
        out.append("\t".join(extra))
    dest.write_text("\n".join(out) + "\n")


def test_cli_reads_every_real_file(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SCPERT_METADATA", raising=False)
    lm = landmarks(shared_data)
    cases = {  # name -> (args, exit code, rows or error class, level)
        "cpc_gct": ([CPC / "gctv13_01.gct"], 0, 371, 3),
        "cpc_qnorm": ([CPC / "gctv13_01_qnorm.gctx"], 0, 371, 3),
        "cpc_zs": ([CPC / "gctv13_01_zs.gctx"], 0, 371, 4),
        "ljp_gex": ([LJP_GEX], 2, "InputFileError", None),
        "ljp_qnorm": ([LJP_Q], 0, 367, 3),  # 4 trt_poscon dropped
        "ljp_zspc": ([LJP_Z], 0, 367, 4),
        "core_a": ([OTHER / "CORE_A_level4_ZSPCINF_n40x12328.gctx", "--metadata", shared_data], 0, 40, 4),
        "contest": ([OTHER / "contest_modzs_ezid_n10x10174.gctx", "--metadata", shared_data], 0, 10, 5),
        "gene_id_example": ([OTHER / "gene_id_example_data_n25x978.gctx"], 2, "MetadataError", None),
        "slinky_bare": ([SLINKY, "--metadata", shared_data], 2, "MetadataError", None),
        "slinky": ([SLINKY, "--inst-info", shared_data / SLINKY_INFO, "--metadata", shared_data], 0, None, 3),
        "modzs": (["lincs/original/modzs_n272x978.gctx"], 0, 272, 5),
    }
    for name, (args, code, want, level) in cases.items():
        out = tmp_path / name
        src = args[0] if isinstance(args[0], Path) and args[0].is_absolute() else shared_data / args[0]
        got, text = run_cli(monkeypatch, capsys, "data", "lincs", "--gctx", src, "--out", out, "--quiet", *args[1:])
        assert got == code, (name, text)
        if code:
            assert f"error: {want}" in text and not list(out.glob("shard-*")), (name, text)
            continue
        man = read_manifest(out)
        verify_shards(out)
        assert man["level"] == level and man["transform"].startswith(f"level {level}:"), name
        assert set(man["genes"]) == lm and man["n_genes"] == 978, name
        if want is not None:
            assert man["n_rows"] == want, (name, man["n_rows"])
    sl = pd.read_parquet(shard_paths(tmp_path / "slinky")[0])
    assert set(sl.pert_type) == {"trt_cp", "ctl_vehicle"} and (sl.sig_id == "CPC020_MCF7_24H:P17").sum() == 1
    flagged = tmp_path / "lmark.gct"
    _pr_is_lmark_gct(shared_data, flagged)
    got, text = run_cli(monkeypatch, capsys, "data", "lincs", "--gctx", flagged, "--out", tmp_path / "lmark", "--quiet")
    assert got == 0, text
    man = read_manifest(tmp_path / "lmark")
    assert set(man["genes"]) == lm and "pr_is_lmark" in man["metadata"]


def test_ingest_errors_name_the_level_and_metadata(shared_data, tmp_path):
    from scpert_dist.data.shards.ingest import ingest_gctx

    with pytest.raises(MetadataError) as e:
        ingest_gctx(shared_data / SLINKY, tmp_path / "o", all_genes=True, progress=False)
    assert "--inst-info" in e.value.hint and not (tmp_path / "o").exists()
    with pytest.raises(MetadataError, match="no ctl_vehicle wells"):  # a plate of the slinky demo without DMSO
        ingest_gctx(shared_data / SLINKY, tmp_path / "v", inst_info=shared_data / SLINKY_INFO, all_genes=True,
                    zscore="vehicle", progress=False)


# ------------------------------------------------------------------------------ the same plate under every release's names
def _rewrite_col_meta(src: Path, dest: Path, edit) -> None:
    shutil.copy(src, dest)
    with h5py.File(dest, "r+") as f:
        col = f["0/META/COL"]
        meta = {k: np.array([v.decode() if isinstance(v, bytes) else v for v in col[k][:]]) for k in col}
        for k in list(col):
            if k != "id":
                del col[k]
        for k, v in edit(meta).items():
            if k != "id":
                col[k] = v.astype("S") if v.dtype.kind in "UO" else v


def test_release_aliases_and_inst_info_give_the_same_metadata(shared_data, tmp_path):
    src = shared_data / CPC / "gctv13_01_zs.gctx"
    ref = read_l1000(src)

    def beta(m):  # CMap 2020 beta names
        ren = {"pert_desc": "cmap_name", "cell_id": "cell_iname", "exp_pert_dose": "pert_dose",
               "exp_pert_dose_unit": "pert_dose_unit", "exp_pert_time": "pert_time", "exp_pert_time_unit": "pert_time_unit"}
        return {ren.get(k, k): v for k, v in m.items()}

    def gse(m):  # GSE92742 names: dose and time as strings, pert_type in lower case
        out = {k: v for k, v in m.items() if not k.startswith("exp_pert_")}
        out["pert_iname"] = out.pop("pert_desc")
        out["pert_type"] = np.char.lower(m["pert_type"].astype(str))
        out["pert_idose"] = np.array([f"{d:g} {u.lower()}" for d, u in zip(m["exp_pert_dose"], m["exp_pert_dose_unit"],
                                                                         strict=True)])
        out["pert_itime"] = np.array([f"{t:g} h" for t in m["exp_pert_time"]])
        return out

    for name, edit in (("beta", beta), ("gse", gse)):
        _rewrite_col_meta(src, tmp_path / f"{name}.gctx", edit)
        t = read_l1000(tmp_path / f"{name}.gctx")
        pd.testing.assert_frame_equal(t.meta, ref.meta, obj=name)
        np.testing.assert_array_equal(t.values, ref.values)
    # the metadata as a separate inst_info table (the file keeps only its ids)
    with h5py.File(src) as f:
        info = pd.DataFrame({k: [v.decode() if isinstance(v, bytes) else v for v in f[f"0/META/COL/{k}"][:]]
                             for k in f["0/META/COL"]}).rename(columns={"id": "inst_id"})
    _rewrite_col_meta(src, tmp_path / "bare.gctx", lambda m: {})
    extra = info.iloc[:2].assign(inst_id=["elsewhere:A01", "elsewhere:A02"])
    pd.concat([info, extra]).to_csv(tmp_path / "inst_info.txt", sep="\t", index=False)
    t = read_l1000(tmp_path / "bare.gctx", inst_info=tmp_path / "inst_info.txt")
    pd.testing.assert_frame_equal(t.meta, ref.meta)
    assert any("joined 371 profiles on inst_id; 2 table rows have no profile" in n for n in t.notes)
    info.iloc[5:].to_csv(tmp_path / "partial.txt", sep="\t", index=False)
    with pytest.raises(MetadataError, match="5 of 371 matrix profiles are not in the inst_info table") as e:
        read_l1000(tmp_path / "bare.gctx", inst_info=tmp_path / "partial.txt")
    assert e.value.field == "inst_id"


def test_level3_one_replicate_set_at_a_time(shared_data, tmp_path, monkeypatch):
    """With little memory the level-3 signatures go to a memory-mapped file (removed afterwards) and come out the
    same; a replicate set that cannot fit is refused by name instead of meeting the OOM killer."""
    import tempfile

    from scpert_dist.data.readers import l1000

    ref = read_l1000(shared_data / SLINKY, inst_info=shared_data / SLINKY_INFO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    # the slinky file: 131 wells x 12,328 genes (6.5 MB of signatures), largest replicate set 64 wells (9.5 MB)
    monkeypatch.setattr(l1000, "_available_memory", lambda: 12_000_000)
    src = l1000.open_source(shared_data / SLINKY)
    sm = l1000.source_metadata(src, inst_info=shared_data / SLINKY_INFO)
    lsrc, meta, info = l1000.apply_level(src, sm.meta)
    assert isinstance(lsrc.read_block(0, 1), np.memmap) and list(tmp_path.glob("scpert-level3-*"))
    np.testing.assert_array_equal(np.asarray(lsrc.read_block(0, len(meta))), ref.values)
    assert meta.sig_id.tolist() == ref.meta.sig_id.tolist() and info.transform == ref.transform
    lsrc.close()
    assert not list(tmp_path.glob("scpert-level3-*"))
    monkeypatch.setattr(l1000, "_available_memory", lambda: 5_000_000)
    with pytest.raises(InputFileError, match="replicate set of 64 profiles") as e:
        read_l1000(shared_data / SLINKY, inst_info=shared_data / SLINKY_INFO)
    assert e.value.field == "data level" and not list(tmp_path.glob("scpert-level3-*"))
