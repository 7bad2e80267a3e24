"""Which parallelism wraps the Ray-free step: torch DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO 1/2/3.

'auto' picks DeepSpeed when the workers have CUDA and DDP otherwise: DeepSpeed's CPU path works (DS_ACCELERATOR=cpu)
but JIT-compiles its ops on first use (25-40 s each) and is not faster than DDP on CPU, so it is opt-in there.
"""

from __future__ import annotations

import os


def resolve_backend(scaling) -> str:
    import torch

    if scaling.backend == "auto":
        return "deepspeed" if (scaling.use_gpu and torch.cuda.is_available()) else "ddp"
    return scaling.backend


def deepspeed_config(scaling, batch_size: int, grad_clip: float) -> dict:
    import torch

    cfg = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": scaling.zero_stage, "overlap_comm": torch.cuda.is_available(),
                              "contiguous_gradients": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if scaling.bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def wrap(model, opt, sched, scaling, *, batch_size: int, grad_clip: float):
    """-> (model_or_engine, opt, sched, device, backend). DDP via ray.train.torch.prepare_model; DeepSpeed via
    deepspeed.initialize with our optimizer and scheduler (ZeRO partitions the optimizer state)."""
    import ray.train.torch as rtt
    import torch

    backend = resolve_backend(scaling)
    if backend == "deepspeed":
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        engine, opt, _, sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched,
            config=deepspeed_config(scaling, batch_size, grad_clip))
        return engine, opt, sched, engine.device, backend
    device = rtt.get_device()
    model = rtt.prepare_model(model)  # moves to the device; DDP when world size > 1
    return model, opt, sched, device, backend
