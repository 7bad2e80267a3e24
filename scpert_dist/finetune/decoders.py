"""Finetuning decoders, one class per kind behind one interface (`Decoder`), registered by name in
`scpert_dist/registry.py: DECODERS` (the name a config gives and a saved model records).

A decoder turns what it reads of a control cell's encoder output, plus the condition vector, into the perturbed cell:

    states(tokens)  what it reads of the encoder output [B, 1+G, d] (position 0 = [CLS]), per cell: cacheable while
                    the encoder is fixed (the frozen-encoder control pool)
    read(h)         its own per-cell, condition-independent part of those states: cacheable once the decoder is
                    trained too (prediction)
    forward(x, c, ctrl, shift)  predicted expression [B, G] from x = read(h), the condition vector c [B, d], the
                    control cell's expression ctrl [B, G] and the shift head's per-gene shift (or None)

Kinds: `factor` (the default) is not sequential: per-gene change = gene factors U [G, r] . MLP(pooled cell state,
condition), where the pooled state ([CLS] + mean gene state, [B, 2d]) is what `states` returns, so a frozen encoder's
pool caches [N, 2d] per cell instead of [N, G, d]. `lstm` / `gru` / `transformer` run over a real sequence of gene
blocks (G / block steps); `mlp` is per gene.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

FACTOR_RANK = 64
"""Rank of the factor decoder's per-gene factors (at most d_model)."""


def mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


def _near_zero(last: nn.Linear) -> None:
    """The output layer starts near 'no change from the control cell': the decoder learns the residual."""
    nn.init.normal_(last.weight, std=1e-3)
    nn.init.zeros_(last.bias)


class Decoder(nn.Module):
    """The interface (see the module docstring). `name` is the registered name; `d` the encoder width, `n_genes`
    the panel, `block` the genes per step of the sequence decoders, `gene_emb` [G, d] the encoder's gene embeddings
    (initialisation only)."""

    name: ClassVar[str] = ""

    def __init__(self, d: int, n_genes: int, block: int = 16, gene_emb: torch.Tensor | None = None):
        super().__init__()
        self.block, self.n_genes = max(1, block), n_genes
        self.n_steps = math.ceil(n_genes / self.block)

    def states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-gene states [B, G, d]."""
        return tokens[:, 1:]

    def read(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def change(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """The change from the control cell [B, G]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, ctrl: torch.Tensor,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        out = ctrl + self.change(x, c)  # residual: the decoder predicts the change from the control cell
        return out if shift is None else out + shift


class FactorDecoder(Decoder):
    """Per-gene change U . u + bias, u = MLP(LayerNorm(pooled state), condition): a per-cell, condition-dependent
    change of rank r over genes, O(B * G * r), no loop over genes. (A further per-gene, condition-dependent rescaling
    of the control's own values was tried: lower training loss, but it shrank predicted cells towards the mean:
    energy distance 3.8 vs 1.3 and DE50 logFC r 0.06 vs 0.16 on held-out drugs; benchmarks/RESULTS.md.)"""

    name = "factor"

    def __init__(self, d: int, n_genes: int, block: int = 16, gene_emb: torch.Tensor | None = None):
        super().__init__(d, n_genes, block, gene_emb)
        self.norm = nn.LayerNorm(2 * d)
        r = min(d, FACTOR_RANK)
        self.net = mlp(3 * d, 2 * d, r)  # -> the cell's coordinates u on the gene factors
        self.U = nn.Parameter(gene_factors(gene_emb, n_genes, r))
        self.bias = nn.Parameter(torch.zeros(n_genes))
        _near_zero(self.net[2])

    def states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled cell state [B, 2d] = ([CLS], mean gene state)."""
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)

    def _addmm(self, base: torch.Tensor, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        z = self.norm(x)
        if c is None:
            c = z.new_zeros(z.shape[0], z.shape[1] // 2)
        return torch.addmm(base, self.net(torch.cat([z, c], -1)), self.U.T)

    def change(self, x, c):
        return self._addmm(self.bias, x, c)

    def forward(self, x, c, ctrl, shift=None):
        # control + shift are the matmul's input instead of separate passes over [B, G]
        return self._addmm((ctrl if shift is None else ctrl + shift) + self.bias, x, c)


class MLPDecoder(Decoder):
    """An MLP of each gene's state plus the condition: per gene, no mixing between genes."""

    name = "mlp"

    def __init__(self, d: int, n_genes: int, block: int = 16, gene_emb: torch.Tensor | None = None):
        super().__init__(d, n_genes, block, gene_emb)
        self.net = mlp(d, d, 1)
        _near_zero(self.net[2])

    def read(self, h):
        return h[:, :self.n_genes]

    def change(self, x, c):
        return self.net(x if c is None else x + c.unsqueeze(1)).squeeze(-1)


