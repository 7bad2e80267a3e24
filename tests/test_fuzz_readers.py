"""Fuzzing the L1000 readers and the ingest with hypothesis, seeded from small copies of real files (a GCT with the
first genes and wells of the CPC006 plate, a GCTX subset of its level-4 file written with h5py, a .gct.gz subset of
the LJP009 level-4 plate): truncation, flipped bytes, dropped / renamed metadata, duplicated ids, NaN blocks.

Every case either reads correctly or raises a ScpertError subclass, never another exception, and a failed ingest
leaves nothing in its output folder. ~200 cases here; `SCPERT_FUZZ_EXAMPLES=N` runs N more per seed in the slow
test."""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scpert_dist.data.readers.l1000 import read_l1000
from scpert_dist.data.shards.format import LOCK, PROGRESS, verify_shards
from scpert_dist.data.shards.ingest import ingest_gctx
from scpert_dist.errors import ScpertError

pytestmark = pytest.mark.shared_data

N_GENES, N_WELLS = 60, 24
KINDS = ("truncate", "flip", "drop_meta", "rename_meta", "dup_sig", "dup_gene", "nan_block")
CI_EXAMPLES = {"gct": 70, "gctx": 70, "gctgz": 60}
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
    return {"gct": d / "seed.gct", "gctx": d / "seed.gctx", "gctgz": d / "seed.gct.gz"}


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


def make_case(seed: Path, kind: str, data, folder: Path) -> Path:
    dest = folder / seed.name
    raw = seed.read_bytes()
    if kind in ("truncate", "flip"):
        dest.write_bytes(_mutate_bytes(raw, kind, data))
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


def check_case(path: Path, out: Path) -> str:
    """Read and ingest one case; -> 'ok' or the error class name. Any non-ScpertError propagates (a failure)."""
    try:
        t = read_l1000(path)
    except ScpertError:
        t = None
    else:
        assert t.values.shape == (len(t.meta), len(t.genes)) and t.values.dtype == np.float32
        assert np.isfinite(t.values).all() and np.abs(t.values).max() <= 10 and t.level in (3, 4, 5)
    try:
        man = ingest_gctx(path, out, all_genes=True, progress=False)
    except ScpertError as e:
        assert no_output(out), sorted(p.name for p in out.iterdir())
        return type(e).__name__
    assert t is not None, "the ingest accepted a file read_l1000 refused"
    verify_shards(out)
    assert not (out / LOCK).exists() and not (out / PROGRESS).exists()
    assert man["n_genes"] == len(t.genes) and man["n_rows"] <= len(t.meta)
    return "ok"


def _run(seed: Path, data) -> None:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    with tempfile.TemporaryDirectory() as tmp:
        case = make_case(seed, kind, data, Path(tmp))
        check_case(case, Path(tmp) / "out")


def _fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_seeds_read_cleanly(seeds, tmp_path):
    """The unmutated seeds are valid: level 3 (CPC006 GCT) and level 4 (CPC006 GCTX, LJP009 .gct.gz)."""
    assert [read_l1000(seeds[k]).level for k in ("gct", "gctx", "gctgz")] == [3, 4, 4]
    for k, p in seeds.items():
        assert check_case(p, tmp_path / k) == "ok"


@pytest.mark.parametrize("seed", list(CI_EXAMPLES))
def test_fuzz_readers(seeds, seed):
    @_fuzz(CI_EXAMPLES[seed])
    @given(data=st.data())
    def run(data):
        _run(seeds[seed], data)

    run()


@pytest.mark.slow
@pytest.mark.skipif(EXTRA == 0, reason="set SCPERT_FUZZ_EXAMPLES=N to run N more cases per seed")
@pytest.mark.parametrize("seed", list(CI_EXAMPLES))
def test_fuzz_readers_long(seeds, seed):
    @settings(max_examples=EXTRA, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def run(data):
        _run(seeds[seed], data)

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
