"""`scpert bench pretrain`: throughput of the pretraining step alone and under Ray Train with 1 and 2 workers,
measured side by side in one run, plus the fraction of step time spent waiting for data and the wall clock with 2
workers both with the next epoch's Ray Data stream started while the current epoch trains (the default) and with
each epoch's stream started when the epoch begins, and their ratio (use --rows small enough that the run crosses
epoch boundaries, e.g. `--rows 1500 --steps 60`: 3 epochs); on a GPU, model FLOP utilisation against a bf16 matmul
rate measured on the same card in the same run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import load
from ..data.shards.ingest import ingest_table
from ..train.settings import Objective, OptimSection, PretrainConfig


def _synthetic_table(path: Path, rows: int, n_genes: int = 978, seed: int = 0) -> Path:
    """A LINCS-like table (metadata columns + gene columns, low-rank z-scores) for the real ingest path."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(rows, 16)) @ rng.normal(size=(16, n_genes)) / 4 + rng.normal(size=(rows, n_genes)))
    meta = pd.DataFrame({
        "sig_id": [f"BENCH:{i}" for i in range(rows)],
        "pert_id": [f"BRD-B{i % 200:04d}" for i in range(rows)],
        "pert_iname": [f"cmpd{i % 200}" for i in range(rows)],
        "pert_type": "trt_cp", "cell_id": [f"CELL{i % 20}" for i in range(rows)],
        "pert_idose": [["0.1 uM", "1 uM", "10 uM"][i % 3] for i in range(rows)], "pert_itime": "24 h"})
    genes = pd.DataFrame(np.clip(z, -10, 10).astype(np.float32), columns=[str(1000 + g) for g in range(n_genes)])
    pd.concat([meta, genes], axis=1).to_parquet(path)
    return path


def step_alone(preset: str, n_genes: int, batch: int, steps: int, threads: int) -> float:
    """samples/s of the plain-torch step (no Ray, no data loading)."""
    import torch

    from ..model.config import model_config
    from ..model.heads import PretrainModel
    from ..train.step import make_optimizer, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = PretrainModel(model_config(preset, n_genes=n_genes))
    optim, objective = OptimSection(), Objective(tasks="mask")
    opt, sched = make_optimizer(model, optim, total_steps=steps + 3)
    b = {"expr": torch.randn(batch, n_genes)}
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(model, b, opt, sched, optim, objective, generator=g)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, b, opt, sched, optim, objective, generator=g)
    return steps * batch / (time.perf_counter() - t0)


def gpu_mfu(preset: str, n_genes: int, batch: int, steps: int) -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from ..model.config import flops_per_sample, model_config
    from ..model.heads import PretrainModel
    from ..train.step import make_optimizer, train_step

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    peak = 20 * 2 * 8192**3 / (time.perf_counter() - t0)
    cfg = model_config(preset, n_genes=n_genes)
    model = PretrainModel(cfg).cuda()
    optim, objective = OptimSection(), Objective(tasks="mask")
    opt, sched = make_optimizer(model, optim, total_steps=steps + 5)
    b = {"expr": torch.randn(batch, n_genes, device="cuda")}
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            train_step(model, b, opt, sched, optim, objective)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            train_step(model, b, opt, sched, optim, objective)
    torch.cuda.synchronize()
    sps = steps * batch / (time.perf_counter() - t0)
    achieved = sps * flops_per_sample(cfg, n_genes)
    return {"peak_bf16_tflops": peak / 1e12, "samples_per_s": sps, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / peak}


