"""LINCS -> Parquet shards: the real cmapR GCTX and parquet copies, GCT 1.3 round trip, a simulator-style GCTX +
tables, resumability, and every bad input through the real CLI (exit code 2, named error, no output left)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from scpert_dist import schema as S
from scpert_dist.data.shards.ingest import (
    ingest_gctx,
    ingest_table,
    read_manifest,
    shard_paths,
    verify_shards,
)
from scpert_dist.errors import ShardError

REAL_GCTX = Path("lincs/original/modzs_n272x978.gctx")
REAL_PARQUET = Path("lincs/l1000_cmapR_modz_level5_n272x978.parquet")


def _cmappy():
    if not hasattr(np, "string_"):
        np.string_ = np.bytes_  # cmapPy 4.0.1 under numpy 2 (see STACK.md)
    from cmapPy.pandasGEXpress.GCToo import GCToo
    from cmapPy.pandasGEXpress.write_gct import write as write_gct
    from cmapPy.pandasGEXpress.write_gctx import write as write_gctx

    return GCToo, write_gct, write_gctx


def fail_after(k: int):
    """An on_shard callback that crashes the ingest after `k` shards of this run (not after the last)."""
    def on_shard(n_written: int, index: int, n_shards: int) -> None:
        if n_written >= k and index + 1 < n_shards:
            raise RuntimeError(f"injected failure after {n_written} shard(s)")
    return on_shard


def read_shards(out: Path) -> pd.DataFrame:
    return pq.read_table(shard_paths(out)).to_pandas()


def no_output(out: Path) -> bool:
    return not out.exists() or not (list(out.glob("shard-*.parquet")) or (out / S.MANIFEST).exists()
                                    or (out / "_progress.json").exists())




# ------------------------------------------------------------------------------ a simulator-style bulk fixture
def write_sim_bulk(folder: Path, n_sig: int = 250, n_genes: int = 40, n_lm: int = 30, seed: int = 0,
                   dose_unit: str = "uM") -> dict:
    """GCTX (cmapPy write_gctx) + siginfo.txt (GSE92742 columns) + geneinfo.txt + compounds.txt, as the simulator
    writes them."""
    GCToo, _, write_gctx = _cmappy()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genes = [str(1000 + 7 * i) for i in range(n_genes)]
    sigs = [f"SIM:{i:05d}" for i in range(n_sig)]
    x = rng.normal(size=(n_genes, n_sig)).astype(np.float32)
    ptype = np.array(["trt_cp"] * n_sig, dtype=object)
    ptype[::10] = "ctl_vehicle"
    ptype[5::25] = "trt_sh"  # dropped, with a count printed
    pid = np.array([f"BRD-K{(i % 7):08d}" for i in range(n_sig)], dtype=object)
    pid[ptype == "ctl_vehicle"] = "DMSO"
    dose = np.array([["10 uM", "500 nM", "1.11 uM"][i % 3] for i in range(n_sig)], dtype=object)
    if dose_unit != "uM":
        dose[1] = f"3 {dose_unit}"
    dose[ptype == "ctl_vehicle"] = "-666"
    sig = pd.DataFrame({"sig_id": sigs, "pert_id": pid, "pert_iname": [p.lower() for p in pid],
                        "pert_type": ptype, "cell_id": [f"CL{i % 5}" for i in range(n_sig)], "pert_idose": dose,
                        "pert_itime": [["6 h", "24 h"][i % 2] for i in range(n_sig)],
                        "scpert_semi_synthetic": 1, "scpert_metadata": "simulator test fixture"})
    gene = pd.DataFrame({"pr_gene_id": genes, "pr_gene_symbol": [f"G{g}" for g in genes],
                         "pr_is_lm": [1] * n_lm + [0] * (n_genes - n_lm)})
    comp = pd.DataFrame({"pert_id": [f"BRD-K{i:08d}" for i in range(7)],
                         "canonical_smiles": ["C" * (i + 1) + "O" for i in range(7)]})
    data = pd.DataFrame(x, index=pd.Index(genes, name="rid"), columns=pd.Index(sigs, name="cid"))
    rmeta = pd.DataFrame({"pr_gene_symbol": gene["pr_gene_symbol"].to_numpy()}, index=data.index)
    cmeta = pd.DataFrame({"pert_id": pid}, index=data.columns)
    write_gctx(GCToo(data_df=data, row_metadata_df=rmeta, col_metadata_df=cmeta), str(folder / "bulk.gctx"))
    sig.to_csv(folder / "siginfo.txt", sep="\t", index=False)
    gene.to_csv(folder / "geneinfo.txt", sep="\t", index=False)
    comp.to_csv(folder / "compounds.txt", sep="\t", index=False)
    return {"gctx": folder / "bulk.gctx", "siginfo": folder / "siginfo.txt", "geneinfo": folder / "geneinfo.txt",
            "compounds": folder / "compounds.txt", "x": x, "sig": sig, "gene": gene, "comp": comp}


@pytest.fixture
def sim(tmp_path) -> dict:
    return write_sim_bulk(tmp_path / "sim")


def test_simulator_style_gctx(sim, tmp_path, capsys):
    out = tmp_path / "shards"
    man = ingest_gctx(sim["gctx"], out, siginfo=sim["siginfo"], geneinfo=sim["geneinfo"],
                      compounds=sim["compounds"], rows_per_shard=64)
    sig, gene = sim["sig"], sim["gene"]
    kept = sig[sig.pert_type.isin(["trt_cp", "ctl_vehicle"])]
    assert f"dropped {int((~sig.pert_type.isin(['trt_cp', 'ctl_vehicle'])).sum())} signatures" in capsys.readouterr().out
    assert man["n_rows"] == len(kept) and sum(s["rows"] for s in man["shards"]) == len(kept)
    assert man["genes"] == gene.pr_gene_id[gene.pr_is_lm == 1].tolist()
    assert man["semi_synthetic"] is True and "simulator test fixture" in man["metadata"]
    verify_shards(out)
    df = read_shards(out)
    assert df.sig_id.tolist() == kept.sig_id.tolist()
    # values: the landmark rows of the matrix, per signature
    col = {s: i for i, s in enumerate(sig.sig_id)}
    want = sim["x"][: len(man["genes"])][:, [col[s] for s in df.sig_id]].T
    np.testing.assert_array_equal(np.stack(df[S.EXPR].to_numpy()), want)
    trt = df[df.pert_type == "trt_cp"]
    exp_dose = kept.set_index("sig_id").loc[trt.sig_id, "pert_idose"].map({"10 uM": 10, "500 nM": 0.5, "1.11 uM": 1.11})
    np.testing.assert_allclose(trt.dose_um.to_numpy(), exp_dose.to_numpy(), rtol=1e-6)
    assert df[df.pert_type == "ctl_vehicle"].dose_um.isna().all()
    smi = dict(zip(sim["comp"].pert_id, sim["comp"].canonical_smiles, strict=True))
    assert trt.smiles.tolist() == [smi[p] for p in trt.pert_id]
    # global vocabularies: indices agree with ids across all shards
    assert (np.array(man["cells"])[df.cell_idx] == df.cell_id).all()
    assert (np.array(man["drugs"])[df.drug_idx] == df.pert_id).all()
    f = pq.ParquetFile(out / man["shards"][0]["file"])
    assert str(f.schema_arrow.field(S.EXPR).type) == "fixed_size_list<element: float>[30]"
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"


def test_float16_and_all_genes(sim, tmp_path):
    out = tmp_path / "f16"
    man = ingest_gctx(sim["gctx"], out, siginfo=sim["siginfo"], all_genes=True, dtype="float16")
    df = read_shards(out)
    assert man["n_genes"] == 40 and man["expr_dtype"] == "float16"
    col = {s: i for i, s in enumerate(sim["sig"].sig_id)}
    want = sim["x"][:, [col[s] for s in df.sig_id]].T
    np.testing.assert_allclose(np.stack(df[S.EXPR].to_numpy()).astype(np.float32), want, atol=4e-3)


def test_resume_after_crash(sim, tmp_path):
    kw = dict(siginfo=sim["siginfo"], geneinfo=sim["geneinfo"], compounds=sim["compounds"], rows_per_shard=50)
    ref = tmp_path / "ref"
    ref_man = ingest_gctx(sim["gctx"], ref, **kw)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected failure"):
        ingest_gctx(sim["gctx"], out, on_shard=fail_after(2), **kw)
    assert not (out / S.MANIFEST).exists()
    first = sorted(out.glob("shard-*.parquet"))
    # shards 0, 1 recorded; a shard whose write was in flight at the crash is finished and recorded too
    assert [p.name for p in first][:2] == ["shard-00000.parquet", "shard-00001.parquet"] and len(first) < 5
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}
    man = ingest_gctx(sim["gctx"], out, **kw)
    assert {p.name: p.stat().st_mtime_ns for p in first} == mtimes  # completed shards were not rewritten
    assert not (out / "_progress.json").exists()
    strip = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert strip(man) == strip(ref_man)
    pd.testing.assert_frame_equal(read_shards(out), read_shards(ref))


def test_corrupt_shard_named_and_rebuilt(sim, tmp_path, capsys):
    out = tmp_path / "out"
    kw = dict(siginfo=sim["siginfo"], geneinfo=sim["geneinfo"], rows_per_shard=50)
    man = ingest_gctx(sim["gctx"], out, **kw)
    bad = out / man["shards"][1]["file"]
    good = out / man["shards"][0]["file"]
    t_good = good.stat().st_mtime_ns
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError) as e:
        verify_shards(out)
    assert bad.name in str(e.value)
    capsys.readouterr()
    ingest_gctx(sim["gctx"], out, **kw)
    assert f"shard {bad.name} fails its sha256 check" in capsys.readouterr().out
    verify_shards(out)
    assert good.stat().st_mtime_ns == t_good


# ------------------------------------------------------------------------------ real files
@pytest.mark.shared_data
def test_real_gctx_matches_sources_md(shared_data, tmp_path):
    out = tmp_path / "real"
    man = ingest_gctx(shared_data / REAL_GCTX, out, metadata=shared_data, rows_per_shard=100,
                      compounds=shared_data / "drugs/lincs2015_pertinfo_trt_cp_dhimmel.parquet")
    lm = pd.read_csv(shared_data / "lincs/l1000_landmark_genes.csv", dtype=str).sort_values(
        "position", key=lambda s: s.astype(int))
    assert man["n_rows"] == 272 and man["genes"] == lm.gene_id.tolist() and len(man["shards"]) == 3
    assert man["semi_synthetic"] is False
    with h5py.File(shared_data / REAL_GCTX) as f:  # orientation: HDF5 rows are the 272 signatures
        assert f["0/DATA/0/matrix"].shape == (272, 978)
    df = read_shards(out)
    assert df.pert_iname.value_counts().to_dict() == {"vemurafenib": 140, "atorvastatin": 94, "venlafaxine": 38}
    assert len(man["cells"]) == 65 == df.cell_id.nunique()
    assert (df.dose_um == 10).sum() == 218
    assert (df.time_h == 6).sum() == 183 and (df.time_h == 24).sum() == 87  # 2 are '6 h & 4 h' (NEU.KCL) -> NaN
    ref = pd.read_parquet(shared_data / REAL_PARQUET).set_index("sig_id").loc[df.sig_id]
    np.testing.assert_array_equal(np.stack(df[S.EXPR].to_numpy()), ref[man["genes"]].to_numpy(np.float32))
    pert = pd.read_parquet(shared_data / "drugs/lincs2015_pertinfo_trt_cp_dhimmel.parquet")
    known = dict(zip(pert.pert_id, pert.canonical_smiles, strict=True))
    assert df.smiles.tolist() == [known.get(p) for p in df.pert_id]


@pytest.mark.shared_data
def test_real_tables_via_cli(shared_data, tmp_path, monkeypatch, capsys):
    lm = pd.read_csv(shared_data / "lincs/l1000_landmark_genes.csv", dtype=str).gene_id.tolist()
    cases = {  # file -> (extra args, expected rows, expected genes)
        "l1000_cmapR_modz_level5_n272x978.parquet": ([], 272, lm),
        "l1000_transigen_example_pairs_n200x978.parquet": ([], 200, lm),
        "l1000_transigen_basal_modz_x1_n165x978.parquet": ([], 165, lm),
        "l1000_signatureSearch_sampledb_SKB_n100x5000.parquet": (["--all-genes"], None, None),
    }
    for name, (extra, rows, genes) in cases.items():
        src = pd.read_parquet(shared_data / "lincs" / name)
        out = tmp_path / name
        code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--table", shared_data / "lincs" / name,
                             "--out", out, "--metadata", shared_data, "--quiet", *extra)
        assert code == 0, text
        man, df = read_manifest(out), read_shards(out)
        kept = src[src.pert_type.isin(["trt_cp", "ctl_vehicle"])] if "pert_type" in src else src
        assert man["n_rows"] == (rows if rows is not None else len(kept)) == len(df)
        gcols = [c for c in src.columns if c.isdigit()]
        assert man["genes"] == (genes if genes is not None else gcols)
        np.testing.assert_array_equal(np.stack(df[S.EXPR].to_numpy()),
                                      kept[man["genes"]].to_numpy(np.float32))
    pairs = read_shards(tmp_path / "l1000_transigen_example_pairs_n200x978.parquet")
    assert (pairs.pert_type == "ctl_vehicle").sum() == 100 and pairs.smiles[pairs.pert_type == "trt_cp"].notna().all()
    # the 5,000-gene file has only some landmarks: the landmark panel is refused by name
    out = tmp_path / "skb_lm"
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--table",
                         shared_data / "lincs/l1000_signatureSearch_sampledb_SKB_n100x5000.parquet", "--out", out,
                         "--metadata", shared_data)
    assert code == 2 and "GeneMappingError" in text and no_output(out)


@pytest.mark.shared_data
def test_gct_round_trip(shared_data, tmp_path):
    GCToo, write_gct, _ = _cmappy()
    # cmapPy's parse() fails on this file (latin-1 'µ' in pert_idose), so the slice is built from h5py
    with h5py.File(shared_data / REAL_GCTX) as f:
        dec = lambda a: [v.decode("latin-1") if isinstance(v, bytes) else v for v in a]  # noqa: E731
        rid, cid = dec(f["0/META/ROW/id"][:]), dec(f["0/META/COL/id"][:40])
        data = pd.DataFrame(f["0/DATA/0/matrix"][:40].T, index=pd.Index(rid, name="rid"),
                            columns=pd.Index(cid, name="cid"))
        rmeta = pd.DataFrame({k: dec(v[:]) for k, v in f["0/META/ROW"].items() if k != "id"}, index=data.index)
        cmeta = pd.DataFrame({k: dec(v[:40]) for k, v in f["0/META/COL"].items() if k != "id"}, index=data.columns)
    sl = GCToo(data_df=data, row_metadata_df=rmeta, col_metadata_df=cmeta)
    write_gct(sl, str(tmp_path / "slice.gct"))
    man = ingest_gctx(tmp_path / "slice.gct", tmp_path / "gct", metadata=shared_data)
    man_x = ingest_gctx(shared_data / REAL_GCTX, tmp_path / "gctx", metadata=shared_data)
    a, b = read_shards(tmp_path / "gct"), read_shards(tmp_path / "gctx").iloc[:40].reset_index(drop=True)
    assert man["genes"] == man_x["genes"] and a.sig_id.tolist() == b.sig_id.tolist()
    assert (a.dose_um.fillna(-1) == b.dose_um.fillna(-1)).all() and a.cell_id.tolist() == b.cell_id.tolist()
    np.testing.assert_allclose(np.stack(a[S.EXPR].to_numpy()), np.stack(b[S.EXPR].to_numpy()), atol=1e-4)


# ------------------------------------------------------------------------------ bad inputs via the CLI
def _bad_inputs(sim: dict, tmp: Path) -> dict:
    """name -> (cli args without --out, expected error class name)."""
    cases = {}
    tmp.mkdir(parents=True, exist_ok=True)
    cases["missing_file"] = (["--gctx", tmp / "nope.gctx"], "InputFileError")
    trunc = tmp / "trunc.gctx"
    trunc.write_bytes(sim["gctx"].read_bytes()[:3000])
    cases["truncated_gctx"] = (["--gctx", trunc, "--siginfo", sim["siginfo"], "--geneinfo", sim["geneinfo"]],
                               "InputFileError")
    nothdf = tmp / "text.gctx"
    nothdf.write_text("not an hdf5 file\n")
    cases["not_hdf5"] = (["--gctx", nothdf], "InputFileError")
    GCToo, write_gct, _ = _cmappy()
    from cmapPy.pandasGEXpress.parse import parse

    g = parse(str(sim["gctx"]))
    good_gct = tmp / "good.gct"
    write_gct(g, str(good_gct))
    lines = good_gct.read_text().splitlines(keepends=True)
    bad_v = tmp / "badver.gct"
    bad_v.write_text("#1.4\n" + "".join(lines[1:]))
    cases["gct_bad_version"] = (["--gctx", bad_v, "--siginfo", sim["siginfo"]], "InputFileError")
    bad_d = tmp / "baddims.gct"
    bad_d.write_text(lines[0] + "40\tx\t1\t1\n" + "".join(lines[2:]))
    cases["gct_bad_dims"] = (["--gctx", bad_d, "--siginfo", sim["siginfo"]], "InputFileError")
    s = sim["sig"]
    s.drop(columns=["pert_type"]).to_csv(tmp / "sig_nocol.txt", sep="\t", index=False)
    cases["missing_meta_column"] = (["--gctx", sim["gctx"], "--siginfo", tmp / "sig_nocol.txt",
                                     "--geneinfo", sim["geneinfo"]], "MetadataError")
    s2 = s.copy()
    s2.loc[3, "pert_idose"] = "5 ug/ml"
    s2.to_csv(tmp / "sig_unit.txt", sep="\t", index=False)
    cases["unknown_dose_unit"] = (["--gctx", sim["gctx"], "--siginfo", tmp / "sig_unit.txt",
                                   "--geneinfo", sim["geneinfo"]], "MetadataError")
    s3 = pd.concat([s, s.iloc[[7]]])
    s3.to_csv(tmp / "sig_dup.txt", sep="\t", index=False)
    cases["duplicate_sig_in_table"] = (["--gctx", sim["gctx"], "--siginfo", tmp / "sig_dup.txt",
                                        "--geneinfo", sim["geneinfo"]], "MetadataError")
    dup = tmp / "dup.gctx"
    shutil.copy(sim["gctx"], dup)
    with h5py.File(dup, "r+") as f:
        ids = f["0/META/COL/id"][:]
        ids[9] = ids[8]
        f["0/META/COL/id"][:] = ids
    cases["duplicate_sig_in_matrix"] = (["--gctx", dup, "--siginfo", sim["siginfo"], "--geneinfo", sim["geneinfo"]],
                                        "MetadataError")
    nan = tmp / "nan.gctx"
    shutil.copy(sim["gctx"], nan)
    with h5py.File(nan, "r+") as f:  # NaN late in the file: shards already written must be removed again
        m = f["0/DATA/0/matrix"]
        row = m[231]
        row[2] = np.inf
        m[231] = row
    cases["inf_in_matrix"] = (["--gctx", nan, "--siginfo", sim["siginfo"], "--geneinfo", sim["geneinfo"],
                               "--rows-per-shard", "50"], "ValueRangeError")
    g2 = sim["gene"].copy()
    g2.loc[0, "pr_gene_id"] = "999999"  # a landmark that is not in the matrix
    g2.to_csv(tmp / "gene_bad.txt", sep="\t", index=False)
    cases["landmark_not_in_matrix"] = (["--gctx", sim["gctx"], "--siginfo", sim["siginfo"],
                                        "--geneinfo", tmp / "gene_bad.txt"], "GeneMappingError")
    cases["no_landmark_info"] = (["--gctx", sim["gctx"], "--siginfo", sim["siginfo"]], "GeneMappingError")
    cases["bad_dtype"] = (["--gctx", sim["gctx"], "--siginfo", sim["siginfo"], "--dtype", "int8"], "ConfigError")
    cases["bad_level"] = (["--gctx", sim["gctx"], "--siginfo", sim["siginfo"], "--level", "7"], "ConfigError")
    cases["bad_zscore"] = (["--gctx", sim["gctx"], "--siginfo", sim["siginfo"], "--zscore", "dmso"], "ConfigError")
    cases["inst_info_with_table"] = (["--table", tmp / "nope.parquet", "--inst-info", sim["siginfo"]], "InputFileError")
    return cases


def test_bad_inputs_exit_2_named_no_output(sim, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SCPERT_METADATA", raising=False)
    cases = _bad_inputs(sim, tmp_path / "bad")
    for name, (args, err) in cases.items():
        out = tmp_path / "out" / name
        code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--out", out, *args)
        assert code == 2, (name, text)
        assert f"error: {err}" in text, (name, text)
        assert no_output(out), (name, os.listdir(out))
    # unwritable output folder (a path below a regular file)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--out", blocker / "sub", "--gctx", sim["gctx"],
                         "--siginfo", sim["siginfo"], "--geneinfo", sim["geneinfo"])
    assert code == 2 and "error: OutputError" in text and str(blocker / "sub") in text


def test_cli_success_prints_summary(sim, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--gctx", sim["gctx"], "--out", out, "--siginfo",
                         sim["siginfo"], "--geneinfo", sim["geneinfo"], "--compounds", sim["compounds"], "--quiet")
    assert code == 0, text
    man = json.loads((out / S.MANIFEST).read_text())
    assert f"{man['n_rows']} signatures x 30 genes" in text
    assert [s["name"] for s in man["sources"]] == ["bulk.gctx", "siginfo.txt", "geneinfo.txt", "compounds.txt"]


def test_ingest_table_csv_semi_synthetic_marker(tmp_path):
    rng = np.random.default_rng(1)
    genes = ["11", "22", "33"]
    df = pd.DataFrame(rng.normal(size=(6, 3)), columns=genes)
    df.insert(0, "sig_id", [f"s{i}" for i in range(6)])
    df.insert(1, "cell_id", ["A549", "MCF7"] * 3)
    df.insert(2, "pert_type", ["trt_cp", "ctl_vehicle"] * 3)
    df.insert(3, "pert_id", ["BRD-1", "DMSO"] * 3)
    df.insert(4, "pert_idose", ["10 uM", "-666"] * 3)
    df.to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "SEMI_SYNTHETIC.txt").write_text("simulated\n")
    man = ingest_table(tmp_path / "m.csv", tmp_path / "o", all_genes=True, progress=False)
    assert man["semi_synthetic"] is True and man["genes"] == genes and man["drugs"] == ["BRD-1", "DMSO"]
    assert ingest_table(tmp_path / "m.csv", tmp_path / "o2", all_genes=True, semi_synthetic=False,
                        progress=False)["semi_synthetic"] is False
    out = read_shards(tmp_path / "o")
    np.testing.assert_allclose(np.stack(out[S.EXPR].to_numpy()), df[genes].to_numpy(np.float32))


@pytest.mark.slow
@pytest.mark.ray
def test_bench_ingest_small(tmp_path, ray_local):
    from scpert_dist.bench.ingest import run_ingest_bench

    r = run_ingest_bench(rows=3000, genes=200, rows_per_shard=1000, workdir=tmp_path, verbose=False,
                         warmup=False, workers=(1, 2), repeats=1)
    assert r["raw_mb_s"] > 0 and r["ingest_mb_s"] > 0 and r["ray_fixed_size_list_rows_s"] > 0
    assert r["raw_over_ingest"] == pytest.approx(r["raw_mb_s"] / r["ingest_mb_s"])
    par = r["parallel"]
    assert par["same_shards"] and set(par["workers"]) == {1, 2} and par["speedup"][1] == 1.0
    assert all(v["rows_s"] > 0 and v["cpu_s"] > 0 for v in par["workers"].values())


def test_beta_style_tables_give_the_same_shards(sim, tmp_path):
    """CMap 2020 beta siginfo_beta/geneinfo_beta (numeric dose + unit, cmap_name, cell_iname, feature_space)."""
    s = sim["sig"]
    num = {"10 uM": (10.0, "uM"), "500 nM": (500.0, "nM"), "1.11 uM": (1.11, "uM"), "-666": (-666, "")}
    beta = pd.DataFrame({"sig_id": s.sig_id, "pert_id": s.pert_id, "cmap_name": s.pert_iname,
                         "pert_type": s.pert_type, "cell_iname": s.cell_id,
                         "pert_dose": [num[d][0] for d in s.pert_idose],
                         "pert_dose_unit": [num[d][1] for d in s.pert_idose],
                         "pert_time": [float(t.split()[0]) for t in s.pert_itime], "pert_time_unit": "h"})
    beta.to_csv(tmp_path / "siginfo_beta.txt", sep="\t", index=False)
    g = sim["gene"]
    pd.DataFrame({"gene_id": g.pr_gene_id, "gene_symbol": g.pr_gene_symbol,
                  "feature_space": np.where(g.pr_is_lm == 1, "landmark", "inferred")}).to_csv(
        tmp_path / "geneinfo_beta.txt", sep="\t", index=False)
    a = ingest_gctx(sim["gctx"], tmp_path / "beta", siginfo=tmp_path / "siginfo_beta.txt",
                    geneinfo=tmp_path / "geneinfo_beta.txt", progress=False)
    b = ingest_gctx(sim["gctx"], tmp_path / "gse", siginfo=sim["siginfo"], geneinfo=sim["geneinfo"], progress=False)
    assert a["genes"] == b["genes"] and a["cells"] == b["cells"] and a["drugs"] == b["drugs"]
    assert "CMap2020-beta" in a["metadata"] and "GSE92742" in b["metadata"]
    da, db = read_shards(tmp_path / "beta"), read_shards(tmp_path / "gse")
    pd.testing.assert_frame_equal(da.drop(columns=[S.EXPR]), db.drop(columns=[S.EXPR]))
    np.testing.assert_array_equal(np.stack(da[S.EXPR].to_numpy()), np.stack(db[S.EXPR].to_numpy()))


def test_transposed_gctx_and_small_read_blocks(sim, tmp_path):
    """A GCTX stored genes x signatures (cmapPy's view) gives the same shards; reading in slabs smaller than a
    shard, across dropped signatures, gives the same rows as one read."""
    from scpert_dist.data.readers.l1000 import gctx_source as _gctx_source
    from scpert_dist.data.readers.l1000 import read_rows

    tr = tmp_path / "transposed.gctx"
    shutil.copy(sim["gctx"], tr)
    with h5py.File(tr, "r+") as f:
        m = f["0/DATA/0/matrix"][:]
        del f["0/DATA/0/matrix"]
        f["0/DATA/0/matrix"] = np.ascontiguousarray(m.T)
    kw = dict(siginfo=sim["siginfo"], geneinfo=sim["geneinfo"], progress=False)
    ingest_gctx(sim["gctx"], tmp_path / "a", **kw)
    ingest_gctx(tr, tmp_path / "b", **kw)
    pd.testing.assert_frame_equal(read_shards(tmp_path / "a"), read_shards(tmp_path / "b"))
    src = _gctx_source(sim["gctx"])
    rows = np.flatnonzero(sim["sig"].pert_type.isin(["trt_cp", "ctl_vehicle"]).to_numpy())
    gsel = np.array([3, 1, 2])
    small, _ = read_rows(src, rows, gsel, block=7)
    whole, _ = read_rows(src, rows, gsel, block=10_000)
    src.close()
    np.testing.assert_array_equal(small, whole)
    np.testing.assert_array_equal(whole, sim["x"][gsel][:, rows].T)
