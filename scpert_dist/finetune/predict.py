"""The one prediction path: `predict_cells` turns control cells of a `ControlPool` (finetune/data.py) and conditions
into predicted cells. Everything that predicts goes through it:

- finetuning's validation and the sweep's test metric (`finetune/validate.py: logfc_pearson_groups`),
- the benchmark (`FinetunedPredictor`, the evaluation `Predictor` of a trained model),
- `scpert predict` and the notebook API (`api.py: ScPert.predict`, via `predict_condition`).

They differ only in which control cells they draw: the training pool, every control of a data set, a fixed pool of
up to PREDICT_POOL controls per line, or one predicted cell per given control cell.
"""

from __future__ import annotations

import numpy as np

from .. import schema as S
from ..errors import InputFileError, SmilesError
from ..registry import DRUG_REPS
from .build import load_finetuned
from .data import ControlPool
from .drugrep import features, warn_learned_unseen


def predict_cells(model, pool: ControlPool, idx: np.ndarray, drug, cell_idx, dose_um, *, chunk: int = 512) -> np.ndarray:
    """Predicted expression [len(idx), G] (the model's output, not clipped) of the pool's control cells `idx` under
    one condition per row: drug input (`drug_tensor` / `Prepared.drug_input`), cell-line index and dose in uM
    (tensors of len(idx)). The pool's cached decoder reads are used once it is frozen, its encoder states before."""
    import torch

    out = []
    with torch.no_grad():
        for a in range(0, len(idx), chunk):
            sel = torch.from_numpy(np.asarray(idx[a:a + chunk]))
            h = None if pool.read is not None else pool.h[sel]
            read = None if pool.read is None else pool.read[sel]
            out.append(model.head(h, torch.from_numpy(pool.X[sel.numpy()]), drug[a:a + chunk], cell_idx[a:a + chunk],
                                  dose_um[a:a + chunk], read=read).numpy())
    return np.concatenate(out) if out else np.zeros((0, pool.X.shape[1]), np.float32)


def drug_tensor(meta: dict, drug: str | None, smiles: str | None, n: int):
    """The drug input of a saved model for `drug` (a name it knows) or `smiles`, repeated n times."""
    import torch

    rep = DRUG_REPS[meta["drug_rep"]]
    if rep.table:
        if drug not in meta["drugs"]:
            if drug is None:
                raise SmilesError("the 'learned' drug representation cannot use a SMILES", field="--smiles",
                                  hint="finetune with drug_rep=morgan to predict from a SMILES")
            warn_learned_unseen(drug)
            raise SmilesError(f"drug {drug!r} was not in training and the model uses the 'learned' drug table",
                              field="--drug", hint="finetune with model.drug_rep=morgan and pass --smiles")
        return torch.full((n,), meta["drugs"].index(drug), dtype=torch.long)
    if rep.needs_pretrained:
        table = meta.get("lincs_feat", {})
        if drug not in table:
            raise SmilesError(f"drug {drug!r} has no LINCS signature in the shards this model was finetuned with",
                              field="--drug", hint="the 'lincs' representation covers drugs LINCS measured; "
                              "use a model finetuned with drug_rep=morgan for other drugs")
        return torch.from_numpy(np.repeat(np.asarray(table[drug], np.float32)[None], n, 0))
    if not smiles:
        smiles = meta["smiles"].get(drug or "")
        if not smiles:
            raise SmilesError(f"no SMILES known for drug {drug!r}", field="--drug", hint="pass --smiles")
    f = features(meta["drug_rep"], [smiles])
    return torch.from_numpy(np.repeat(f, n, 0))


def line_index(meta: dict, cell_line: str, field: str = "--cell-line") -> int:
    if cell_line not in meta["cells"]:
        raise InputFileError(f"cell line {cell_line!r} not in the model", field=field, hint=f"one of {meta['cells']}")
    return meta["cells"].index(cell_line)


def predict_condition(model, meta, pool: ControlPool, idx: np.ndarray, *, drug_in, cell_line: str,
                      dose_um: float) -> np.ndarray:
    """Predicted cells (expression clipped at 0) of one condition from the pool's control cells `idx` of its line."""
    import torch

    n = len(idx)
    out = predict_cells(model, pool, idx, drug_in, torch.full((n,), line_index(meta, cell_line)),
                        torch.full((n,), float(dose_um)))
    return np.clip(out, 0, None)


