"""Fuzzing the L1000 readers and the ingest with hypothesis, seeded from small copies of real files (a GCT with the
first genes and wells of the CPC006 plate, a GCTX subset of its level-4 file written with h5py, a .gct.gz subset of
the LJP009 level-4 plate, an .h5ad subset of the HT115 level-3 plate, a GCT subset of the 489-landmark MCF7 plate
with its calibration analytes, a GCTX subset of the probe-id level-4 file) and scPerturb's E-distance table (a
CSV subset): truncation, flipped bytes, dropped / renamed metadata, duplicated ids, NaN blocks.

Every case either reads correctly or raises a ScpertError subclass, never another exception, and a failed ingest
leaves nothing in its output folder. ~200 cases here; `SCPERT_FUZZ_EXAMPLES=N` runs N more per seed in the slow
test."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scpert_dist.data.readers.l1000 import read_l1000
from scpert_dist.data.readers.scperturb import read_scperturb_table
from scpert_dist.data.shards.format import LOCK, PROGRESS, verify_shards
from scpert_dist.data.shards.ingest import ingest_gctx
from scpert_dist.errors import ScpertError

pytestmark = pytest.mark.shared_data

N_GENES, N_WELLS = 60, 24
KINDS = ("truncate", "flip", "drop_meta", "rename_meta", "dup_sig", "dup_gene", "nan_block")
CI_EXAMPLES = {"gct": 70, "gctx": 70, "gctgz": 60, "h5ad": 12, "partial": 25, "probes": 20}
CSV_EXAMPLES = 40
EXTRA = int(os.environ.get("SCPERT_FUZZ_EXAMPLES", "0"))


# ------------------------------------------------------------------------------ seeds from the real files
def _gct_subset(text: str, n_genes: int, n_wells: int) -> str:
    lines = text.splitlines()
    _, _, n_rmeta, n_cmeta = map(int, lines[1].split("\t"))
    keep = 1 + n_rmeta + n_wells
    body = [ln.split("\t")[:keep] for ln in lines[2:3 + n_cmeta + n_genes]]
    return "\n".join([lines[0], f"{n_genes}\t{n_wells}\t{n_rmeta}\t{n_cmeta}", *("\t".join(c) for c in body)]) + "\n"


def _gctx_subset(src: Path, dest: Path, n_genes: int, n_wells: int) -> None:
    with h5py.File(src) as f, h5py.File(dest, "w") as g:
        g["0/DATA/0/matrix"] = f["0/DATA/0/matrix"][:n_wells, :n_genes]
        for grp, n in (("0/META/COL", n_wells), ("0/META/ROW", n_genes)):
            for k, ds in f[grp].items():
                g[f"{grp}/{k}"] = ds[:n]


@pytest.fixture(scope="module")
def seeds(shared_data, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fuzz_seeds")
    cpc = shared_data / "lincs/plates/CPC006_A375_6H_X1"
    (d / "seed.gct").write_text(_gct_subset((cpc / "gctv13_01.gct").read_text(), N_GENES, N_WELLS))
    _gctx_subset(cpc / "gctv13_01_zs.gctx", d / "seed.gctx", N_GENES, N_WELLS)
    ljp = shared_data / "lincs/plates/LJP009_A375_24H_X1_B20/LJP009_A375_24H_X1_B20_ZSPCQNORM_n371x978.gct.gz"
    with gzip.open(ljp, "rt") as fh:
        (d / "seed.gct.gz").write_bytes(gzip.compress(_gct_subset(fh.read(), N_GENES, N_WELLS).encode()))
    _h5ad_subset(shared_data / "lincs/plates/CPC006_HT115_6H_X1_X2/PRnet_demo_CPC006_HT115_6H_level3_n681x978.h5ad",
                 d / "seed.h5ad", N_GENES, N_WELLS)
    muc = shared_data / "lincs/plates/MUC.CP007_MCF7_24H_X1_B22/gex2norm_QNORM_n192x500.gct"
    (d / "partial.gct").write_text(_gct_subset(muc.read_text(), N_GENES, N_WELLS))  # its first 11 rows: CAL01..
    _gctx_subset(shared_data / "lincs/other/zs_with_rep_n9x22268.gctx", d / "probes.gctx", 300, 9)
    edist = pd.read_csv(shared_data / "sciplex/real/scperturb/pairwise_edist_SrivatsanTrapnell2020_sciplex3.csv",
                        index_col=0)
    edist.iloc[:30, :30].to_csv(d / "seed_edist.csv")
    return {"gct": d / "seed.gct", "gctx": d / "seed.gctx", "gctgz": d / "seed.gct.gz", "h5ad": d / "seed.h5ad",
            "partial": d / "partial.gct", "probes": d / "probes.gctx", "csv": d / "seed_edist.csv"}


def _h5ad_subset(src: Path, dest: Path, n_genes: int, n_wells: int) -> None:
    """Wells of both replicate plates and two DMSO wells, the first genes (symbols; mapped via the metadata)."""
    import anndata as ad

    a = ad.read_h5ad(src)
    veh = np.flatnonzero(a.obs.pert_type.astype(str).to_numpy() == "ctl_vehicle")[:2]
    rows = np.concatenate([np.arange(n_wells - 2), veh])
    a[rows, :n_genes].copy().write_h5ad(dest)


# ------------------------------------------------------------------------------ mutations
def _mutate_bytes(raw: bytes, kind: str, data) -> bytes:
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]
    out = bytearray(raw)
    for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8), label="flips"):
        out[pos] ^= data.draw(st.integers(1, 255), label="xor")
    return bytes(out)


def _mutate_gct_text(text: str, kind: str, data) -> str:
    lines = text.splitlines()
    n_rows, n_cols, n_rmeta, n_cmeta = map(int, lines[1].split("\t"))
    cells = [ln.split("\t") for ln in lines[2:]]
    meta_rows = list(range(1, 1 + n_cmeta))
    data_rows = list(range(1 + n_cmeta, len(cells)))
    if kind == "drop_meta":
        drop = data.draw(st.sampled_from(meta_rows), label="drop")
        cells.pop(drop)
        n_cmeta -= 1
    elif kind == "rename_meta":
        i = data.draw(st.sampled_from(meta_rows), label="rename")
        cells[i][0] = data.draw(st.sampled_from(["pert_tpye", "x", cells[i][0].upper(), ""]), label="name")
    elif kind == "dup_sig":
        a, b = data.draw(st.lists(st.integers(1 + n_rmeta, n_rmeta + n_cols), min_size=2, max_size=2,
                                  unique=True), label="cols")
        cells[0][b] = cells[0][a]
    elif kind == "dup_gene":
        a, b = data.draw(st.lists(st.sampled_from(data_rows), min_size=2, max_size=2, unique=True), label="rows")
        cells[b][0] = cells[a][0]
    elif kind == "nan_block":
        r0 = data.draw(st.sampled_from(data_rows), label="r0")
        c0 = data.draw(st.integers(1 + n_rmeta, n_rmeta + n_cols), label="c0")
        for r in range(r0, min(r0 + 3, len(cells))):
            for c in range(c0, min(c0 + 4, len(cells[r]))):
                cells[r][c] = data.draw(st.sampled_from(["NaN", "nan", "", "inf"]), label="nan")
    return "\n".join([lines[0], f"{n_rows}\t{n_cols}\t{n_rmeta}\t{n_cmeta}", *("\t".join(c) for c in cells)]) + "\n"


def _mutate_gctx(path: Path, kind: str, data) -> None:
    with h5py.File(path, "r+") as f:
        col = f["0/META/COL"]
        names = sorted(k for k in col if k != "id")
        if kind in ("drop_meta", "rename_meta"):
            k = data.draw(st.sampled_from(names), label="meta")
            if kind == "rename_meta":
                col.move(k, data.draw(st.sampled_from([k.upper(), f"{k}_x", "pert_tpye"]), label="to"))
            else:
                del col[k]
        elif kind in ("dup_sig", "dup_gene"):
            ds = f["0/META/COL/id" if kind == "dup_sig" else "0/META/ROW/id"]
            a, b = data.draw(st.lists(st.integers(0, len(ds) - 1), min_size=2, max_size=2, unique=True), label="ab")
            ids = ds[:]
            ids[b] = ids[a]
            ds[:] = ids
            if kind == "dup_gene" and "pr_gene_id" in f["0/META/ROW"]:
                g = f["0/META/ROW/pr_gene_id"][:]
                g[b] = g[a]
                f["0/META/ROW/pr_gene_id"][:] = g
        elif kind == "nan_block":
            m = f["0/DATA/0/matrix"]
            r0, c0 = data.draw(st.integers(0, m.shape[0] - 1), label="r0"), data.draw(st.integers(0, m.shape[1] - 1))
            block = m[r0:r0 + 3, c0:c0 + 5]
            block[:] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
            m[r0:r0 + 3, c0:c0 + 5] = block


def _mutate_h5ad(path: Path, kind: str, data) -> None:
    import anndata as ad

    a = ad.read_h5ad(path)
    if kind in ("drop_meta", "rename_meta"):
        k = data.draw(st.sampled_from(sorted(a.obs.columns)), label="obs")
        if kind == "drop_meta":
            a.obs = a.obs.drop(columns=[k])
        else:
            a.obs = a.obs.rename(columns={k: data.draw(st.sampled_from([k.upper(), f"{k}_x", "pert_tpye"]))})
    elif kind in ("dup_sig", "dup_gene"):
        names = list(a.obs_names if kind == "dup_sig" else a.var_names)
        i, j = data.draw(st.lists(st.integers(0, len(names) - 1), min_size=2, max_size=2, unique=True), label="ij")
        names[j] = names[i]
        if kind == "dup_sig":
            a.obs_names = names
        else:
            a.var_names = names
    elif kind == "nan_block":
        x = np.array(a.X)
        r0, c0 = data.draw(st.integers(0, x.shape[0] - 1), label="r0"), data.draw(st.integers(0, x.shape[1] - 1))
        x[r0:r0 + 3, c0:c0 + 4] = data.draw(st.sampled_from([np.nan, np.inf]), label="value")
        a.X = x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about the non-unique names it is asked to write
        a.write_h5ad(path)


def make_case(seed: Path, kind: str, data, folder: Path) -> Path:
    dest = folder / seed.name
    raw = seed.read_bytes()
    if kind in ("truncate", "flip"):
        dest.write_bytes(_mutate_bytes(raw, kind, data))
    elif seed.suffix == ".h5ad":
        dest.write_bytes(raw)
        _mutate_h5ad(dest, kind, data)
    elif seed.suffix == ".gctx":
        dest.write_bytes(raw)
        _mutate_gctx(dest, kind, data)
    elif seed.name.endswith(".gz"):
        dest.write_bytes(gzip.compress(_mutate_gct_text(gzip.decompress(raw).decode(), kind, data).encode()))
    else:
        dest.write_text(_mutate_gct_text(raw.decode(), kind, data))
    return dest


# ------------------------------------------------------------------------------ the property
def no_output(out: Path) -> bool:
    return not out.exists() or not any(out.glob("shard-*")) and not any(
        (out / n).exists() for n in ("manifest.json", PROGRESS, LOCK))


def check_case(path: Path, out: Path, metadata: Path | None = None) -> str:
    """Read and ingest one case; -> 'ok' or the error class name. Any non-ScpertError propagates (a failure).
    `metadata`: the landmark table's folder (maps an .h5ad's symbols and probe ids)."""
    try:
        t = read_l1000(path, metadata=metadata)
    except ScpertError:
        t = None
    else:
        assert t.values.shape == (len(t.meta), len(t.genes)) and t.values.dtype == np.float32
        assert np.isfinite(t.values).all() and np.abs(t.values).max() <= 10 and t.level in (3, 4, 5)
    try:
        man = ingest_gctx(path, out, all_genes=True, progress=False, metadata=metadata)
    except ScpertError as e:
        assert no_output(out), sorted(p.name for p in out.iterdir())
        return type(e).__name__
    assert t is not None, "the ingest accepted a file read_l1000 refused"
    verify_shards(out)
    assert not (out / LOCK).exists() and not (out / PROGRESS).exists()
    assert man["n_genes"] == len(t.genes) and man["n_rows"] <= len(t.meta)
    return "ok"


def _run(seed: Path, data, metadata: Path | None = None) -> None:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    with tempfile.TemporaryDirectory() as tmp:
        case = make_case(seed, kind, data, Path(tmp))
        check_case(case, Path(tmp) / "out", metadata)


def _fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_seeds_read_cleanly(seeds, tmp_path, shared_data):
    """The unmutated seeds are valid: level 3 (CPC006 GCT, HT115 .h5ad, the MCF7 partial plate) and level 4 (CPC006
    GCTX, LJP009 .gct.gz, the probe-id GCTX); the partial plate without its calibration analytes."""
    kinds = ("gct", "gctx", "gctgz", "h5ad", "partial", "probes")
    assert [read_l1000(seeds[k], metadata=shared_data).level for k in kinds] == [3, 4, 4, 3, 3, 4]
    assert read_l1000(seeds["partial"]).values.shape == (N_WELLS, N_GENES - 10)  # CAL01..CAL10 dropped
    for k in kinds:
        assert check_case(seeds[k], tmp_path / k, shared_data) == "ok"
    assert read_scperturb_table(seeds["csv"]).values.shape == (30, 30)


@pytest.mark.parametrize("seed", list(CI_EXAMPLES))
def test_fuzz_readers(seeds, seed, shared_data):
    @_fuzz(CI_EXAMPLES[seed])
    @given(data=st.data())
    def run(data):
        _run(seeds[seed], data, shared_data)

    run()


def _mutate_csv(text: str, kind: str, data) -> str:
    lines = text.splitlines()
    cells = [ln.split(",") for ln in lines]
    if kind in ("truncate", "flip"):
        return _mutate_bytes(text.encode(), kind, data).decode("utf-8", errors="replace")
    r = data.draw(st.integers(1, len(cells) - 1), label="row")
    c = data.draw(st.integers(1, len(cells[0]) - 1), label="col")
    if kind == "rename_label":
        cells[r][0] = data.draw(st.sampled_from(["", "control", cells[r][0] + "x", cells[1][0]]), label="name")
    elif kind == "rename_column":
        cells[0][c] = data.draw(st.sampled_from(["", "control", cells[0][c] + "x"]), label="name")
    elif kind == "drop_row":
        cells.pop(r)
    elif kind == "nan_block":
        for rr in range(r, min(r + 2, len(cells))):
            cells[rr][c] = data.draw(st.sampled_from(["nan", "", "inf", "x"]), label="value")
    elif kind == "reorder":  # valid: the rows in another order than the columns
        body = cells[1:]
        order = data.draw(st.permutations(range(len(body))), label="order")
        cells = [cells[0], *(body[i] for i in order)]
    elif kind == "asymmetric":
        cells[r][c] = str(float(cells[r][c] or 0) + data.draw(st.floats(1e-3, 5.0), label="delta"))
    return "\n".join(",".join(x) for x in cells) + "\n"


CSV_KINDS = ("truncate", "flip", "rename_label", "rename_column", "drop_row", "nan_block", "asymmetric", "reorder")


def test_fuzz_scperturb_table(seeds):
    """Every corrupt scPerturb table either reads as a square, symmetric, finite table with a control row, or
    raises a named error."""
    text = seeds["csv"].read_text()
    outcomes = set()

    @_fuzz(CSV_EXAMPLES + EXTRA)
    @given(data=st.data())
    def run(data):
        kind = data.draw(st.sampled_from(CSV_KINDS + ("reorder",) * 3), label="kind")  # some valid cases too
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "case_edist.csv"
            p.write_text(_mutate_csv(text, kind, data))
            try:
                t = read_scperturb_table(p)
            except ScpertError as e:
                outcomes.add(type(e).__name__)
                return
            n = len(t.names)
            assert t.values.shape == (n, n) and np.isfinite(t.values).all() and np.allclose(t.values, t.values.T)
            assert t.control in t.names and len(set(t.names)) == n
            outcomes.add("ok")

    run()
    assert "ok" in outcomes and len(outcomes - {"ok"}) >= 2, outcomes


@pytest.mark.slow
@pytest.mark.skipif(EXTRA == 0, reason="set SCPERT_FUZZ_EXAMPLES=N to run N more cases per seed")
@pytest.mark.parametrize("seed", list(CI_EXAMPLES))
def test_fuzz_readers_long(seeds, seed, shared_data):
    @settings(max_examples=EXTRA, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def run(data):
        _run(seeds[seed], data, shared_data)

    run()


def test_fuzz_outcomes_cover_success_and_named_errors(seeds, tmp_path):
    """Not every mutation is fatal and not every one passes: the property is exercised on both sides."""
    outcomes = set()

    @_fuzz(40)
    @given(data=st.data())
    def run(data):
        kind = data.draw(st.sampled_from(KINDS), label="kind")
        with tempfile.TemporaryDirectory() as tmp:
            outcomes.add(check_case(make_case(seeds["gct"], kind, data, Path(tmp)), Path(tmp) / "out"))

    run()
    assert "ok" in outcomes and len(outcomes - {"ok"}) >= 2, outcomes
    shutil.rmtree(tmp_path, ignore_errors=True)