class SequenceDecoder(Decoder):
    """A sequence model over blocks of `block` genes: step s reads inp(the states of block s) plus the condition's
    projection, and writes the block's changes."""

    def __init__(self, d: int, n_genes: int, block: int = 16, gene_emb: torch.Tensor | None = None):
        super().__init__(d, n_genes, block, gene_emb)
        self.inp = nn.Linear(d * self.block, d)
        self.rnn = self.sequence_model(d)
        self.out = nn.Linear(d, self.block)
        _near_zero(self.out)

    def sequence_model(self, d: int) -> nn.Module:
        raise NotImplementedError

    def run(self, seq: torch.Tensor) -> torch.Tensor:
        return self.rnn(seq)[0]

    def pad(self, h: torch.Tensor) -> torch.Tensor:
        """[B, G, d] -> [B, n_steps * block, d], zero-padded (a padded input is returned as is)."""
        B, G, d = h.shape
        pad = self.n_steps * self.block - G
        return torch.cat([h, h.new_zeros(B, pad, d)], 1) if pad > 0 else h

    def states(self, tokens):
        """Per-gene states padded to whole blocks [B, n_steps * block, d] (padded once, not in every step)."""
        return self.pad(tokens[:, 1:])

    def read(self, h):
        """The sequence's inputs inp(blocks of h) [B, n_steps, d]: they depend on the cell only."""
        return self.inp(self.pad(h).reshape(h.shape[0], self.n_steps, -1))

    def cond_proj(self, c: torch.Tensor) -> torch.Tensor:
        """What adding the condition vector c [B, d] to every real gene token adds to read(): the same as
        read(h + c) - read(h), without materialising h + c ([B, G, d]) and its blocks: per step, c times the sum of
        inp's weight blocks over the step's real genes (padding positions carry no condition). [B, n_steps, d]"""
        d_out = self.inp.weight.shape[0]
        W = self.inp.weight.view(d_out, self.block, -1)                          # [d_out, block, d_in]
        real = (torch.arange(self.n_steps * self.block, device=c.device) < self.n_genes)
        real = real.view(self.n_steps, self.block).to(W.dtype)
        w_step = torch.einsum("sk,okj->soj", real, W)                            # [n_steps, d_out, d_in]
        return torch.einsum("bj,soj->bso", c, w_step)

    def change(self, x, c):
        seq = x if c is None else x + self.cond_proj(c)
        return self.out(self.run(seq)).reshape(seq.shape[0], -1)[:, :self.n_genes]


class LSTMDecoder(SequenceDecoder):
    name = "lstm"

    def sequence_model(self, d):
        return nn.LSTM(d, d, batch_first=True)


class GRUDecoder(SequenceDecoder):
    name = "gru"

    def sequence_model(self, d):
        return nn.GRU(d, d, batch_first=True)


class TransformerDecoder(SequenceDecoder):
    name = "transformer"

    def sequence_model(self, d):
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, 0.0, batch_first=True, norm_first=True)
        return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def run(self, seq):
        return self.rnn(seq)


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
