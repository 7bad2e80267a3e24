"""Parallel LINCS ingest (`workers` > 1): worker processes (and Ray tasks) that each reopen the GCTX by path give the
same shards and manifest as one process; resume after a crash or a killed worker; a worker's bad-input error is the
same named error as with one process, with no output left; inputs that cannot be split are refused by name."""

from __future__ import annotations

import multiprocessing
import os
import signal

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from test_lincs import fail_after, no_output, read_shards, write_sim_bulk

from scpert_dist import schema as S
from scpert_dist.data.shards.ingest import ingest_gctx, ingest_table, read_manifest, verify_shards
from scpert_dist.errors import ConfigError, OutputError, ValueRangeError


def strip(man: dict) -> dict:
    return {k: v for k, v in man.items() if k != "created"}


@pytest.fixture
def sim(tmp_path) -> dict:
    s = write_sim_bulk(tmp_path / "sim")
    s["kw"] = dict(siginfo=s["siginfo"], geneinfo=s["geneinfo"], compounds=s["compounds"], rows_per_shard=20)
    return s  # 240 kept signatures -> 12 shards


@pytest.fixture
def ref(sim, tmp_path) -> dict:
    """The one-process ingest everything is compared with."""
    man = ingest_gctx(sim["gctx"], tmp_path / "ref", progress=False, **sim["kw"])
    return {"man": man, "df": read_shards(tmp_path / "ref"), "dir": tmp_path / "ref"}


def same_as_ref(out, ref) -> None:
    man = read_manifest(out)
    assert strip(man) == strip(ref["man"])  # same shard files, rows, sha256, bytes and order
    verify_shards(out)
    pd.testing.assert_frame_equal(read_shards(out), ref["df"])
    for s in man["shards"]:
        assert (out / s["file"]).read_bytes() == (ref["dir"] / s["file"]).read_bytes()


def test_two_workers_same_shards_via_cli(sim, ref, tmp_path, monkeypatch, capsys):
    out = tmp_path / "w2"
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--gctx", sim["gctx"], "--out", out, "--siginfo",
                         sim["siginfo"], "--geneinfo", sim["geneinfo"], "--compounds", sim["compounds"],
                         "--rows-per-shard", 20, "--workers", 2)
    assert code == 0, text
    assert "240 signatures x 30 genes in 12 shard(s)" in text and "2 worker processes" in text
    same_as_ref(out, ref)


def test_resume_after_crash_with_two_workers(sim, ref, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected failure"):
        ingest_gctx(sim["gctx"], out, workers=2, progress=False, on_shard=fail_after(2), **sim["kw"])
    assert not (out / S.MANIFEST).exists()
    first = sorted(out.glob("shard-*.parquet"))
    # shards 0, 1 recorded; the ones in flight (at most 2 x workers) finish and are recorded too
    assert [p.name for p in first][:2] == ["shard-00000.parquet", "shard-00001.parquet"] and len(first) <= 6
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}
    ingest_gctx(sim["gctx"], out, workers=2, progress=False, **sim["kw"])
    assert {p.name: p.stat().st_mtime_ns for p in first} == mtimes  # completed shards were not rewritten
    assert not (out / "_progress.json").exists()
    same_as_ref(out, ref)


def test_killed_worker_is_named_and_resumable(sim, ref, tmp_path):
    """A worker process killed mid-ingest (as the OOM killer would): OutputError naming the workers, the shards
    finished before it are kept, and a re-run completes the same shards."""
    out = tmp_path / "out"

    def kill_a_worker(n_written: int, index: int, n_shards: int) -> None:
        if n_written == 1:
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

    with pytest.raises(OutputError, match="ingest worker was lost") as e:
        ingest_gctx(sim["gctx"], out, workers=2, progress=False, on_shard=kill_a_worker, **sim["kw"])
    assert e.value.field == "workers" and "re-run the same command to resume" in str(e.value)
    assert (out / "_progress.json").exists() and (out / "shard-00000.parquet").exists()
    ingest_gctx(sim["gctx"], out, workers=2, progress=False, **sim["kw"])
    same_as_ref(out, ref)