def one_per_control(model, meta, controls: np.ndarray, *, drug: str | None, smiles: str | None, cell_line: str,
                    dose_um: float, n_cells: int, rng: np.random.Generator) -> np.ndarray:
    """`scpert predict` / `ScPert.predict`: n_cells predicted cells of a condition, each from one of the line's
    given control cells (every control once while n_cells <= their number; drawn with replacement beyond)."""
    line_index(meta, cell_line)
    if len(controls) == 0:
        raise InputFileError(f"no control cells for {cell_line}", field=S.OBS_CONTROL)
    pick = rng.choice(len(controls), size=n_cells, replace=n_cells > len(controls))
    used, idx = np.unique(pick, return_inverse=True)  # each control cell encoded once
    pool = ControlPool(model, {cell_line: np.asarray(controls[used], np.float32)}).freeze(model)
    return predict_condition(model, meta, pool, idx, drug_in=drug_tensor(meta, drug, smiles, n_cells),
                             cell_line=cell_line, dose_um=dose_um)


PREDICT_POOL = 4096
"""Control cells per line an evaluation prediction draws from (their encoder states are cached once)."""


class FinetunedPredictor:
    """The evaluation `Predictor` of a trained model (`evaluate/predictor.py`): `predict` samples predicted cells of a
    condition from a fixed pool of the line's controls. It does not train: build it from a saved model
    (`FinetunedPredictor.load`) or a model in memory."""

    def __init__(self, model, meta: dict, name: str = "scpert"):
        self.model, self.meta, self.name = model, meta, name
        self.n_fallback = None  # conditions of drugs without a LINCS signature (drug_rep=lincs only)
        self._pools: dict[str, ControlPool] = {}

    @classmethod
    def load(cls, spec, name: str = "scpert", tracking: str | None = None) -> FinetunedPredictor:
        """From a folder, run id, models:/name@alias or models:/name/version."""
        model, meta = load_finetuned(spec, tracking)
        return cls(model, meta, name)

    def fit(self, train, ctx=None) -> FinetunedPredictor:
        """Nothing to fit: the model is trained (the contract's fit, for an evaluation of a saved model)."""
        return self

    def pool(self, controls, line: str) -> ControlPool:
        """A fixed pool of the line's controls (all of them, up to PREDICT_POOL) with cached states. Not the training
        pool's size: predicted cells average over their controls, and a 96-cell pool's mean is off the line's
        vehicle mean by enough to cost logFC r (default data, dev seeds 0-2: 0.141 with 96 vs 0.150 with every FIT
        vehicle cell; mean_drug, which samples them all, 0.152)."""
        if line not in self._pools:
            X = S.dense(controls.X, np.float32)
            size = max(int(self.meta["config"]["model"].get("control_pool", 96) or 0), PREDICT_POOL)
            pick = np.random.default_rng(0).choice(len(X), size=min(size, len(X)), replace=False)
            self._pools[line] = ControlPool(self.model, {line: X[pick]}).freeze(self.model)
        return self._pools[line]

    def predict(self, controls, cond, n_cells: int, rng: np.random.Generator) -> np.ndarray:
        import torch

        line_index(self.meta, cond.cell_line, field="cell_line")
        pool = self.pool(controls, cond.cell_line)
        idx = pool.sample(cond.cell_line, n_cells, rng)
        if DRUG_REPS[self.meta["drug_rep"]].needs_pretrained and cond.drug not in self.meta.get("lincs_feat", {}):
            # a drug with neither a LINCS signature nor a usable SMILES (imputed ones are in lincs_feat): in an
            # evaluation it gets the zero vector it had in training (counted, reported as a fallback); `scpert
            # predict` refuses it instead
            self.n_fallback = (self.n_fallback or 0) + 1
            drug_in = torch.zeros((n_cells, int(self.meta["feat_dim"])))
        else:
            drug_in = drug_tensor(self.meta, cond.drug, cond.smiles, n_cells)
        return predict_condition(self.model, self.meta, pool, idx, drug_in=drug_in, cell_line=cond.cell_line,
                                 dose_um=cond.dose_um)
