"""Finetune model: control cell -> GeneTokenEncoder -> what the decoder reads + condition embedding -> decoder ->
perturbed cell (+ a low-rank shift head).

Condition = drug (learned table or RDKit / LINCS features -> MLP) + cell line (table) + dose (MLP of log10(dose+eps)
times a learned Hill-like gate; vehicle rows get a learned 'control' vector, so neither control nor the top dose is
erased). The decoder is one of `finetune/decoders.py`'s classes, chosen by its registered name (registry.DECODERS).
Rows of a batch that share a condition (consecutive equal drug, line and dose) get the condition encoders and the shift
head computed once (`condition_runs`): the same numbers, without repeating the drug MLP for every cell.

A saved model is rebuilt from its init parameters (`FinetuneModel.init_params`, with the decoder's and the drug
representation's registered names) and its encoder's ModelConfig: `checkpoint/finetuned.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import DECODERS, DRUG_REPS
from .decoders import mlp


class DoseEncoder(nn.Module):
    """dose_um -> [B, d]; controls (dose 0) -> a learned control vector; treated: MLP(log10 dose) * Hill gate."""

    def __init__(self, d: int, hidden: int = 32):
        super().__init__()
        self.mlp = mlp(1, hidden, d)
        self.log_ec50 = nn.Parameter(torch.zeros(()))
        self.hill = nn.Parameter(torch.ones(()))
        self.control = nn.Parameter(torch.randn(d) * 0.02)

    def forward(self, dose_um: torch.Tensor) -> torch.Tensor:
        ld = torch.log10(dose_um.clamp_min(0) + 1e-3).unsqueeze(-1)
        gate = torch.sigmoid(self.hill * (ld - self.log_ec50))
        treated = self.mlp(ld) * (0.5 + gate)
        is_ctl = (dose_um <= 0).unsqueeze(-1)
        return torch.where(is_ctl, self.control.expand_as(treated), treated)


class ShiftHead(nn.Module):
    """Per-gene shift = gate(dose, drug) * ((drug vector * (1 + line modulation)) . V_g) + gate0(dose) * b_line,g.
    V [G, d] is initialised from the encoder's gene embeddings (genes the pretraining placed together start
    together); b_line is the response shared by all drugs of a line. Gates are Hill curves in log10 dose (the drug
    gate with a drug-dependent log EC50); vehicle rows get exactly 0."""

    def __init__(self, d: int, n_genes: int, n_cells: int, gene_emb: torch.Tensor | None = None):
        super().__init__()
        v = gene_emb.detach().clone() if gene_emb is not None and gene_emb.shape == (n_genes, d) else None
        if v is None:
            v = torch.randn(n_genes, d) * 0.02
        self.V = nn.Parameter(v / v.norm(dim=1, keepdim=True).clamp_min(1e-6).mean() * d ** -0.5)
        self.line = nn.Embedding(max(1, n_cells), d)
        nn.init.zeros_(self.line.weight)
        self.ec50 = nn.Linear(d, 1)
        nn.init.zeros_(self.ec50.weight)
        self.hill = nn.Parameter(torch.tensor(1.5))
        # the response shared by all drugs in a line (what the mean_drug baseline predicts), with its own dose gate
        self.line_bias = nn.Embedding(max(1, n_cells), n_genes)
        nn.init.zeros_(self.line_bias.weight)
        self.ec50_0 = nn.Parameter(torch.zeros(()))
        self.hill_0 = nn.Parameter(torch.tensor(1.5))
        # how much of the drug-specific term to trust for drugs not trained on: set from VALIDATION drugs after the
        # warm start (`fit_drug_scale`), 1 until then; a buffer, saved with the model
        self.register_buffer("drug_scale", torch.ones(()))
        # the average training drug's response per (line, training dose) - what the mean_drug baseline predicts -,
        # interpolated in log10 dose; set by `set_anchor` from the training conditions (zeros: no anchor)
        self.register_buffer("anchor_logd", torch.zeros(1))
        self.register_buffer("anchor", torch.zeros(max(1, n_cells), 1, n_genes))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "drug_scale", torch.ones(()))  # models saved before these buffers existed
        state_dict.setdefault(prefix + "anchor_logd", self.anchor_logd)
        state_dict.setdefault(prefix + "anchor", self.anchor)
        self.anchor_logd = torch.empty_like(state_dict[prefix + "anchor_logd"])
        self.anchor = torch.empty_like(state_dict[prefix + "anchor"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_anchor(self, cell_idx: torch.Tensor, dose_um: torch.Tensor, lfc: torch.Tensor) -> None:
        """Anchor the line term on the mean response of the training conditions [n, G] per (line, dose)."""
        doses = torch.unique(dose_um[dose_um > 0])
        A = torch.zeros(self.line.num_embeddings, len(doses), lfc.shape[1])
        for j, d in enumerate(doses):
            for c in torch.unique(cell_idx):
                sel = (dose_um == d) & (cell_idx == c)
                if sel.any():
                    A[c, j] = lfc[sel].mean(0)
        self.anchor_logd, self.anchor = torch.log10(doses), A

    def _anchored(self, cell_idx, ld) -> torch.Tensor:
        x, A = self.anchor_logd, self.anchor[cell_idx]          # [K], [B, K, G]
        if len(x) == 1:
            return A[:, 0]
        t = ld.squeeze(-1).clamp(x[0], x[-1])
        j = torch.searchsorted(x, t.contiguous(), right=True).clamp(1, len(x) - 1)
        w = ((t - x[j - 1]) / (x[j] - x[j - 1])).unsqueeze(-1)
        rows = torch.arange(len(t), device=t.device)
        return (1 - w) * A[rows, j - 1] + w * A[rows, j]

    def parts(self, drug_vec, cell_idx, dose_um) -> tuple[torch.Tensor, torch.Tensor]:
        """(drug-specific term, shared line term) of the shift, unscaled; vehicle rows 0."""
        ld = torch.log10(dose_um.clamp_min(1e-6)).unsqueeze(-1)
        keep = (dose_um > 0).unsqueeze(-1).to(drug_vec.dtype)
        gate = torch.sigmoid(self.hill * (ld - self.ec50(drug_vec)))
        gate0 = torch.sigmoid(self.hill_0 * (ld - self.ec50_0))
        u = drug_vec * (1 + self.line(cell_idx))
        line = gate0 * self.line_bias(cell_idx) + self._anchored(cell_idx, ld)
        return keep * gate * (u @ self.V.T), keep * line

    def forward(self, drug_vec, cell_idx, dose_um) -> torch.Tensor:
        drug, line = self.parts(drug_vec, cell_idx, dose_um)
        return self.drug_scale * drug + line


def condition_runs(*keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of consecutive rows equal in every key tensor (dim 0 = row): (index of each run's first row [R],
    run of each row [B]), so x[first][inv] == x for every key. A batch of conditions x cells has one run per
    condition; an unsorted batch just gets more runs."""
    n = keys[0].shape[0]
    same = torch.ones(max(n - 1, 0), dtype=torch.bool, device=keys[0].device)
    for k in keys:
        eq = k[1:] == k[:-1]
        same &= eq.flatten(1).all(1) if eq.dim() > 1 else eq
    start = torch.cat([same.new_ones(min(n, 1)), ~same])
    return start.nonzero().squeeze(1), start.cumsum(0) - 1


