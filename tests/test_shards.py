"""The shard folder format (data/shards.py): manifest read/write, verification, and the folder lock that keeps two
ingests from writing one folder at once (two real processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_lincs import write_sim_bulk

from scpert_dist import schema as S
from scpert_dist.data.shards.format import (
    LOCK,
    ingest_lock,
    read_manifest,
    shard_paths,
    verify_shards,
    write_manifest,
)
from scpert_dist.data.shards.ingest import ingest_gctx
from scpert_dist.errors import OutputError, ShardError

REPO = Path(__file__).resolve().parents[1]
SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from scpert_dist.data.shards.ingest import ingest_gctx
    gctx, out, siginfo, geneinfo, marker, release = sys.argv[1:7]

    def hold(n_written, index, n_shards):  # keep the folder busy after the first shard until released
        if n_written == 1:
            Path(marker).write_text("writing")
            t0 = time.time()
            while not Path(release).exists() and time.time() - t0 < 120:
                time.sleep(0.05)

    man = ingest_gctx(gctx, out, siginfo=siginfo, geneinfo=geneinfo, rows_per_shard=50, progress=False,
                      on_shard=hold)
    print("rows", man["n_rows"])
""")


@pytest.fixture
def sim(tmp_path) -> dict:
    return write_sim_bulk(tmp_path / "sim")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_two_ingests_into_one_folder(sim, tmp_path):
    out, marker, release = tmp_path / "out", tmp_path / "first_shard_written", tmp_path / "release"
    a = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, sim["gctx"], out, sim["siginfo"], sim["geneinfo"],
                          marker, release], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    t0 = time.time()
    while not marker.exists():
        assert a.poll() is None, a.communicate()
        assert time.time() - t0 < 60, "the first ingest never wrote a shard"
        time.sleep(0.05)
    b = subprocess.run([sys.executable, "-c", "from scpert_dist.cli import main; main()", "data", "lincs",
                        "--gctx", sim["gctx"], "--out", out, "--siginfo", sim["siginfo"], "--geneinfo",
                        sim["geneinfo"], "--rows-per-shard", "50", "--quiet"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert a.poll() is None, "the first ingest had finished: the second one did not overlap it"
    release.write_text("go on")
    assert b.returncode == 2 and "error: OutputError" in b.stderr + b.stdout
    assert "another ingest is writing to this folder" in b.stderr + b.stdout and f"pid {a.pid}" in b.stderr + b.stdout
    a_out, a_err = a.communicate(timeout=120)
    assert a.returncode == 0, a_err
    man = read_manifest(out)  # the winner's manifest is complete and its shards verify
    verify_shards(out)
    assert a_out.split() == ["rows", str(man["n_rows"])] and not (out / LOCK).exists()
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(Path(p).name for p in shard_paths(out))


def test_lock_of_a_live_process_refuses_and_a_dead_ones_is_taken_over(sim, tmp_path):
    kw = dict(siginfo=sim["siginfo"], geneinfo=sim["geneinfo"], progress=False)
    out = tmp_path / "out"
    out.mkdir()
    with ingest_lock(out):
        with pytest.raises(OutputError) as e:
            ingest_gctx(sim["gctx"], out, **kw)
        assert e.value.field == LOCK and f"pid {os.getpid()}" in str(e.value)
        assert not list(out.glob("shard-*")) and not (out / S.MANIFEST).exists()
    assert not (out / LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}))
    man = ingest_gctx(sim["gctx"], out, **kw)  # a killed ingest's lock does not block the folder forever
    verify_shards(out)
    assert man["n_rows"] > 0 and not (out / LOCK).exists()
    (out / LOCK).write_text(json.dumps({"pid": 1, "host": "another-host", "started": "earlier"}))
    with pytest.raises(OutputError, match="another-host"):  # another machine's lock is never broken
        ingest_gctx(sim["gctx"], tmp_path / "out", rows_per_shard=7, **kw)


def test_manifest_round_trip_and_damage(sim, tmp_path):
    out = tmp_path / "out"
    man = ingest_gctx(sim["gctx"], out, siginfo=sim["siginfo"], geneinfo=sim["geneinfo"], rows_per_shard=100,
                      progress=False)
    assert read_manifest(out) == man and man["level"] == 5 and man["transform"].startswith("level 5: clipped")
    write_manifest(out, {**man, "n_rows": man["n_rows"]})
    assert read_manifest(out) == man
    (out / S.MANIFEST).write_text("[1, 2]")
    with pytest.raises(ShardError, match="not a JSON object"):
        read_manifest(out)
    (out / S.MANIFEST).write_text('{"schema_version": 1')
    with pytest.raises(ShardError, match="not valid JSON"):
        read_manifest(out)
    write_manifest(out, {k: v for k, v in man.items() if k != "genes"})
    with pytest.raises(ShardError) as e:
        read_manifest(out)
    assert e.value.field == "genes"
    write_manifest(out, man)
    shard = Path(shard_paths(out)[-1])
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError) as e:
        verify_shards(out)
    assert e.value.field == shard.name
