"""jobs/: the entry points of `ray job submit`. A job that would track into a relative sqlite file on a Ray cluster
stops at once with a named error (jobs/entry.py); the end-to-end `ray job submit` of a sweep to the local recipe
runs the documented commands in tests/test_docs_commands.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def entry():
    spec = importlib.util.spec_from_file_location("entry", REPO / "jobs" / "entry.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_effective_uri_order(entry, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert entry.effective_uri(["--config", "sweeps/tiny.yaml"]) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert entry.effective_uri([]) == "http://127.0.0.1:5000"
    assert entry.effective_uri(["--set", "tracking_uri=http://h:1"]) == "http://h:1"
    assert entry.effective_uri(["--set", "tracking.uri=sqlite:////abs/m.db"]) == "sqlite:////abs/m.db"
    assert entry.effective_uri(["--data", "d.h5ad", "--tracking", "http://h:2"]) == "http://h:2"
    assert entry.with_tracking_flag(["--data", "d"]) == ["--data", "d", "--tracking", "http://127.0.0.1:5000"]
    assert entry.with_tracking_flag(["--tracking", "x"]) == ["--tracking", "x"]


def test_relative_sqlite_is_refused_on_a_cluster_only(entry, monkeypatch):
    from scpert_dist.errors import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        entry.require_shared_tracking(["--config", "sweeps/tiny.yaml"], on_cluster=True)
    with pytest.raises(ConfigError):
        entry.require_shared_tracking(["--set", "tracking_uri=sqlite:///m.db"], on_cluster=True)
    assert entry.require_shared_tracking([], on_cluster=False) == "sqlite:///mlflow.db"
    assert entry.require_shared_tracking(["--set", "tracking_uri=sqlite:////abs/m.db"], on_cluster=True)
    assert entry.require_shared_tracking(["--help"], on_cluster=True)


@pytest.mark.parametrize("job", ["sweep.py", "finetune.py", "pretrain.py"])
def test_job_without_tracking_server_stops_at_once(job, tmp_path):
    """As a Ray job sees it (RAY_ADDRESS set) with no MLFLOW_TRACKING_URI: exit 2, a named error, nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_ADDRESS"] = "127.0.0.1:1"  # never contacted: the check comes first
    args = {"sweep.py": ["--config", "sweeps/tiny.yaml", "--set", f"out={tmp_path / 'o'}"],
            "finetune.py": ["--data", str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "o")],
            "pretrain.py": ["--set", f"checkpoint.storage={tmp_path / 'o'}"]}[job]
    r = subprocess.run([sys.executable, f"jobs/{job}", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ConfigError" in r.stderr and "MLFLOW_TRACKING_URI" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
