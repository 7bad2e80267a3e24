"""Random masking of gene tokens for the masked-expression objective."""

from __future__ import annotations

import torch


def random_mask(batch: int, n_genes: int, ratio: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """A [batch, n_genes] bool mask with each position masked with probability `ratio` and at least one masked
    position per row (the position with the smallest draw). Drawn on the generator's device, then moved."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    u = torch.rand(batch, n_genes, generator=generator, device=gen_device)
    m = u < ratio
    m[torch.arange(batch, device=u.device), u.argmin(dim=1)] = True
    return m.to(device) if device is not None else m
