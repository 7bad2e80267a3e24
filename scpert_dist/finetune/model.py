"""Finetune model: control cell -> GeneTokenEncoder -> per-gene states + condition embedding -> decoder -> perturbed cell.

Condition = drug (learned table or RDKit features -> MLP) + cell line (table) + dose (MLP of log10(dose+eps) times a
learned Hill-like gate; vehicle rows get a learned 'control' vector, so neither control nor the top dose is erased).
Decoders: factor (the default) is not sequential: per-gene change = gene factors U [G, r] . MLP(pooled cell state,
condition), where the pooled state ([CLS] + mean gene state of the control cell, [B, 2d]) is what `encode` returns, so
a frozen encoder's pool caches [N, 2d] per cell instead of [N, G, d]. lstm / gru / transformer run over a real
sequence of gene blocks (G/gene_block steps); mlp is per gene.
Rows of a batch that share a condition (consecutive equal drug, line and dose) get the condition encoders and the shift
head computed once (`condition_runs`): the same numbers, without repeating the drug MLP for every cell.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError

DECODERS = ("factor", "lstm", "gru", "mlp", "transformer")
FACTOR_RANK = 64
"""Rank of the factor decoder's per-gene factors (at most d_model)."""


def mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


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


class Decoder(nn.Module):
    def __init__(self, kind: str, d: int, n_genes: int, block: int, gene_emb: torch.Tensor | None = None):
        super().__init__()
        if kind not in DECODERS:
            raise ConfigError(f"unknown decoder {kind!r}", field="model.decoder", hint=f"one of {DECODERS}")
        self.kind, self.block, self.n_genes = kind, max(1, block), n_genes
        self.n_steps = math.ceil(n_genes / self.block)
        if kind == "factor":
            self.norm = nn.LayerNorm(2 * d)
            r = min(d, FACTOR_RANK)
            self.net = mlp(3 * d, 2 * d, r)  # -> the cell's coordinates u on the gene factors
            self.U = nn.Parameter(gene_factors(gene_emb, n_genes, r))
            self.bias = nn.Parameter(torch.zeros(n_genes))
        elif kind == "mlp":
            self.net = mlp(d, d, 1)
        else:
            self.inp = nn.Linear(d * self.block, d)
            if kind == "lstm":
                self.rnn = nn.LSTM(d, d, batch_first=True)
            elif kind == "gru":
                self.rnn = nn.GRU(d, d, batch_first=True)
            else:
                layer = nn.TransformerEncoderLayer(d, 2, 2 * d, 0.0, batch_first=True, norm_first=True)
                self.rnn = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.out = nn.Linear(d, self.block)
        last = self.net[2] if kind in ("mlp", "factor") else self.out
        nn.init.normal_(last.weight, std=1e-3)  # starts near 'no change from the control cell'; learns the residual
        nn.init.zeros_(last.bias)
        self.last_seq_len = 0

    @property
    def pooled(self) -> bool:
        """True: the decoder reads one pooled state per cell ([B, 2d], see `states`), not per-gene states."""
        return self.kind == "factor"

    def states(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the decoder reads from the encoder's output tokens [B, 1+G, d] (position 0 = [CLS]): per-gene
        states [B, G, d], or for the factor decoder the pooled cell state [B, 2d] = ([CLS], mean gene state)."""
        if self.pooled:
            return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)
        return tokens[:, 1:]

    def factor(self, h: torch.Tensor, c: torch.Tensor | None, base: torch.Tensor | None = None) -> torch.Tensor:
        """[base +] U . u + bias per gene, u = MLP(LayerNorm(pooled h), c): a per-cell, condition-dependent change of
        rank r over genes. O(B * G * r), no loop over genes. `base` [B, G] (what the caller adds anyway: control +
        shift) is the matmul's input instead of a separate pass. (A further per-gene, condition-dependent rescaling
        of the control's own values was tried: lower training loss, but it shrank predicted cells towards the mean:
        energy distance 3.8 vs 1.3 and DE50 logFC r 0.06 vs 0.16 on held-out drugs; benchmarks/RESULTS.md.)"""
        z = self.norm(h)
        if c is None:
            c = z.new_zeros(z.shape[0], z.shape[1] // 2)
        self.last_seq_len = 1
        return torch.addmm(self.bias if base is None else base + self.bias, self.net(torch.cat([z, c], -1)), self.U.T)

    @property
    def sequential(self) -> bool:
        return self.kind not in ("mlp", "factor")

    def pad(self, h: torch.Tensor) -> torch.Tensor:
        """[B, G, d] -> [B, n_steps * block, d], zero-padded (a padded input is returned as is)."""
        B, G, d = h.shape
        pad = self.n_steps * self.block - G
        return torch.cat([h, h.new_zeros(B, pad, d)], 1) if pad > 0 else h

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Gene-block inputs of the sequence, inp(blocks of h) [B, n_steps, d], for states h [B, G(+pad), d]. It
        depends on the cell only, so a fixed pool's projection can be cached (prediction)."""
        B = h.shape[0]
        return self.inp(self.pad(h).reshape(B, self.n_steps, -1))

    def cond_proj(self, c: torch.Tensor) -> torch.Tensor:
        """What adding the condition vector c [B, d] to every real gene token adds to project(): the same as
        project(h + c) - project(h), without materialising h + c ([B, G, d]) and its blocks: per step, c times the
        sum of inp's weight blocks over the step's real genes (padding positions carry no condition). [B, n_steps, d]"""
        d_out = self.inp.weight.shape[0]
        W = self.inp.weight.view(d_out, self.block, -1)                          # [d_out, block, d_in]
        real = (torch.arange(self.n_steps * self.block, device=c.device) < self.n_genes)
        real = real.view(self.n_steps, self.block).to(W.dtype)
        w_step = torch.einsum("sk,okj->soj", real, W)                            # [n_steps, d_out, d_in]
        return torch.einsum("bj,soj->bso", c, w_step)

    def forward(self, h: torch.Tensor | None, c: torch.Tensor | None = None,
                proj: torch.Tensor | None = None) -> torch.Tensor:
        """Per-gene output [B, n_genes] for encoder states h [B, G(+pad), d] plus the condition vector c [B, d] on
        every gene token; sequence decoders may get `proj` = project(h) precomputed instead of h. The factor decoder
        takes the pooled states h [B, 2d] instead."""
        if self.pooled:
            return self.factor(h, c)
        if not self.sequential:
            hh = h[:, :self.n_genes]
            if c is not None:
                hh = hh + c.unsqueeze(1)
            self.last_seq_len = 1
            return self.net(hh).squeeze(-1)
        seq = proj if proj is not None else self.project(h)
        if c is not None:
            seq = seq + self.cond_proj(c)
        B = seq.shape[0]
        self.last_seq_len = seq.shape[1]
        y = self.rnn(seq)[0] if self.kind in ("lstm", "gru") else self.rnn(seq)
        return self.out(y).reshape(B, -1)[:, :self.n_genes]