def test_worker_bad_input_same_named_error_no_output(sim, tmp_path):
    bad = tmp_path / "nan.gctx"
    bad.write_bytes(sim["gctx"].read_bytes())
    with h5py.File(bad, "r+") as f:
        m = f["0/DATA/0/matrix"]  # cmapPy writes signatures x genes
        row = m[200]
        row[3] = np.nan
        m[200] = row
    errors = {}
    for w in (1, 2):
        out = tmp_path / f"out{w}"
        with pytest.raises(ValueRangeError) as e:
            ingest_gctx(bad, out, workers=w, progress=False, **sim["kw"])
        errors[w] = e.value
        assert no_output(out)
    assert str(errors[2]) == str(errors[1]) and "NaN/Inf" in str(errors[2])
    assert errors[2].field == "matrix" and errors[2].__cause__ is None  # no worker traceback attached


def test_transposed_gctx_with_two_workers(sim, ref, tmp_path):
    """A GCTX stored genes x signatures: the workers find the orientation as the planning process did."""
    tr = tmp_path / "transposed.gctx"
    tr.write_bytes(sim["gctx"].read_bytes())
    with h5py.File(tr, "r+") as f:
        m = f["0/DATA/0/matrix"][:]
        del f["0/DATA/0/matrix"]
        f["0/DATA/0/matrix"] = np.ascontiguousarray(m.T)
    man = ingest_gctx(tr, tmp_path / "tr", workers=2, progress=False, **sim["kw"])
    assert [s["sha256"] for s in man["shards"]] == [s["sha256"] for s in ref["man"]["shards"]]
    pd.testing.assert_frame_equal(read_shards(tmp_path / "tr"), ref["df"])


def test_unsplittable_inputs_and_bad_values_refused(sim, tmp_path):
    table = tmp_path / "table.csv"
    x = pd.DataFrame(sim["x"][:, :20].T, columns=sim["gene"].pr_gene_id)
    pd.concat([sim["sig"].iloc[:20].reset_index(drop=True), x], axis=1).to_csv(table, index=False)
    with pytest.raises(ConfigError, match="needs a GCTX") as e:
        ingest_table(table, tmp_path / "t", workers=2, progress=False)
    assert e.value.field == "workers" and "--workers 1" in e.value.hint
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="workers must be an integer"):
            ingest_gctx(sim["gctx"], tmp_path / "b", workers=bad, progress=False)
    with pytest.raises(ConfigError, match="unknown ingest backend"):
        ingest_gctx(sim["gctx"], tmp_path / "b", workers=2, backend="dask", progress=False)
    assert no_output(tmp_path / "t") and no_output(tmp_path / "b")


def test_cli_refuses_workers_for_table_and_bad_bench_counts(sim, tmp_path, monkeypatch, capsys):
    table = tmp_path / "table.csv"
    x = pd.DataFrame(sim["x"][:, :20].T, columns=sim["gene"].pr_gene_id)
    pd.concat([sim["sig"].iloc[:20].reset_index(drop=True), x], axis=1).to_csv(table, index=False)
    code, text = run_cli(monkeypatch, capsys, "data", "lincs", "--table", table, "--out", tmp_path / "t",
                         "--workers", 2)
    assert code == 2 and "needs a GCTX" in text and "Traceback" not in text and no_output(tmp_path / "t")
    code, text = run_cli(monkeypatch, capsys, "bench", "ingest", "--workers", "1,two", "--workdir", tmp_path / "w")
    assert code == 2 and "--workers" in text and "Traceback" not in text


@pytest.mark.ray
def test_ray_tasks_same_shards_and_named_error(sim, ref, tmp_path, ray_local):
    out = tmp_path / "ray"
    man = ingest_gctx(sim["gctx"], out, workers=2, backend="ray", progress=False, **sim["kw"])
    assert strip(man) == strip(ref["man"])
    same_as_ref(out, ref)
    bad = tmp_path / "nan.gctx"
    bad.write_bytes(sim["gctx"].read_bytes())
    with h5py.File(bad, "r+") as f:
        row = f["0/DATA/0/matrix"][150]
        row[0] = np.inf
        f["0/DATA/0/matrix"][150] = row
    with pytest.raises(ValueRangeError, match="NaN/Inf values in the matrix"):
        ingest_gctx(bad, tmp_path / "bad", workers=2, backend="ray", progress=False, **sim["kw"])
    assert no_output(tmp_path / "bad") and ray_local.is_initialized()  # Ray left as the caller had it
