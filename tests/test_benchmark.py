"""Benchmark runner in quick mode on a small realistic AnnData (real SMILES, NB counts)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ft_fixture import make_adata  # noqa: E402


@pytest.mark.slow
def test_benchmark_cli_quick_writes_every_method(tmp_path):
    from typer.testing import CliRunner

    from scpert_dist.cli import app

    a, names = make_adata(seed=1)
    a.write_h5ad(tmp_path / "d.h5ad")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    res = CliRunner().invoke(app, ["benchmark", "--data", str(tmp_path / "d.h5ad"), "--split", "split_test",
                                   "--methods", "control,scpert_lstm_morgan_scratch", "--seeds", "1", "--quick",
                                   "--out", str(tmp_path / "b"), "--tracking", uri])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "b" / "benchmark.md").read_text()
    assert md.startswith("# SEMI-SYNTHETIC")
    for m in ("control", "scpert_lstm_morgan_scratch"):
        assert f"| {m} |" in md
    df = pd.read_csv(tmp_path / "b" / "results.csv")
    assert set(df["drug"]) == set(names[-2:])  # only held-out test drugs are evaluated
    per = df.groupby("method")["logfc_pearson"].mean()
    assert per["scpert_lstm_morgan_scratch"] > per["control"]
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["scpert-benchmark"], output_format="list")
    assert runs and any(f.path == "benchmark" for f in mlflow.MlflowClient(uri).list_artifacts(runs[0].info.run_id))


def test_benchmark_unknown_method_is_named_error(tmp_path):
    from scpert_dist.errors import ConfigError
    from scpert_dist.evaluate.benchmark import run_benchmark

    a, _ = make_adata(n_drugs=6, cells_per=6)
    with pytest.raises(ConfigError, match="available"):
        run_benchmark(a, "split_test", methods=["nope"], out_dir=tmp_path / "o")