def gene_factors(gene_emb: torch.Tensor | None, n_genes: int, r: int) -> torch.Tensor:
    """Initial per-gene factors [G, r]: the encoder's gene embeddings [G, d] (genes the pretraining placed together
    start together; projected on their top r principal directions when r < d), scaled to unit mean norm; random
    ones without embeddings."""
    v = gene_emb.detach().float().clone() if gene_emb is not None and gene_emb.shape[0] == n_genes else None
    if v is None:
        v = torch.randn(n_genes, r)
    elif v.shape[1] > r:
        v = v @ torch.linalg.svd(v - v.mean(0), full_matrices=False)[2][:r].T
    elif v.shape[1] < r:
        v = torch.cat([v, torch.randn(n_genes, r - v.shape[1]) * v.std()], 1)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-6).mean()


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

    = ctrl + decoder(encoder states of ctrl + condition embedding) [+ low-rank shift head]. `encode` and `head`
    split the two halves so a frozen encoder's states can be cached once for a pool of control cells."""

    def __init__(self, encoder: nn.Module, *, n_genes: int, n_cells: int, decoder: str, gene_block: int,
                 drug_rep: str, n_drugs: int = 0, drug_feat_dim: int = 0, cond_hidden: int = 64,
                 shift_head: bool = True):
        super().__init__()
        d = encoder.cfg.d_model
        self.encoder, self.drug_rep = encoder, drug_rep
        if drug_rep == "learned":
            self.drug = nn.Embedding(max(1, n_drugs), d)
        else:
            self.drug = mlp(drug_feat_dim, cond_hidden, d)
        self.cell = nn.Embedding(max(1, n_cells), d)
        self.dose = DoseEncoder(d)
        emb = getattr(getattr(encoder, "gene_emb", None), "weight", None)
        self.decoder = Decoder(decoder, d, n_genes, gene_block, emb)
        self.shift = ShiftHead(d, n_genes, n_cells, emb) if shift_head else None

    def condition(self, drug: torch.Tensor, cell_idx: torch.Tensor, dose_um: torch.Tensor):
        """(condition vector [B, d] for the decoder, drug vector [B, d])."""
        is_ctl = (dose_um <= 0).unsqueeze(-1)
        de = self.drug(drug)
        de = torch.where(is_ctl, torch.zeros_like(de), de)
        return de + self.cell(cell_idx) + self.dose(dose_um), de

    def encode(self, ctrl: torch.Tensor) -> torch.Tensor:
        """What the decoder reads of the control cells: per-gene states [B, G, d], or pooled [B, 2d] (factor)."""
        return self.decoder.states(self.encoder(ctrl))

    def head(self, h, ctrl, drug, cell_idx, dose_um, proj=None) -> torch.Tensor:
        """h: `encode` of the control cells (or None with proj = decoder.project(h) for sequence decoders). The
        condition encoders and the shift head run once per run of rows with the same condition."""
        first, inv = condition_runs(drug, cell_idx, dose_um)
        cu, deu = self.condition(drug[first], cell_idx[first], dose_um[first])
        shift = None if self.shift is None else self.shift(deu, cell_idx[first], dose_um[first])[inv]
        if self.decoder.pooled:  # control + shift go into the decoder's matmul: fewer passes over [B, G]
            return self.decoder.factor(h, cu[inv], ctrl if shift is None else ctrl + shift)
        out = ctrl + self.decoder(h, cu[inv], proj=proj)    # residual: predict the change from the control
        return out if shift is None else out + shift

    def forward(self, ctrl, drug, cell_idx, dose_um) -> torch.Tensor:
        return self.head(self.encode(ctrl), ctrl, drug, cell_idx, dose_um)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()
