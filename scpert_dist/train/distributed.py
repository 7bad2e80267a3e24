"""Which parallelism wraps the Ray-free step: torch DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO 1/2/3.

'auto' picks DeepSpeed when the workers have CUDA and DDP otherwise: DeepSpeed's CPU path works (DS_ACCELERATOR=cpu)
but JIT-compiles its ops on first use (25-40 s each) and is not faster than DDP on CPU, so it is opt-in there.
"""

from __future__ import annotations

import os

from ..data.shards.stream import Cursor
from ..errors import CheckpointError


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


# ------------------------------------------------------------------------------------------- DeepSpeed checkpoints
DS_DIR, DS_TAG = "deepspeed", "zero"
"""Sub-folder of a Ray checkpoint holding DeepSpeed's own checkpoint, and its tag."""


def is_deepspeed(model) -> bool:
    return hasattr(model, "zero_optimization_stage") and hasattr(model, "save_checkpoint")


def ds_save(engine, folder) -> None:
    """Collective: every rank writes its own ZeRO partition (its optimizer-state shard and, under ZeRO-3, its
    parameter shard) into `folder/deepspeed`; rank 0 adds the module/scheduler states and the 'latest' tag. Each rank
    reports its folder to Ray Train, which puts the rank folders together into one checkpoint on the storage."""
    from pathlib import Path

    engine.save_checkpoint(str(Path(folder) / DS_DIR), tag=DS_TAG)


def check_pickles(folder) -> None:
    """Every .pt file under `folder` must load with torch.load(weights_only=True) (tensors and plain containers only)
    before DeepSpeed's own loader, which unpickles without that restriction, reads it."""
    from pathlib import Path

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address


    # the only non-tensor classes DeepSpeed 0.19 writes into a ZeRO 1/2/3 checkpoint (plain data holders)
    allowed = [LossScaler, ZeroStageEnum, fragment_address]
    for f in sorted(Path(folder).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any refusal means we do not unpickle it
            raise CheckpointError(f"checkpoint file not loadable with weights_only=True ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); refusing to unpickle it", path=str(f),
                                  hint="use a checkpoint written by scpert pretrain") from None


def ds_load(engine, folder) -> None:
    """Collective: restore every rank's partition, the optimizer and the LR scheduler from `folder/deepspeed`."""
    from pathlib import Path


    d = Path(folder) / DS_DIR
    check_pickles(d)
    path, _ = engine.load_checkpoint(str(d), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"no DeepSpeed checkpoint with tag '{DS_TAG}' in the checkpoint", path=str(d),
                              hint="the run was saved with another backend; resume it with the same scaling.backend")


def full_fp32_state(engine) -> dict:
    """Collective: the full fp32 weights (the optimizer's master copy under bf16; gathered from every rank's shard
    under ZeRO-3) as a CPU state dict, the same on every rank."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        t = safe_get_full_fp32_param(p)
        if t is None:
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p]):
                    t = p.detach().clone()
            else:
                t = p.detach()
        out[name] = t.float().cpu().clone()
    for name, b in engine.module.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out


def gather_cursor(cursor: Cursor | None, rank: int, world: int) -> Cursor | None:
    """Collective: every worker's position in the epoch (the plan ranks it serves) as one cursor, O(world) (what a
    checkpoint records for the epoch)."""
    if world == 1:
        return cursor.copy() if cursor is not None else None
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, None if cursor is None else (cursor.epoch, cursor.world, cursor.of(rank, world)))
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    out = Cursor(parts[0][0], parts[0][1])
    for _, _, pos in parts:
        out.pos.update(pos)
    return out
