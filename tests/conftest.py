"""Shared fixtures. Real components only: real files, real Parquet, real AnnData, real local Ray, real MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    env = os.environ.get("SCPERT_METADATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir() and (cand / "lincs").is_dir():
            return cand
    return None


SHARED = _shared_data()


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`scpert ARGS` in this process through the real entry point: (exit code, stdout + stderr)."""
    import sys

    from scpert_dist.cli import main

    monkeypatch.setattr(sys, "argv", ["scpert", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out + cap.err


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public files (../shared/data in this repository's CI). Skips when absent."""
    if SHARED is None:
        pytest.skip("real data folder absent: set SCPERT_METADATA or place the public files in ../shared/data")
    return SHARED


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A real MLflow tracking store (sqlite; the file store is refused by MLflow 3)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 4 logical CPUs on a 2-core machine, so 2 training workers and Ray Data's read tasks
    can run together (see README, 'Ray on 2 cores')."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SCPERT_FAST") == "1":
        skip = pytest.mark.skip(reason="SCPERT_FAST=1: slow tests skipped")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="no CUDA device: GPU path not tested on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
