"""Components by name: one `Registry` per kind, the single source of the names that configs accept, the CLI help
and the sweep schema show, and the docs list.

The code components (decoders, drug representations, the benchmark's predictors) are registered here as
"module:attribute" strings and imported only when one is used, so a config is validated against these names without
importing torch (a typo in `--set`, a TOML or a sweep YAML stops before anything heavy is loaded). Components that are
data, not code, are registered with the same class beside their data: the model size presets (`model/config.py`) and
the simulated data sets (`data/simulate/core.py`).

A saved finetuned model records its decoder's and drug representation's registered names with its init parameters
and is rebuilt from them (`finetune/model.py: FinetuneModel.init_params`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


class Registry(Mapping):
    """name -> component. `registry[name]` returns the component (a "module:attribute" entry is imported on first
    use); `check(name)` is the validation every config field of this kind goes through: an unknown name is a
    ConfigError naming the field and listing the registered names."""

    def __init__(self, kind: str, field: str, entries: dict[str, Any], *, about: dict[str, str] | None = None):
        self.kind, self.field = kind, field
        self._entries = dict(entries)
        self._loaded: dict[str, Any] = {}
        self.about = dict(about or {})
        """One line per name for help texts and docs."""

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(name)
        if name not in self._loaded:
            entry = self._entries[name]
            if isinstance(entry, str) and ":" in entry:
                module, attr = entry.split(":", 1)
                entry = getattr(importlib.import_module(module), attr)
            self._loaded[name] = entry
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:  # without importing the component
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def choices(self, sep: str = " | ") -> str:
        """The names for a help text: 'factor | lstm | gru | mlp | transformer'."""
        return sep.join(self._entries)

    def check(self, name: str, field: str | None = None) -> str:
        """`name` if registered, else ConfigError naming `field` (default: this kind's config field)."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}", field=field or self.field,
                              hint=f"one of {', '.join(self._entries)}")
        return name


DECODERS = Registry("decoder", "model.decoder", {
    "factor": "scpert_dist.finetune.decoders:FactorDecoder",
    "lstm": "scpert_dist.finetune.decoders:LSTMDecoder",
    "gru": "scpert_dist.finetune.decoders:GRUDecoder",
    "mlp": "scpert_dist.finetune.decoders:MLPDecoder",
    "transformer": "scpert_dist.finetune.decoders:TransformerDecoder",
}, about={
    "factor": "per-gene factors x an MLP of the pooled cell state and the condition (the default; no loop over genes)",
    "lstm": "an LSTM over blocks of gene states",
    "gru": "a GRU over blocks of gene states",
    "mlp": "an MLP per gene state",
    "transformer": "one transformer layer over blocks of gene states",
})
"""Finetuning decoders (`model.decoder`), classes behind `finetune.decoders.Decoder`."""


@dataclass(frozen=True)
class DrugRep:
    """How a drug is given to the finetune model."""

    table: bool = False
    """A lookup table over the training drugs (cannot represent a drug finetuning never saw)."""
    from_structure: bool = False
    """Fixed features computed from the SMILES (RDKit): any molecule."""
    needs_pretrained: bool = False
    """Read through the pretrained encoder (needs `model.pretrained` and `data.lincs_shards`)."""


DRUG_REPS = Registry("drug representation", "model.drug_rep", {
    "learned": DrugRep(table=True),
    "morgan": DrugRep(from_structure=True),
    "descriptors": DrugRep(from_structure=True),
    "lincs": DrugRep(needs_pretrained=True),
}, about={
    "learned": "a learned vector per training drug (drugs finetuning never saw get an untrained one)",
    "morgan": "RDKit Morgan bits of the SMILES (any molecule)",
    "descriptors": "RDKit descriptors of the SMILES (any molecule)",
    "lincs": "the drug's mean LINCS signature through the pretrained encoder (unmeasured drugs: a structure map)",
})
"""Drug representations (`model.drug_rep`); their features are computed by `finetune/drugrep.py`."""


PREDICTORS = Registry("method", "--methods", {
    "null": "scpert_dist.evaluate.reference:NullPredictor",
    "control": "scpert_dist.evaluate.baselines.simple:ControlPredictor",
    "mean_drug": "scpert_dist.evaluate.baselines.simple:MeanDrugPredictor",
    "random": "scpert_dist.evaluate.baselines.simple:RandomDrugsPredictor",
    "ridge": "scpert_dist.evaluate.baselines.linear:RidgePredictor",
    "knn_lincs": "scpert_dist.evaluate.baselines.knn:KnnLincsPredictor",
    "cvae": "scpert_dist.evaluate.baselines.cvae:CvaePredictor",
    "cpa": "scpert_dist.evaluate.baselines.cpa_baseline:CpaPredictor",
})
"""The benchmark's baselines (and the drug-agnostic null), in table order; each implements
`evaluate.predictor.Predictor`. CPA runs only where its own Python 3.10 environment exists. Our finetuned variants
(`scpert_<decoder>_<drug rep>_<pretrained|scratch>`) and the oracle and ceiling rows are named by the benchmark."""
