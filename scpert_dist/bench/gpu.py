"""`scpert bench gpu`: one short check of a GPU, without Ray, printed as one table and written as JSON.

Sections (each one guarded: a failing section records its error in the JSON and the others still run; a section
that would not fit the remaining time budget is recorded as skipped):
  matmul   measured bf16 matmul rate (8192^3, best of several timed runs): the peak MFU is taken against
  mfu      the base pretraining model (configs/pretrain_base.toml) on one GPU under bf16 autocast, with the SDPA
           flash-attention backend only ("flash on") and with the math backend only ("flash off"): samples/s,
           achieved TFLOP/s (model.config.flops_per_sample), MFU, peak memory
  zero     DeepSpeed ZeRO 1, 2, 3 with bf16 in this one process (RANK/WORLD_SIZE/... set): steps run, first and last
           loss (finite?), s/step, peak memory; bytes per parameter = the slope of persistent memory between the
           base model and a 1024-wide one (DeepSpeed's fixed communication buffers are the intercept)
  scaling  the largest model of a depth x width scan that fits one GPU's memory with DDP and with each ZeRO stage
           on `workers` GPUs (pretrain_base.toml's num_workers), at 64 and 8 samples per GPU: ANALYTIC, from the
           bytes per parameter and fixed buffers measured above (ZeRO's partitioned share - 12 / 14 / 16 bytes of the mixed-precision Adam state for stage 1 / 2 / 3
           - divided by the number of GPUs) plus activation memory measured on the base model and scaled linearly
           in width x depth (flash attention keeps activations linear in the 979 tokens)
Without CUDA it prints one SKIPPED line, writes {"skipped": reason} and returns normally (exit code 0).
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import time
import traceback
from pathlib import Path

from ..config import PACKAGED, load
from ..errors import ConfigError
from ..paths import ensure_writable_dir
from ..train.distributed import deepspeed_config
from ..train.settings import OptimSection, PretrainConfig

CONFIG = PACKAGED / "pretrain_base.toml"
N_GENES, N_CELLS, N_DRUGS = 978, 100, 1000   # LINCS-sized panel and label counts for the [CLS] heads
ZERO_PARTITIONED = {1: 12.0, 2: 14.0, 3: 16.0}  # bytes/param ZeRO spreads over the GPUs (mixed-precision Adam)
GiB = 2 ** 30


def _write(res: dict, out: Path | None) -> None:
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(res, indent=2, default=str))
    tmp.replace(out)


def _section(res: dict, name: str, fn, deadline: float, need_s: float) -> None:
    """res[name] = fn(), or {"error": ...} if it raised, or {"skipped": ...} if need_s no longer fits."""
    left = deadline - time.monotonic()
    if left < need_s:
        res[name] = {"skipped": f"time budget: {left:.0f} s left, the section needs about {need_s:.0f} s"}
        print(f"bench gpu: {name} skipped ({res[name]['skipped']})", flush=True)
        return
    t0 = time.monotonic()
    try:
        res[name] = fn()
    except Exception as e:  # noqa: BLE001 - a failed section must not stop the others
        res[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}",
                     "traceback": traceback.format_exc().splitlines()[-6:]}
        print(f"bench gpu: {name} FAILED: {res[name]['error']}", flush=True)
    finally:
        _free()
    if isinstance(res[name], dict):
        res[name]["section_s"] = round(time.monotonic() - t0, 1)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def base_config():
    """pretrain_base.toml, the config the GPU bench measures."""
    return load(PretrainConfig, CONFIG)


def base_model_config():
    """(ModelConfig of pretrain_base.toml for the LINCS-sized panel, batch size, number of workers)."""
    cfg = base_config()
    return cfg.model.build(N_GENES, N_CELLS, N_DRUGS), cfg.optim.batch_size, cfg.scaling.num_workers


def _batch(batch: int, device) -> dict:
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    b = {"expr": torch.randn(batch, N_GENES, generator=g), "cell_idx": torch.randint(0, N_CELLS, (batch,), generator=g),
         "drug_idx": torch.randint(0, N_DRUGS, (batch,), generator=g), "log_dose": torch.randn(batch, generator=g)}
    return {k: v.to(device) for k, v in b.items()}


def matmul_peak(n: int = 8192, reps: int = 5, iters: int = 20) -> dict:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize()
        best = max(best, iters * 2 * n ** 3 / (time.perf_counter() - t0))
    return {"n": n, "bf16_tflops": best / 1e12}


def _timed_steps(model, b: dict, opt, sched, steps: int, warmup: int = 3, autocast: bool = True) -> dict:
    """Run warmup + steps train steps; samples/s, losses, peak and persistent memory."""
    import contextlib

    import torch

    from ..train.step import train_step

    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    optim, objective = OptimSection(), base_config().objective
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with ctx():
            losses.append(train_step(model, b, opt, sched, optim, objective)["loss"])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"steps": warmup + steps, "s_per_step": dt / steps, "samples_per_s": steps * len(b["expr"]) / dt,
            "loss_first": losses[0], "loss_last": losses[-1], "loss_finite": all(map(math.isfinite, losses)),
            "peak_gib": torch.cuda.max_memory_allocated() / GiB, "persistent_gib": torch.cuda.memory_allocated() / GiB}


def mfu(peak_tflops: float | None, steps: int = 20) -> dict:
    """The base model, plain torch (fp32 weights + AdamW, bf16 autocast): flash attention on / off."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..model.config import flops_per_sample
    from ..model.encoder import count_parameters
    from ..model.heads import PretrainModel
    from ..train.step import make_optimizer

    mcfg, batch, _ = base_model_config()
    tasks = base_config().objective.heads
    out = {"model": {"d_model": mcfg.d_model, "n_layers": mcfg.n_layers, "n_heads": mcfg.n_heads, "d_ff": mcfg.d_ff,
                     "tasks": list(tasks), "batch": batch}}
    for label, backend in (("flash_on", SDPBackend.FLASH_ATTENTION), ("flash_off", SDPBackend.MATH)):
        _free()
        torch.manual_seed(0)
        model = PretrainModel(mcfg, tasks).cuda()
        n_params = count_parameters(model)
        opt, sched = make_optimizer(model, OptimSection(), total_steps=steps + 10)
        with sdpa_kernel([backend]):
            r = _timed_steps(model, _batch(batch, "cuda"), opt, sched, steps)
        r["achieved_tflops"] = r["samples_per_s"] * flops_per_sample(mcfg, N_GENES) / 1e12
        r["mfu"] = r["achieved_tflops"] / peak_tflops if peak_tflops else None
        r["bytes_per_param"] = r["persistent_gib"] * GiB / n_params
        r["activation_gib"] = r["peak_gib"] - r["persistent_gib"]
        out[label], out["n_params"] = r, n_params
        del model, opt, sched
    return out


