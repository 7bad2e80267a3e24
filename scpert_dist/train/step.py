"""The pretraining step in plain PyTorch (no Ray): masking with a seeded generator, forward, loss, backward,
gradient clipping, optimizer step and a linear-warmup + cosine LR schedule. Benchmarkable alone."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from scpert_dist.model.masking import random_mask


@dataclass
class OptimConfig:
    """AdamW with a linear-warmup + cosine schedule: the one definition of these settings (the pretraining config's
    `optim` section extends it with batch size and epochs)."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warmup steps before cosine decay (20: the pretraining default every earlier run used; the step-only
    config had 10, which nothing relied on)."""
    grad_clip: float = 1.0
    """Max global grad norm (<= 0 disables clipping)."""
    gene_sample: int = 0
    """Gene tokens per step (0 = every gene): each step reads a fresh random subset of the panel, as scGPT samples
    genes; attention costs O(tokens^2), so 256 of 978 makes a step ~8x cheaper. The encoder still reads any gene
    set at inference (a token is its gene's embedding + its value)."""


@dataclass
class StepConfig(OptimConfig):
    """Settings of one step: the optimiser's plus the schedule length and the mask ratio."""

    total_steps: int = 100
    """Steps of the whole schedule (cosine reaches 10% of lr at the end)."""
    mask_ratio: float = 0.15
    """Fraction of gene tokens masked per row."""

    @classmethod
    def of(cls, optim: OptimConfig, *, total_steps: int, mask_ratio: float) -> StepConfig:
        """The step settings of a run: `optim`'s OptimConfig fields (a subclass may carry more) + schedule + mask."""
        return cls(**{f.name: getattr(optim, f.name) for f in fields(OptimConfig)}, total_steps=total_steps,
                   mask_ratio=mask_ratio)


def make_optimizer(model: nn.Module, cfg: StepConfig):
    """AdamW + LambdaLR (linear warmup, cosine to 0.1*lr)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_lambda(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def train_step(model: nn.Module, batch: dict, opt, sched, cfg: StepConfig,
               generator: torch.Generator | None = None, loss_scale: float = 1.0) -> dict[str, float]:
    """One optimisation step. `batch` needs 'expr' [B,G] (+ label keys of enabled tasks); a 'mask' is drawn
    from `generator` when absent. Returns the loss parts, 'grad_norm' and 'lr'."""
    model.train()
    expr = batch["expr"].float()
    gene_index = None
    if 0 < cfg.gene_sample < expr.shape[1]:  # a random subset of the panel this step (same for the whole batch)
        dev = generator.device if generator is not None else "cpu"
        gene_index = torch.randperm(expr.shape[1], generator=generator, device=dev)[:cfg.gene_sample].sort().values
        gene_index = gene_index.to(expr.device)
        expr = expr[:, gene_index]
        batch = dict(batch, expr=expr, **({"mask": batch["mask"][:, gene_index]} if "mask" in batch else {}))
    if "mask" not in batch:
        batch = dict(batch, mask=random_mask(expr.shape[0], expr.shape[1], cfg.mask_ratio, generator=generator,
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
    if cfg.grad_clip > 0:
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    else:
        gn = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in model.parameters() if p.grad is not None))
    opt.step()
    logs["lr"] = opt.param_groups[0]["lr"]
    sched.step()
    logs["grad_norm"] = float(gn)
    return logs
