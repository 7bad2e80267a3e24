"""Pretraining heads on the gene-token encoder, the multi-task loss, and the Table-1 metrics.

Heads: masked-expression regression per gene token (always computed), and on the [CLS] token: cell-line
classification, compound classification, dose regression (log10 uM), for the enabled tasks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, check_heads, parse_tasks
from .encoder import GeneTokenEncoder
from .masking import random_mask

IGNORE_INDEX = -1
"""cell_idx / drug_idx value for an unknown label (row excluded from that loss and metric)."""


def _mlp_head(d: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, out))


class PretrainModel(nn.Module):
    """Encoder + the heads of the objective's tasks (`tasks`: the pretraining's objective.heads). forward(values,
    mask) -> {'mask_pred' [B,G], 'cell_logits' [B,n_cells], 'drug_logits' [B,n_drugs], 'dose_pred' [B]} (the last
    three only for enabled tasks)."""

    def __init__(self, cfg: ModelConfig, tasks=("mask",)):
        super().__init__()
        self.tasks = tuple(parse_tasks(tasks))
        check_heads(cfg, self.tasks)
        self.cfg = cfg
        self.encoder = GeneTokenEncoder(cfg)
        d = cfg.d_model
        self.mask_head = _mlp_head(d, 1)
        self.cell_head = nn.Linear(d, cfg.n_cells) if "cell" in self.tasks else None
        self.drug_head = nn.Linear(d, cfg.n_drugs) if "drug" in self.tasks else None
        self.dose_head = _mlp_head(d, 1) if "dose" in self.tasks else None
        for m in [self.mask_head, self.cell_head, self.drug_head, self.dose_head]:
            if m is None:
                continue
            for mm in m.modules():
                if isinstance(mm, nn.Linear):
                    nn.init.normal_(mm.weight, std=0.02)
                    nn.init.zeros_(mm.bias)

    def forward(self, values: Tensor, mask: Tensor | None = None, gene_index: Tensor | None = None) -> dict:
        h = self.encoder(values, mask, gene_index)
        cls, tok = h[:, 0], h[:, 1:]
        out = {"mask_pred": self.mask_head(tok).squeeze(-1)}
        if self.cell_head is not None:
            out["cell_logits"] = self.cell_head(cls)
        if self.drug_head is not None:
            out["drug_logits"] = self.drug_head(cls)
        if self.dose_head is not None:
            out["dose_pred"] = self.dose_head(cls).squeeze(-1)
        return out

    def loss(self, out: dict, batch: dict) -> tuple[Tensor, dict[str, float]]:
        """Sum of the enabled task losses, and a dict of floats (loss, loss_mask, loss_cell, ...).

        mask: MSE over masked positions only (positions without a measured value, NaN, are no target); cell/drug: cross-entropy (label -1 = unknown, excluded);
        dose: MSE on rows with a finite log_dose (NaN = vehicle/unknown). A task with no valid row in the batch
        contributes 0 (kept in the graph so every DDP rank has the same parameters in use)."""
        tasks = self.tasks
        parts: dict[str, Tensor] = {}
        pred = out["mask_pred"].float()
        if "mask" in tasks:
            expr = batch["expr"].to(pred.device, torch.float32)
            m = batch["mask"].to(pred.device, torch.bool) & torch.isfinite(expr)  # unmeasured genes (NaN): no target
            err = torch.where(m, pred - torch.where(m, expr, 0.0), 0.0)
            parts["mask"] = err.pow(2).sum() / m.sum().clamp(min=1)
        for task, key, idx in (("cell", "cell_logits", "cell_idx"), ("drug", "drug_logits", "drug_idx")):
            if task in tasks:
                logits = out[key].float()
                y = batch[idx].to(logits.device, torch.long)
                valid = y != IGNORE_INDEX
                if bool(valid.any()):
                    parts[task] = F.cross_entropy(logits[valid], y[valid])
                else:
                    parts[task] = logits.sum() * 0.0
        if "dose" in tasks:
            dp = out["dose_pred"].float()
            ld = batch["log_dose"].to(dp.device, torch.float32)
            ok = torch.isfinite(ld)
            parts["dose"] = (dp[ok] - ld[ok]).pow(2).mean() if bool(ok.any()) else dp.sum() * 0.0
        total = sum(parts.values())
        logs = {"loss": float(total.detach())}
        logs.update({f"loss_{k}": float(v.detach()) for k, v in parts.items()})
        return total, logs


@torch.no_grad()
def table1_metrics(model: nn.Module, batches: Iterable[dict], mask_ratio: float, seed: int = 0) -> dict:
    """Table-1 metrics on held-out batches (each with 'expr' and the label keys of the enabled tasks):
    cell_acc, drug_acc (rows with label != -1), dose_rmse (rows with finite log_dose, log10 uM) and mask_rmse
    (masked positions of a fresh random mask drawn from `seed`, so runs are comparable; unmeasured genes, NaN, are
    skipped). Only the enabled tasks
    are reported; 'n_rows' is the number of profiles seen. The model's training mode is restored afterwards."""
    core = getattr(model, "module", model)
    core = getattr(core, "_orig_mod", core)
    tasks = core.tasks
    device = next(core.parameters()).device
    was_training = core.training
    core.eval()
    gen = torch.Generator().manual_seed(seed)
    acc = {"mask_se": 0.0, "mask_n": 0, "cell_ok": 0, "cell_n": 0, "drug_ok": 0, "drug_n": 0,
           "dose_se": 0.0, "dose_n": 0, "rows": 0}
    try:
        for batch in batches:
            expr = torch.as_tensor(batch["expr"], dtype=torch.float32, device=device)
            B, G = expr.shape
            m = random_mask(B, G, mask_ratio, generator=gen).to(device)
            out = core(expr, m)
            acc["rows"] += B
            scored = m & torch.isfinite(expr)  # genes a file did not measure (NaN) are not scored
            err = (out["mask_pred"].float() - expr)[scored]
            acc["mask_se"] += float(err.pow(2).sum())
            acc["mask_n"] += int(scored.sum())
            for task, key, idx in (("cell", "cell_logits", "cell_idx"), ("drug", "drug_logits", "drug_idx")):
                if task in tasks and idx in batch:
                    y = torch.as_tensor(batch[idx], dtype=torch.long, device=device)
                    v = y != IGNORE_INDEX
                    acc[f"{task}_ok"] += int((out[key].argmax(-1)[v] == y[v]).sum())
                    acc[f"{task}_n"] += int(v.sum())
            if "dose" in tasks and "log_dose" in batch:
                ld = torch.as_tensor(batch["log_dose"], dtype=torch.float32, device=device)
                ok = torch.isfinite(ld)
                acc["dose_se"] += float((out["dose_pred"].float()[ok] - ld[ok]).pow(2).sum())
                acc["dose_n"] += int(ok.sum())
    finally:
        core.train(was_training)

    def ratio(a: float, n: int) -> float:
        return a / n if n else float("nan")

    res: dict = {"n_rows": acc["rows"]}
    if "mask" in tasks:
        res["mask_rmse"] = math.sqrt(ratio(acc["mask_se"], acc["mask_n"]))
    if "cell" in tasks:
        res["cell_acc"] = ratio(acc["cell_ok"], acc["cell_n"])
    if "drug" in tasks:
        res["drug_acc"] = ratio(acc["drug_ok"], acc["drug_n"])
    if "dose" in tasks:
        res["dose_rmse"] = math.sqrt(ratio(acc["dose_se"], acc["dose_n"]))
    return res
