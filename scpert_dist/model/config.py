"""Model architecture: one dataclass of sizes, named size presets, the task names of the heads.

Presets (parameter counts for the 978-gene landmark panel, all four tasks, 65 cells / 3 drugs, from
`count_parameters`):
  tiny   d=32,   L=2,  H=2,  ff=64    tests and CI (CPU seconds)
  small  d=64,   L=3,  H=4,  ff=256   CPU demo
  base   d=256,  L=6,  H=8,  ff=1024  real runs (~5M params)
  large  d=1024, L=24, H=16, ff=4096  ZeRO-3 scale (~300M params)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import at_least, coerce_fields, from_dict
from ..errors import ConfigError
from ..registry import Registry

TASKS = ("mask", "cell", "drug", "dose")


def parse_tasks(s: str | list[str] | tuple[str, ...]) -> list[str]:
    """'mask+cell+drug+dose' (or 'mask,cell', or a list of such strings) -> ['mask', 'cell', 'drug', 'dose'].

    Order follows TASKS; duplicates are dropped; an unknown or empty task set raises ConfigError."""
    items = [s] if isinstance(s, str) else list(s)
    parts: list[str] = []
    for it in items:
        if not isinstance(it, str):
            raise ConfigError(f"task '{it!r}' is not a string", field="objective.tasks")
        parts += [p.strip().lower() for p in it.replace(",", "+").split("+") if p.strip()]
    unknown = sorted(set(parts) - set(TASKS))
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}", field="objective.tasks",
                          hint=f"use a '+'-joined subset of {', '.join(TASKS)}, e.g. 'mask+cell+drug+dose'")
    if not parts:
        raise ConfigError("empty task set", field="objective.tasks", hint="use e.g. 'mask' or 'mask+cell+drug+dose'")
    return [t for t in TASKS if t in parts]


@dataclass
class ModelConfig:
    """Gene-token BERT sizes: one token per panel gene (+ a [CLS] token), pre-LN transformer, task heads on [CLS].
    Architecture only: what the model is trained for (tasks, masking, gene sampling) is the pretraining's
    `objective` section (train/settings.py), and the heads are built for it (model/heads.py: PretrainModel)."""

    n_genes: int = 978
    """Gene tokens = panel size; token i is gene manifest['genes'][i]."""
    d_model: int = 128
    """Width of every token."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads (d_model must be divisible by n_heads)."""
    d_ff: int = 512
    """Hidden width of the feed-forward layer in each block."""
    dropout: float = 0.1
    """Dropout on attention probabilities, residual branches and embeddings."""
    n_cells: int = 0
    """Cell-line classes of the 'cell' head (0 = no head)."""
    n_drugs: int = 0
    """Compound classes of the 'drug' head (0 = no head)."""

    def __post_init__(self) -> None:
        at_least(self, "model", 1, "n_genes", "d_model", "n_layers", "n_heads", "d_ff")
        at_least(self, "model", 0, "n_cells", "n_drugs")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
                              field="model.n_heads", hint="choose n_heads dividing d_model")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}", field="model.dropout")


def check_heads(cfg: ModelConfig, tasks) -> None:
    """ConfigError unless the classification tasks among `tasks` have class counts in `cfg` (checked where the heads
    are built, so an encoder-only copy of a pretraining config, e.g. with n_cells=0, stays valid)."""
    if "cell" in tasks and cfg.n_cells < 2:
        raise ConfigError(f"task 'cell' needs n_cells >= 2, got {cfg.n_cells}", field="model.n_cells",
                          hint="the data's cell-line vocabulary has fewer than 2 lines: drop 'cell' from "
                               "objective.tasks")
    if "drug" in tasks and cfg.n_drugs < 2:
        raise ConfigError(f"task 'drug' needs n_drugs >= 2, got {cfg.n_drugs}", field="model.n_drugs",
                          hint="the data's compound vocabulary has fewer than 2 compounds: drop 'drug' from "
                               "objective.tasks")


PRESETS = Registry("model preset", "model.preset", {
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0),
    "small": dict(d_model=64, n_layers=3, n_heads=4, d_ff=256, dropout=0.1),
    "base": dict(d_model=256, n_layers=6, n_heads=8, d_ff=1024, dropout=0.1),
    "large": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, dropout=0.1),
})
"""Model sizes by name (the module docstring gives their parameter counts)."""


def model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A ModelConfig from a named preset with keyword overrides (e.g. n_genes=978, n_cells=65, d_model=64); values
    given as strings (command-line overrides) are converted to the field's type."""
    PRESETS.check(preset)
    return from_dict(ModelConfig, {**PRESETS[preset], **overrides}, "model.")


@dataclass
class ModelSpec:
    """A model as a training config names it: a size preset and any ModelConfig sizes that replace the preset's.
    `build` adds what comes from the data (panel size, class counts)."""

    MOVED: ClassVar[dict[str, str]] = {"tasks": "objective.tasks", "mask_ratio": "objective.mask_ratio"}

    preset: str = "tiny"
    """Size preset (PRESETS): tiny | small | base | large."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig sizes replacing the preset's, e.g. `--set model.overrides.d_model=64`."""

    def __post_init__(self) -> None:
        PRESETS.check(self.preset)
        self.overrides = coerce_fields(ModelConfig, dict(self.overrides or {}), "model.overrides.")
        fixed = sorted(set(self.overrides) & set(DATA_SIZES))
        if fixed:
            raise ConfigError(f"model.overrides cannot set {', '.join(fixed)}", field="model.overrides",
                              hint="the panel size and the class counts come from the data")
        model_config(self.preset, **self.overrides)  # ConfigError for sizes that do not fit together

    def build(self, n_genes: int, n_cells: int = 0, n_drugs: int = 0) -> ModelConfig:
        return model_config(self.preset, **self.overrides, n_genes=n_genes, n_cells=n_cells, n_drugs=n_drugs)


DATA_SIZES = ("n_genes", "n_cells", "n_drugs")
"""ModelConfig fields that come from the data, never from a config file."""


def flops_per_sample(cfg: ModelConfig, n_genes: int | None = None) -> float:
    """Forward+backward FLOPs for one profile (used for MFU).

    T = n_genes + 1 tokens (genes + [CLS]), d = d_model, f = d_ff, L = n_layers. Counting a multiply-add as 2 FLOPs
    and only matrix multiplications (norms, softmax, activations are negligible):
      per block, forward:  2*T*(4*d*d)      Q, K, V and output projections
                         + 2*T*(2*d*f)      feed-forward (two matrices)
                         + 2*2*T*T*d        attention scores Q K^T and probabilities @ V
      embeddings:          2*G*(d + d*d)    value MLP (1 -> d -> d) on G gene tokens
      mask head:           2*G*(d*d + d)    per-token MLP (d -> d -> 1)
      [CLS] heads:         2*(d*(n_cells + n_drugs) + d*d + d)
    backward = 2 x forward, so the total is 3 x forward (the standard 6*N*tokens rule plus the attention term).
    """
    G = cfg.n_genes if n_genes is None else int(n_genes)
    T = G + 1
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    per_block = 2 * T * (4 * d * d) + 2 * T * (2 * d * f) + 4 * T * T * d
    emb = 2 * G * (d + d * d)
    mask_head = 2 * G * (d * d + d)
    cls_heads = 2 * (d * (cfg.n_cells + cfg.n_drugs) + d * d + d)
    return float(3 * (L * per_block + emb + mask_head + cls_heads))
