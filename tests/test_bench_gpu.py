"""`scpert bench gpu`: the skip path without CUDA (one line, JSON with the reason, exit code 0), a failing or
over-budget section recorded while the others still run, the analytic largest-model scan, and (gpu marker) the
real run on a GPU."""

from __future__ import annotations

import json
import time

import pytest
import torch

from scpert_dist.bench import gpu as G

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the path without CUDA")


@no_cuda
def test_cli_skips_without_cuda_writes_reason_and_exits_0(tmp_path):
    from typer.testing import CliRunner

    from scpert_dist.cli import app

    out = tmp_path / "sub" / "gpu.json"
    r = CliRunner().invoke(app, ["bench", "gpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "SKIPPED" in r.output and "no CUDA device" in r.output
    res = json.loads(out.read_text())
    assert "no CUDA device" in res["skipped"] and res["torch"] == torch.__version__
    assert not list(out.parent.glob("*.partial"))


def test_bad_budget_and_unwritable_out_are_named_errors(tmp_path):
    from scpert_dist.errors import ConfigError, OutputError

    with pytest.raises(ConfigError, match="budget"):
        G.run_gpu_bench(tmp_path / "g.json", budget_s=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        G.run_gpu_bench(blocker / "g.json", budget_s=10)
    assert not (tmp_path / "g.json").exists()


@no_cuda
def test_failing_section_is_recorded_and_the_next_one_runs():
    res: dict = {}
    deadline = time.monotonic() + 60
    G._section(res, "matmul", G.matmul_peak, deadline, 1)       # needs CUDA: raises here
    G._section(res, "after", lambda: {"ran": True}, deadline, 1)
    G._section(res, "late", lambda: {"ran": True}, deadline, 3600)
    assert "error" in res["matmul"] and res["matmul"]["traceback"]
    assert res["after"]["ran"] is True
    assert "time budget" in res["late"]["skipped"] and "ran" not in res["late"]
    rows = dict(G._rows(res))
    assert rows["bf16 matmul peak (measured)"].startswith(res["matmul"]["error"][:20])


def test_params_of_counts_the_real_model():
    import dataclasses

    from scpert_dist.model import PretrainModel, count_parameters

    mcfg, batch, workers = G.base_model_config()
    assert (mcfg.d_model, mcfg.n_layers, batch) == (256, 6, 64) and workers >= 1
    real = count_parameters(PretrainModel(dataclasses.replace(mcfg, n_heads=4, d_ff=1024), G.base_config().objective.heads))
    assert G._params_of(256, 6) == real


def test_scaling_zero_stages_fit_larger_models_than_ddp():
    # bytes/param and activations as the GPU sections report them (16 B/param: fp32/bf16 weights, grads, Adam)
    mfu_res = {"flash_on": {"bytes_per_param": 16.0, "activation_gib": 0.3}}
    zero_res = {f"zero{s}": {"bytes_per_param": 16.5, "fixed_gib": 1.0} for s in (1, 2, 3)}
    sc = G.scaling(mfu_res, zero_res, memory_gib=80.0, widths=(256, 1024, 2048, 4096), depths=(6, 24, 48),
                   micro_batches=(None, 8))
    big, small = sc["by_batch"]["64"], sc["by_batch"]["8"]
    p = {k: small[k]["max_params"] for k in ("ddp", "zero1", "zero2", "zero3")}
    assert 0 < p["ddp"] <= p["zero1"] <= p["zero2"] <= p["zero3"]
    assert p["zero3"] > p["ddp"]                       # partitioning everything over the workers buys size
    for by in (big, small):
        for k in p:
            assert by[k]["gib"] <= 0.9 * 80.0
            assert by[k]["max_params"] <= small[k]["max_params"]  # more activations never fit a larger model
    w = sc["workers"]
    assert sc["bytes_per_param"]["zero3"] == pytest.approx(16.5 - 16 + 16 / w)
    assert "analytic" in sc["method"]
    assert any(k.startswith("largest model, ZeRO-3") for k, _ in G._rows({"scaling": sc}))


def test_table_rows_for_every_kind_of_section_result():
    """The printed table handles measured, failed and half-measured sections (a GPU run must not lose its table)."""
    step = {"steps": 6, "loss_first": 3.2, "loss_last": 2.9, "loss_finite": True, "s_per_step": 0.05,
            "peak_gib": 4.0, "persistent_gib": 0.1, "samples_per_s": 1280.0}
    res = {"env": {"device": "GPU", "memory_gib": 80.0}, "matmul": {"bf16_tflops": 700.0},
           "mfu": {"flash_on": {**step, "mfu": 0.3, "achieved_tflops": 210.0},
                   "flash_off": {**step, "mfu": None, "achieved_tflops": 90.0}},
           "zero": {"zero1": {**step, "bytes_per_param": 16.2, "fixed_gib": 0.9},
                    "zero2": {"error": "RuntimeError: boom"},
                    "zero3": {**step, "error": "slope run failed"}},
           "scaling": {"skipped": "time budget"}}
    rows = dict(G._rows(res))
    assert "30.0%" in rows["MFU base model, flash attention on"]
    assert "MFU n/a" in rows["MFU base model, flash attention off (math)"]
    assert "16.2 B/param" in rows["DeepSpeed ZeRO-1 bf16, 1 GPU"]
    assert rows["DeepSpeed ZeRO-2 bf16, 1 GPU"] == "RuntimeError: boom"
    assert "6 steps" in rows["DeepSpeed ZeRO-3 bf16, 1 GPU"] and "slope run failed" in rows["DeepSpeed ZeRO-3 bf16, 1 GPU"]
    assert rows["largest model per ZeRO stage vs DDP"] == "time budget"


@pytest.mark.gpu
def test_gpu_bench_real(tmp_path):
    res = G.run_gpu_bench(tmp_path / "gpu.json", budget_s=420)
    assert json.loads((tmp_path / "gpu.json").read_text())["env"]["device"]
    assert res["matmul"]["bf16_tflops"] > 10
    for k in ("flash_on", "flash_off"):
        assert 0 < res["mfu"][k]["mfu"] < 1 and res["mfu"][k]["loss_finite"]
    for s in (1, 2, 3):
        z = res["zero"][f"zero{s}"]
        assert z["steps"] > 0 and z["loss_finite"] and z["peak_gib"] > 0, z
    by = res["scaling"]["by_batch"]["8"]
    assert by["zero3"]["max_params"] >= by["ddp"]["max_params"] > 0