def run_bench(*, rows: int = 4000, steps: int = 30, batch: int = 32, preset: str = "tiny",
              workdir: Path | None = None) -> dict:
    import os

    from ..train.pretrain import run_pretraining

    work = Path(workdir or tempfile.mkdtemp(prefix="scpert-bench-pt-"))
    work.mkdir(parents=True, exist_ok=True)
    table = _synthetic_table(work / "table.parquet", rows)
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        ingest_table(table, shards, rows_per_shard=max(500, rows // 8), all_genes=True, semi_synthetic=True,
                     progress=False)
    cores = os.cpu_count() or 2
    out: dict = {"machine": f"{cores} CPU cores", "preset": preset, "batch_per_worker": batch, "steps": steps}
    print(f"[bench] plain step, {cores} threads ...", flush=True)
    out["step_alone_samples_per_s"] = step_alone(preset, 978, batch, steps, cores)
    res = {}
    # (workers, overlap): "2w_no_overlap" starts each epoch's stream when the epoch begins, "2w" (the default) while
    # the epoch before trains; the two run next to each other so the machine's load is as alike as it gets
    for key, workers, overlap in (("1w", 1, True), ("2w_no_overlap", 2, False), ("2w", 2, True)):
        print(f"[bench] Ray Train, {workers} worker(s), stream overlap {'on' if overlap else 'off'} ...", flush=True)
        cfg = load(PretrainConfig, None, [
            f"data.shards={shards}", f"model.preset={preset}", "objective.tasks=mask", f"optim.batch_size={batch}",
            f"optim.max_steps={steps}", "optim.epochs=100", f"scaling.num_workers={workers}",
            f"scaling.torch_threads={max(1, cores // workers)}", f"checkpoint.every_n_steps={10**6}",
            f"checkpoint.storage={work / 'ray'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "tracking.experiment=scpert-bench", f"data.overlap={overlap}"])
        t0 = time.perf_counter()
        res[key] = dict(run_pretraining(cfg, progress=False).metrics, run_s=time.perf_counter() - t0)
    for w, m in res.items():
        for k in ("samples_per_s", "tokens_per_s", "data_wait_fraction", "stream_startup_s", "stream_startup_raw_s",
                  "setup_s", "worker_wall_s", "run_s", "epoch", "samples_per_s_steady", "data_wait_fraction_steady"):
            out[f"ray_{w}_{k}"] = m[k]
    res[1], res[2] = res["1w"], res["2w"]
    out["scaling_2w_over_1w"] = res[2]["samples_per_s"] / res[1]["samples_per_s"]
    out["scaling_2w_over_1w_steady"] = res[2]["samples_per_s_steady"] / res[1]["samples_per_s_steady"]
    out["ray_1w_over_step_alone"] = res[1]["samples_per_s"] / out["step_alone_samples_per_s"]
    before, after = res["2w_no_overlap"], res["2w"]
    out["overlap_wall_ratio"] = after["worker_wall_s"] / before["worker_wall_s"]
    out["overlap_run_ratio"] = after["run_s"] / before["run_s"]
    gpu = gpu_mfu(preset if preset != "tiny" else "base", 978, batch, steps)
    print("\n| measure | value |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    # no goal on 2 workers / 1 worker here: on 2 shared cores ~1x is the ceiling (measured 1.06-1.07x); what the
    # workers must scale is the stream, measured by `scpert bench stream` (each byte read once across workers)
    print(f"| goal: data wait < 5% | {'met' if max(res[1]['data_wait_fraction'], res[2]['data_wait_fraction']) < 0.05 else 'NOT met'} |")
    print(f"| 2 workers, {int(after['epoch'])} epoch boundaries in {steps} steps: stream started when each epoch "
          f"begins -> while the epoch before trains | data wait {before['data_wait_fraction']:.1%} -> "
          f"{after['data_wait_fraction']:.1%} (stream start-up waited {before['stream_startup_s']:.1f} s -> "
          f"{after['stream_startup_s']:.1f} s of {after['stream_startup_raw_s']:.1f} s; worker setup "
          f"{before['setup_s']:.1f} s -> {after['setup_s']:.1f} s; setup + {steps} steps {before['worker_wall_s']:.1f} s "
          f"-> {after['worker_wall_s']:.1f} s = {out['overlap_wall_ratio']:.2f}x; whole run {before['run_s']:.1f} s -> "
          f"{after['run_s']:.1f} s = {out['overlap_run_ratio']:.2f}x) |")
    ok = after["data_wait_fraction"] < 0.05 and after["epoch"] >= 1
    print(f"| goal: with epoch boundaries, data wait < 5% (overlap) | {'met' if ok else 'NOT met'}"
          f"{'' if after['epoch'] >= 1 else ' (no epoch boundary crossed: use fewer --rows or more --steps)'} |")
    print(f"| goal: overlap not slower (setup + steps, overlap / no overlap <= 1) | "
          f"{'met' if out['overlap_wall_ratio'] <= 1 else 'NOT met'} ({out['overlap_wall_ratio']:.2f}x) |")
    print(f"| goal: data wait < 5%, steady state (without each epoch's stream start-up) | "
          f"{'met' if max(res[1]['data_wait_fraction_steady'], res[2]['data_wait_fraction_steady']) < 0.05 else 'NOT met'} |")
    if gpu is None:
        print("| GPU MFU | skipped: no CUDA device on this machine |")
    else:
        out["gpu"] = gpu
        print(f"| GPU bf16 matmul peak (measured) | {gpu['peak_bf16_tflops']:.1f} TFLOP/s |")
        print(f"| GPU MFU (base preset) | {gpu['mfu']:.1%} (goal >= 40%) |")
    return out
