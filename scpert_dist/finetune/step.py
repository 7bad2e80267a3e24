"""One finetuning step, beside `train/step.py` (the pretraining step): plain PyTorch, no Ray, no tracking.

A batch is `n_cond` training conditions x `k_cells` cells; each treated cell is paired with a random control cell
of its line from the `ControlPool` (its frozen-encoder states cached). Loss: per-cell MSE on genes standardised by
the control sd, + `cond_weight` x the condition-mean logFC error, + optional `mmd_weight` x energy distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..stats import logfc_pearson
from .config import FinetuneObjective, FinetuneOptim
from .data import ControlPool, Prepared
from .model import energy_distance


@dataclass
class Targets:
    """The training conditions and what the step compares with: condition keys, their rows, their true mean
    logFC vs the line's control mean [n_conditions, G], and the per-gene scale sd [G]."""

    keys: list
    groups: dict
    true_lfc: torch.Tensor
    sd: torch.Tensor

    @classmethod
    def build(cls, prep: Prepared, groups: dict) -> Targets:
        keys = list(groups)
        cm = prep.control_means()
        true_lfc = torch.from_numpy(np.stack([prep.X[groups[k]].mean(0) - cm[k[1]] for k in keys]))
        # genes weighted by 1/sd of control expression (pooled over lines)
        sd = torch.from_numpy(np.maximum(prep.X[prep.ctl].std(0), 0.05).astype(np.float32))
        return cls(keys, groups, true_lfc, sd)


def sample_batch(prep: Prepared, pool: ControlPool, tg: Targets, n_cond: int, k_cells: int, rng) -> dict:
    """Conditions, their treated rows and paired control-pool indices for one step."""
    ks = rng.choice(len(tg.keys), size=n_cond)
    rows = np.concatenate([rng.choice(tg.groups[tg.keys[k]], size=k_cells) for k in ks])
    pi = np.concatenate([pool.sample(tg.keys[k][1], k_cells, rng) for k in ks])
    return {"cond": ks, "rows": rows, "pool_idx": pi}


def finetune_step(model, opt, prep: Prepared, pool: ControlPool, tg: Targets, batch: dict, *, frozen: bool,
                  objective: FinetuneObjective) -> float:
    """Forward, loss (weighed by the config's objective section), backward, update on one batch; returns the loss."""
    cond_weight, mmd_weight = objective.cond_weight, objective.mmd_weight
    rows, pi = batch["rows"], batch["pool_idx"]
    ctrl = torch.from_numpy(pool.X[pi])
    h = pool.h[torch.from_numpy(pi)] if frozen else model.encode(ctrl)
    pred = model.head(h, ctrl, prep.drug_input(prep.drug[rows]), torch.from_numpy(prep.cell_idx[rows]),
                      torch.from_numpy(prep.dose[rows]))
    tgt = torch.from_numpy(prep.X[rows])
    loss = (((pred - tgt) / tg.sd) ** 2).mean()
    if cond_weight > 0:
        n_cond = len(batch["cond"])
        shift = (pred - ctrl).view(n_cond, len(rows) // n_cond, -1).mean(1)
        loss = loss + cond_weight * (((shift - tg.true_lfc[torch.from_numpy(batch["cond"])]) / tg.sd) ** 2).mean()
    if mmd_weight > 0:
        loss = loss + mmd_weight * energy_distance(pred, tgt)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _condition_inputs(prep: Prepared, keys: list) -> tuple:
    names = sorted({k[0] for k in keys})
    pos = {n: i for i, n in enumerate(names)}
    return (prep.drug_input(names), torch.tensor([pos[k[0]] for k in keys]),
            torch.tensor([prep.cells.index(k[1]) for k in keys]), torch.tensor([k[2] for k in keys], dtype=torch.float32))


def _shift(model, inp) -> torch.Tensor:
    """The shift head's condition-mean logFC; the drug encoder runs once per unique drug, not per condition."""
    return model.shift(model.drug(inp[0])[inp[1]], inp[2], inp[3])


def _mean_logfc_pearson(pred_lfc: torch.Tensor, true_lfc: torch.Tensor) -> float:
    """Mean over conditions of the logFC r of predicted vs true condition-mean changes [n, G] (`stats.logfc_pearson`,
    as validation and the benchmark score)."""
    r = [logfc_pearson(t, p, 0.0) for p, t in zip(pred_lfc.numpy(), true_lfc.numpy(), strict=True)]
    r = [x for x in r if np.isfinite(x)]
    return float(np.mean(r)) if r else float("nan")


def warm_start_shift(model, prep: Prepared, tg: Targets, optim: FinetuneOptim, vgroups: dict | None = None) -> dict:
    """Full-batch training of the drug encoder, dose gate and low-rank shift head on the training CONDITION MEANS
    (cheap: no per-cell decoder; `optim.cond_steps` steps at `optim.cond_lr`); the best state by
    validation-condition logFC Pearson is kept."""
    tr = _condition_inputs(prep, tg.keys)
    opt = torch.optim.AdamW([*model.drug.parameters(), *model.shift.parameters()], lr=optim.cond_lr,
                            weight_decay=optim.weight_decay)
    if vgroups:
        vk = list(vgroups)
        va = _condition_inputs(prep, vk)
        cm = prep.control_means()
        vt = torch.from_numpy(np.stack([prep.X[vgroups[k]].mean(0) - cm[k[1]] for k in vk]))
    best, best_state, rec = -np.inf, None, {"cond_steps": 0}
    for step in range(optim.cond_steps):
        loss = (((_shift(model, tr) - tg.true_lfc) / tg.sd) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if vgroups and (step % 10 == 9 or step == optim.cond_steps - 1):
            with torch.no_grad():
                r = _mean_logfc_pearson(_shift(model, va), vt)
            if r > best:
                best, best_state = r, {k: v.detach().clone() for k, v in model.state_dict().items()}
                rec = {"cond_steps": step + 1, "cond_val_logfc_pearson": r, "cond_train_loss": float(loss.detach())}
    if best_state is not None:
        model.load_state_dict(best_state)
    if vgroups:
        rec["drug_scale"] = fit_drug_scale(model, va, vt, tg.sd)
    return rec


@torch.no_grad()
def fit_drug_scale(model, inp, true_lfc: torch.Tensor, sd: torch.Tensor) -> float:
    """Shrink the shift head's drug-specific term towards the shared line response by the factor that fits the
    VALIDATION conditions best (least squares in the loss's gene scale, clipped to [0, 1]): what a held-out drug's
    structure (or signature) says beyond the average drug is trusted only as far as it predicted held-out drugs.
    Sets and returns model.shift.drug_scale."""
    drug, line = model.shift.parts(model.drug(inp[0])[inp[1]], inp[2], inp[3])
    a, r = drug / sd, (true_lfc - line) / sd
    lam = float((a * r).sum() / (a * a).sum().clamp_min(1e-12))
    lam = min(1.0, max(0.0, lam))
    model.shift.drug_scale.fill_(lam)
    return lam