class FinetuneModel(nn.Module):
    """forward(ctrl [B,G], drug_idx [B] | drug_feat [B,F], cell_idx [B], dose_um [B]) -> predicted expression [B,G].

    = ctrl + decoder(encoder states of ctrl, condition embedding) [+ low-rank shift head]. `encode` and `head` split
    the two halves so a frozen encoder's states can be cached once for a pool of control cells. `decoder` and
    `drug_rep` are registered names (registry.DECODERS, registry.DRUG_REPS); `init_params` holds every argument but the
    encoder, which is what a saved model is rebuilt from."""

    def __init__(self, encoder: nn.Module, *, n_genes: int, n_cells: int, decoder: str, gene_block: int,
                 drug_rep: str, n_drugs: int = 0, drug_feat_dim: int = 0, cond_hidden: int = 64,
                 shift_head: bool = True):
        super().__init__()
        self.init_params = {"n_genes": n_genes, "n_cells": n_cells, "decoder": DECODERS.check(decoder),
                     "gene_block": gene_block, "drug_rep": DRUG_REPS.check(drug_rep), "n_drugs": n_drugs,
                     "drug_feat_dim": drug_feat_dim, "cond_hidden": cond_hidden, "shift_head": shift_head}
        d = encoder.cfg.d_model
        self.encoder, self.drug_rep = encoder, drug_rep
        if DRUG_REPS[drug_rep].table:
            self.drug = nn.Embedding(max(1, n_drugs), d)
        else:
            self.drug = mlp(drug_feat_dim, cond_hidden, d)
        self.cell = nn.Embedding(max(1, n_cells), d)
        self.dose = DoseEncoder(d)
        emb = getattr(getattr(encoder, "gene_emb", None), "weight", None)
        self.decoder = DECODERS[decoder](d, n_genes, gene_block, emb)
        self.shift = ShiftHead(d, n_genes, n_cells, emb) if shift_head else None

    def condition(self, drug: torch.Tensor, cell_idx: torch.Tensor, dose_um: torch.Tensor):
        """(condition vector [B, d] for the decoder, drug vector [B, d])."""
        is_ctl = (dose_um <= 0).unsqueeze(-1)
        de = self.drug(drug)
        de = torch.where(is_ctl, torch.zeros_like(de), de)
        return de + self.cell(cell_idx) + self.dose(dose_um), de

    def encode(self, ctrl: torch.Tensor) -> torch.Tensor:
        """What the decoder reads of the control cells (`Decoder.states`), cacheable while the encoder is fixed."""
        return self.decoder.states(self.encoder(ctrl))

    def head(self, h, ctrl, drug, cell_idx, dose_um, read=None) -> torch.Tensor:
        """h: `encode` of the control cells, or None with `read` = decoder.read(h) cached (a trained model). The
        condition encoders and the shift head run once per run of rows with the same condition."""
        first, inv = condition_runs(drug, cell_idx, dose_um)
        cu, deu = self.condition(drug[first], cell_idx[first], dose_um[first])
        shift = None if self.shift is None else self.shift(deu, cell_idx[first], dose_um[first])[inv]
        return self.decoder(self.decoder.read(h) if read is None else read, cu[inv], ctrl, shift)

    def forward(self, ctrl, drug, cell_idx, dose_um) -> torch.Tensor:
        return self.head(self.encode(ctrl), ctrl, drug, cell_idx, dose_um)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()
