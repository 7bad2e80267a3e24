"""The pretraining step in plain PyTorch (no Ray): masking with a seeded generator, forward, loss, backward,
gradient clipping, optimizer step and a linear-warmup + cosine LR schedule. Benchmarkable alone.

It takes the pretraining config's `optim` and `objective` sections (train/settings.py) as they are."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model.masking import random_mask
from .settings import Objective, OptimSection


def make_optimizer(model: nn.Module, optim: OptimSection, total_steps: int):
    """AdamW + LambdaLR (linear warmup, cosine to 0.1*lr at `total_steps`, the length of the whole schedule)."""
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)

    def lr_lambda(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / max(1, optim.warmup_steps)
        t = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train_step(model: nn.Module, batch: dict, opt, sched, optim: OptimSection, objective: Objective,
               generator: torch.Generator | None = None, loss_scale: float = 1.0) -> dict[str, float]:
    """One optimisation step. `batch` needs 'expr' [B,G] (+ label keys of enabled tasks); a 'mask' is drawn
    from `generator` when absent. Returns the loss parts, 'grad_norm' and 'lr'."""
    model.train()
    expr = batch["expr"].float()
    gene_index = None
    if 0 < objective.gene_sample < expr.shape[1]:  # a random subset of the panel this step (same for the batch)
        dev = generator.device if generator is not None else "cpu"
        gene_index = torch.randperm(expr.shape[1], generator=generator, device=dev)[:objective.gene_sample].sort().values
        gene_index = gene_index.to(expr.device)
        expr = expr[:, gene_index]
        batch = dict(batch, expr=expr, **({"mask": batch["mask"][:, gene_index]} if "mask" in batch else {}))
    if "mask" not in batch:
        batch = dict(batch, mask=random_mask(expr.shape[0], expr.shape[1], objective.mask_ratio, generator=generator,
                                             device=expr.device))
    core = getattr(model, "module", model)
    out = model(expr, batch["mask"]) if gene_index is None else model(expr, batch["mask"], gene_index)
    loss, logs = core.loss(out, batch)
    if loss_scale != 1.0:  # 0 for a padding step of a worker whose partition ran out (keeps DDP in step)
        loss = loss * loss_scale
    if hasattr(model, "backward") and hasattr(model, "zero_optimization_stage"):  # a DeepSpeed engine
        model.backward(loss)
        model.step()  # clips, steps the optimizer and the scheduler given to deepspeed.initialize
        logs["lr"] = opt.param_groups[0]["lr"]
        gn = model.get_global_grad_norm()
        logs["grad_norm"] = float(gn) if gn is not None else float("nan")
        return logs
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if optim.grad_clip > 0:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    else:
        gn = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in model.parameters() if p.grad is not None))
    opt.step()
    logs["lr"] = opt.param_groups[0]["lr"]
    sched.step()
    logs["grad_norm"] = float(gn)
    return logs
