"""Per-cell prediction from control cells of the same line (`predict_cells`), and the evaluation `Predictor`
wrapper. The user-facing entry points are `scpert_dist.api.ScPert.predict` and `scpert predict`."""

from __future__ import annotations

import numpy as np

from .. import schema as S
from ..errors import InputFileError, SmilesError
from .data import encode_pool
from .drugrep import features, warn_learned_unseen
from .train import load_finetuned, run_finetune


def drug_tensor(meta: dict, drug: str | None, smiles: str | None, n: int):
    import torch

    rep = meta["drug_rep"]
    if rep == "learned":
        if drug not in meta["drugs"]:
            if drug is None:
                raise SmilesError("the 'learned' drug representation cannot use a SMILES", field="--smiles",
                                  hint="finetune with drug_rep=morgan to predict from a SMILES")
            warn_learned_unseen(drug)
            raise SmilesError(f"drug {drug!r} was not in training and the model uses the 'learned' drug table",
                              field="--drug", hint="finetune with model.drug_rep=morgan and pass --smiles")
        return torch.full((n,), meta["drugs"].index(drug), dtype=torch.long)
    if rep == "lincs":
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
    f = features(rep, [smiles])
    return torch.from_numpy(np.repeat(f, n, 0))


def predict_cells(model, meta, controls: np.ndarray, *, drug: str | None, smiles: str | None, cell_line: str,
                  dose_um: float, n_cells: int, rng: np.random.Generator) -> np.ndarray:
    import torch

    if cell_line not in meta["cells"]:
        raise InputFileError(f"cell line {cell_line!r} not in the model", field="--cell-line",
                             hint=f"one of {meta['cells']}")
    if len(controls) == 0:
        raise InputFileError(f"no control cells for {cell_line}", field=S.OBS_CONTROL)
    ci = rng.choice(len(controls), size=n_cells, replace=n_cells > len(controls))
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(controls[ci], np.float32)), drug_tensor(meta, drug, smiles, n_cells),
                    torch.full((n_cells,), meta["cells"].index(cell_line)), torch.full((n_cells,), float(dose_um)))
    return out.clamp_min(0).numpy()


PREDICT_POOL = 4096
"""Control cells per line an evaluation prediction draws from (their encoder states are cached once)."""


class FinetunedPredictor:
    """Evaluation `Predictor`: fit() runs `run_finetune` on the training cells, predict() samples per cell from
    controls."""

    def __init__(self, cfg, name: str = "scpert", data=None):
        """data: the full AnnData (optional). Training then uses its 'train' drugs and early-stops on its 'valid'
        drugs (test cells are never used); without it, fit's `train` AnnData is all it sees."""
        self.cfg, self.name, self.data = cfg, name, data
        self.model = self.meta = self.result = None
        self.n_fallback = None  # conditions of drugs without a LINCS signature (drug_rep=lincs only)
        self._pool: dict = {}

    def fit(self, train, ctx=None):
        import dataclasses

        cfg = dataclasses.replace(self.cfg, seed=getattr(ctx, "seed", self.cfg.seed))

        self.result = run_finetune(cfg, self.data if self.data is not None else train, log_mlflow=False)
        self.model, self.meta = load_finetuned(self.result.model_dir)
        self._pool = {}
        return self

    def _controls(self, controls, line: str):
        """A fixed pool of the line's controls (all of them, up to PREDICT_POOL) with cached encoder states. Not the
        training pool's size: predicted cells average over their controls, and a 96-cell pool's mean is off the
        line's vehicle mean by enough to cost logFC r (default data, dev seeds 0-2: 0.141 with 96 vs 0.150 with every
        FIT vehicle cell; mean_drug, which samples them all, 0.152)."""
        if line not in self._pool:
            import torch

            X = S.dense(controls.X, np.float32)
            size = max(int(self.meta["config"]["model"].get("control_pool", 96) or 0), PREDICT_POOL)
            pick = np.random.default_rng(0).choice(len(X), size=min(size, len(X)), replace=False)
            h = encode_pool(self.model, X[pick])
            dec = self.model.decoder
            # sequence decoders: the pool's gene-block projection is fixed once trained, so it is cached per line
            # (a prediction then gathers [n, steps, d] instead of [n, G, d] states)
            with torch.no_grad():
                proj = dec.project(h) if dec.sequential else None
            self._pool[line] = (X[pick], None if proj is not None else h, proj)
        return self._pool[line]

    def predict(self, controls, cond, n_cells: int, rng: np.random.Generator) -> np.ndarray:
        import torch

        if cond.cell_line not in self.meta["cells"]:
            raise InputFileError(f"cell line {cond.cell_line!r} not in the model", field="cell_line",
                                 hint=f"one of {self.meta['cells']}")
        X, h, proj = self._controls(controls, cond.cell_line)
        pi = rng.integers(0, len(X), size=n_cells)
        if self.meta["drug_rep"] == "lincs" and cond.drug not in self.meta.get("lincs_feat", {}):
            # a drug with neither a LINCS signature nor a usable SMILES (imputed ones are in lincs_feat): in an
            # evaluation it gets the zero vector it had in training (counted, reported as a fallback); `scpert
            # predict` refuses it instead
            self.n_fallback = (self.n_fallback or 0) + 1
            drug_in = torch.zeros((n_cells, int(self.meta["feat_dim"])))
        else:
            drug_in = drug_tensor(self.meta, cond.drug, cond.smiles, n_cells)
        with torch.no_grad():
            sel = torch.from_numpy(pi)
            out = self.model.head(None if h is None else h[sel], torch.from_numpy(X[pi]), drug_in,
                                  torch.full((n_cells,), self.meta["cells"].index(cond.cell_line)),
                                  torch.full((n_cells,), float(cond.dose_um)),
                                  proj=None if proj is None else proj[sel])
        return out.clamp_min(0).numpy()