def _dist_env() -> None:
    """What DeepSpeed needs to start a one-process group without a launcher."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)


def zero_stage(stage: int, steps: int = 5, width: int | None = None) -> dict:
    """DeepSpeed ZeRO-`stage`, bf16, one process on one GPU: a few steps of the base model (or of it at `width`)."""
    import dataclasses
    from types import SimpleNamespace

    import deepspeed
    import torch

    from ..model.encoder import count_parameters
    from ..model.heads import PretrainModel
    from ..train.step import make_optimizer

    mcfg, batch, _ = base_model_config()
    if width:
        mcfg = dataclasses.replace(mcfg, d_model=width, d_ff=4 * width)
    torch.manual_seed(0)
    model = PretrainModel(mcfg, base_config().objective.heads)
    n_params = count_parameters(model)
    optim = OptimSection()
    opt, sched = make_optimizer(model, optim, total_steps=steps + 10)
    ds_cfg = deepspeed_config(SimpleNamespace(zero_stage=stage, bf16=True), batch, optim.grad_clip)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    try:
        torch.cuda.reset_peak_memory_stats()
        r = _timed_steps(engine, _batch(batch, engine.device), opt, sched, steps, warmup=1, autocast=False)
        r["zero_stage"] = engine.zero_optimization_stage()
    finally:
        getattr(engine, "destroy", lambda: None)()  # frees DeepSpeed's buffers and hooks before the next stage
        del engine, model, opt, sched
    r["n_params"] = n_params
    r["activation_gib"] = r["peak_gib"] - r["persistent_gib"]
    return r


def _per_param(stage: int, base: dict, wide_width: int = 1024) -> dict:
    """Bytes per parameter of a stage as the slope of persistent memory between the base model and a wider one
    (DeepSpeed's fixed communication buckets cancel out; their size is the intercept, `fixed_gib`)."""
    w = zero_stage(stage, 2, width=wide_width)
    bpp = (w["persistent_gib"] - base["persistent_gib"]) * GiB / (w["n_params"] - base["n_params"])
    return {"bytes_per_param": bpp, "fixed_gib": base["persistent_gib"] - base["n_params"] * bpp / GiB,
            "wide": {k: w[k] for k in ("n_params", "persistent_gib", "peak_gib", "loss_finite")}}


def zero(steps: int = 5) -> dict:
    """ZeRO 1, 2, 3 one after the other; a failing stage records its error, the next one still runs."""
    _dist_env()
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl", verbose=False)
    out = {"deepspeed": deepspeed.__version__}
    for stage in (1, 2, 3):
        try:
            r = out[f"zero{stage}"] = zero_stage(stage, steps)
            _free()
            r.update(_per_param(stage, r))
        except Exception as e:  # noqa: BLE001
            out.setdefault(f"zero{stage}", {}).update({"error": f"{type(e).__name__}: {str(e)[:500]}",
                                                       "traceback": traceback.format_exc().splitlines()[-6:]})
        _free()
    return out


def _params_of(d: int, layers: int) -> int:
    """Exact parameter count of the pretraining model with width d (64-wide heads, d_ff = 4d) and `layers` blocks,
    built on the meta device (no memory)."""
    import dataclasses

    import torch

    from ..model.encoder import count_parameters
    from ..model.heads import PretrainModel

    mcfg, _, _ = base_model_config()
    cfg = dataclasses.replace(mcfg, d_model=d, n_layers=layers, n_heads=max(1, d // 64), d_ff=4 * d)
    with torch.device("meta"):
        return count_parameters(PretrainModel(cfg, base_config().objective.heads))


def scaling(mfu_res: dict, zero_res: dict, memory_gib: float, widths=(256, 512, 1024, 1536, 2048, 3072, 4096, 6144,
            8192), depths=(6, 12, 24, 48, 96), micro_batches=(None, 8)) -> dict:
    """Largest (by parameters) model of the scan whose persistent state + activations fit 90% of one GPU, for DDP
    and ZeRO 1/2/3 on `workers` GPUs, at the config's batch per GPU (None) and smaller micro-batches. ANALYTIC from
    the measured bytes/param and activations (see module doc)."""
    mcfg, batch, workers = base_model_config()
    ddp = mfu_res.get("flash_on") or {}
    if "bytes_per_param" not in ddp:
        raise RuntimeError("needs the mfu section's flash-on measurement (bytes/param, activations)")
    # GiB per (width x depth x sample), measured on the base model at its batch
    act_unit = ddp["activation_gib"] / (mcfg.d_model * mcfg.n_layers * batch)
    per_param, fixed = {"ddp": ddp["bytes_per_param"]}, {"ddp": 0.0}
    for s in (1, 2, 3):
        m = zero_res.get(f"zero{s}") or {}
        if "bytes_per_param" in m:  # measured at 1 GPU; ZeRO divides its partitioned share over the workers
            part = min(ZERO_PARTITIONED[s], m["bytes_per_param"])
            per_param[f"zero{s}"] = m["bytes_per_param"] - part + part / workers
            fixed[f"zero{s}"] = max(0.0, m.get("fixed_gib", 0.0))
    budget = 0.9 * memory_gib
    grid = [(d, L, _params_of(d, L)) for d in widths for L in depths]
    out = {"method": "analytic: measured bytes/param (1 GPU) with ZeRO's partitioned share / workers, plus measured "
                     "base-model activations scaled by width x depth x batch", "workers": workers,
           "gpu_memory_gib": memory_gib, "activation_gib_per_width_layer_sample": act_unit,
           "bytes_per_param": per_param, "fixed_gib": fixed, "by_batch": {}}
    for mb in micro_batches:
        mb = mb or batch
        res = out["by_batch"][str(mb)] = {}
        for name, bpp in per_param.items():
            need = {(d, L): fixed[name] + p * bpp / GiB + act_unit * d * L * mb for d, L, p in grid}
            fits = [(p, d, L) for d, L, p in grid if need[d, L] <= budget]
            p, d, L = max(fits) if fits else (0, 0, 0)
            res[name] = {"max_params": p, "d_model": d, "n_layers": L, "gib": need[d, L] if p else None}
    return out


def _rows(res: dict) -> list[tuple[str, str]]:
    """(what, result) rows of the printed table."""
    rows = [("GPU", f"{res.get('env', {}).get('device', '?')}, {res.get('env', {}).get('memory_gib', 0):.0f} GiB")]
    mm = res.get("matmul", {})
    rows.append(("bf16 matmul peak (measured)", f"{mm['bf16_tflops']:.0f} TFLOP/s" if "bf16_tflops" in mm else _why(mm)))
    m = res.get("mfu", {})
    for k, label in (("flash_on", "flash attention on"), ("flash_off", "flash attention off (math)")):
        r = m.get(k)
        rows.append((f"MFU base model, {label}", _why(m) if r is None else
                     f"{r['mfu']:.1%}  ({r['samples_per_s']:,.0f} samples/s, {r['achieved_tflops']:.1f} TFLOP/s, "
                     f"peak {r['peak_gib']:.1f} GiB)" if r.get("mfu") is not None else
                     f"MFU n/a (no matmul peak); {r['samples_per_s']:,.0f} samples/s"))
    z = res.get("zero", {})
    for s in (1, 2, 3):
        r = z.get(f"zero{s}")
        rows.append((f"DeepSpeed ZeRO-{s} bf16, 1 GPU", _why(z) if r is None else _why(r) if "steps" not in r else
                     f"{r['steps']} steps, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                     f"({'finite' if r['loss_finite'] else 'NOT FINITE'}), {r['s_per_step'] * 1e3:.0f} ms/step, "
                     f"peak {r['peak_gib']:.2f} GiB, " + (f"{r['bytes_per_param']:.1f} B/param (slope), fixed "
                     f"{r['fixed_gib']:.2f} GiB" if "bytes_per_param" in r else f"B/param not measured: {_why(r)}")))
    sc = res.get("scaling", {})
    if "by_batch" not in sc:
        return [*rows, ("largest model per ZeRO stage vs DDP", _why(sc))]
    for mb, by in sc["by_batch"].items():
        for k, r in by.items():
            rows.append((f"largest model, {'DDP' if k == 'ddp' else 'ZeRO-' + k[-1]}, {sc['workers']} GPUs, batch "
                         f"{mb}/GPU", f"{r['max_params'] / 1e6:,.0f} M params (d={r['d_model']}, L={r['n_layers']}, "
                         f"{r['gib'] or 0:.0f} GiB/GPU; analytic)"))
    return rows


def _why(r: dict) -> str:
    return r.get("error") or r.get("skipped") or "not measured"


def run_gpu_bench(out: Path | None = None, budget_s: float = 420.0) -> dict:
    """All sections within budget_s seconds; returns the result dict (also written to `out` as JSON)."""
    import torch


    if not budget_s > 0:
        raise ConfigError(f"budget of {budget_s} s", field="--budget-s", hint="give a positive number of seconds")
    if out is not None:
        ensure_writable_dir(Path(out).parent)  # OutputError naming the folder, before anything runs
    t_start = time.monotonic()
    res: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget_s,
                 "torch": torch.__version__, "config": CONFIG.name}
    if not torch.cuda.is_available():
        res["skipped"] = f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"
        print(f"bench gpu: SKIPPED - {res['skipped']}; nothing measured", flush=True)
        _write(res, out)
        return res
    deadline = t_start + budget_s
    p = torch.cuda.get_device_properties(0)
    res["env"] = {"device": p.name, "memory_gib": p.total_memory / GiB, "capability": f"{p.major}.{p.minor}",
                  "cuda": torch.version.cuda}
    _section(res, "matmul", matmul_peak, deadline, 15)
    _section(res, "mfu", lambda: mfu(res["matmul"].get("bf16_tflops")), deadline, 60)
    _write(res, out)
    _section(res, "zero", zero, deadline, 120)
    _write(res, out)
    _section(res, "scaling", lambda: scaling(res.get("mfu", {}), res.get("zero", {}), res["env"]["memory_gib"]),
             deadline, 10)
    res["total_s"] = round(time.monotonic() - t_start, 1)
    try:
        table = _rows(res)
    except Exception as e:  # noqa: BLE001 - the JSON below still holds every measurement
        table = [("table", f"could not be printed ({type(e).__name__}: {e}); see the JSON")]
    print("\n| check | result |\n|---|---|")
    for what, val in table:
        print(f"| {what} | {val} |")
    print(f"\n(total {res['total_s']:.0f} s of a {budget_s:.0f} s budget)", flush=True)
    _write(res, out)
    return res
