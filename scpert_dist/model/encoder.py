"""Gene-token encoder: attention over genes.

Token j (gene g = gene_index[j]) = gene_emb[g] + value token, where the value token is a small MLP of the continuous
expression value, or the learned [MASK] value vector at masked positions (a masked value never enters the network,
so a masked 0 is distinguishable from a real 'no change' z-score of 0). A learned [CLS] token is prepended at
position 0. Pre-LN blocks use torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on
GPU); no Python loop over genes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)); x + FF(LN(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.ff(self.ln2(x)))


class ValueEmbedding(nn.Module):
    """Continuous expression value -> d_model vector: MLP on (v, asinh v) so both small z-scores and the clipped
    tails (|z| up to 10) are resolved."""

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, v: Tensor) -> Tensor:
        v = v.unsqueeze(-1)
        return self.net(torch.cat([v / 4.0, torch.asinh(v)], dim=-1))


class GeneTokenEncoder(nn.Module):
    """[B, G] expression values (+ [B, G] mask) -> [B, 1+G, d_model] token states; position 0 = [CLS]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.gene_emb = nn.Embedding(cfg.n_genes, d)
        self.value_emb = ValueEmbedding(d)
        self.mask_value = nn.Parameter(torch.zeros(d))
        self.cls = nn.Parameter(torch.zeros(d))
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.gene_emb.weight, std=0.02)
        nn.init.normal_(self.mask_value, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        # GPT-2 style: shrink the residual-branch output projections by depth
        for b in self.blocks:
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            nn.init.normal_(b.ff[2].weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def embed(self, values: Tensor, mask: Tensor | None = None, gene_index: Tensor | None = None) -> Tensor:
        B, G = values.shape
        if gene_index is None:
            if G != self.cfg.n_genes:
                raise ValueError(f"values have {G} gene columns but the model panel has {self.cfg.n_genes}; "
                                 "pass gene_index to select panel genes")
            # through the module, not .weight: ZeRO-3 gathers a submodule's partitioned weights in its forward
            genes = self.gene_emb(torch.arange(G, device=values.device))
        else:
            if gene_index.shape != (G,):
                raise ValueError(f"gene_index must have shape ({G},), got {tuple(gene_index.shape)}")
            genes = self.gene_emb(gene_index.to(values.device))
        # a non-finite value is a panel gene the file did not measure (NaN in the shards): read as [MASK], so it
        # never reaches the network (the loss and the metrics skip it too)
        missing = ~torch.isfinite(values)
        mask = missing if mask is None else mask.to(device=values.device, dtype=torch.bool) | missing
        # the true value at a masked position never reaches the network (also not NaN/Inf placeholders)
        val = self.value_emb(values.masked_fill(mask, 0.0))
        val = torch.where(mask.unsqueeze(-1), self.mask_value.to(val.dtype), val)
        tok = genes.unsqueeze(0) + val
        cls = self.cls.to(tok.dtype).expand(B, 1, -1)
        return self.emb_drop(torch.cat([cls, tok], dim=1))

    def forward(self, values: Tensor, mask: Tensor | None = None, gene_index: Tensor | None = None) -> Tensor:
        # inputs in the parameters' dtype (bf16 under DeepSpeed's bf16 mode, else float32)
        x = self.embed(values.to(self.cls.dtype), mask, gene_index)
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; shared tensors are counted once."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n
