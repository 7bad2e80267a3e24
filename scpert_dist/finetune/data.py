"""What finetuning reads: the AnnData (schema.py layout) turned into arrays + vocabularies once (`Prepared`),
the training conditions, and the pool of control cells whose frozen-encoder states are cached (`ControlPool`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .. import schema as S
from ..errors import ConfigError, InputFileError, SplitError
from ..registry import DRUG_REPS
from .drugrep import features, lincs_features


def load_adata(data) -> ad.AnnData:
    """An AnnData, or the path of an h5ad with the obs columns of schema.py (named error otherwise)."""
    if isinstance(data, ad.AnnData):
        return data
    p = Path(data)
    if not p.is_file():
        raise InputFileError("data file not found", path=str(p), hint="pass an h5ad written by `scpert data sciplex/simulate`")
    a = ad.read_h5ad(p)
    for c in (S.OBS_DRUG, S.OBS_CELL_LINE, S.OBS_DOSE, S.OBS_CONTROL):
        if c not in a.obs:
            raise InputFileError(f"obs column {c!r} missing", path=str(p), field=c, hint="see scpert_dist/schema.py")
    return a


class Prepared:
    """Arrays + vocabularies for one AnnData and split column."""

    def __init__(self, adata, split: str, drug_rep: str):
        obs = adata.obs
        if split not in obs:
            raise SplitError(f"split column {split!r} not in obs", field=split,
                             hint=f"columns: {[c for c in obs if c.startswith(S.SPLIT_PREFIX)]}")
        self.X = S.dense(adata.X, np.float32)
        self.genes = [str(g) for g in adata.var_names]
        self.gene_symbols = ([str(g) for g in adata.var[S.VAR_SYMBOL]] if S.VAR_SYMBOL in adata.var else None)
        self.ctl = obs[S.OBS_CONTROL].to_numpy(bool)
        self.split = obs[split].astype(str).to_numpy()
        self.drug = obs[S.OBS_DRUG].astype(str).to_numpy()
        self.cell = obs[S.OBS_CELL_LINE].astype(str).to_numpy()
        self.dose = obs[S.OBS_DOSE].to_numpy(np.float32)
        smi = obs[S.OBS_SMILES].astype(str).to_numpy() if S.OBS_SMILES in obs else np.array([""] * len(obs))
        self.cells = sorted(set(self.cell))
        self.drugs = sorted(set(self.drug[(~self.ctl) & (self.split == "train")]))
        self.smiles = {d: s for d, s in zip(self.drug, smi, strict=False) if not d == S.CONTROL_NAME and s}
        self.cell_idx = np.array([self.cells.index(c) for c in self.cell], np.int64)
        dpos = {d: i for i, d in enumerate(self.drugs)}
        self.drug_idx = np.array([dpos.get(d, 0) for d in self.drug], np.int64)
        self.rep = drug_rep
        self.lincs_missing: list[str] = []
        self.lincs_imputed: list[str] = []
        self.feat, self.feat_dim = {}, 0  # 'lincs' is filled by set_lincs_features (needs the pretrained encoder)
        if DRUG_REPS[drug_rep].from_structure:
            names = sorted(set(self.drug[~self.ctl]))
            f = features(drug_rep, [self.smiles.get(n, "") for n in names])
            self.feat = {n: f[i] for i, n in enumerate(names)}
            self.feat_dim = f.shape[1]
        self.ctl_by_line = {c: np.flatnonzero(self.ctl & (self.cell == c)) for c in self.cells}
        self.train_rows = np.flatnonzero((~self.ctl) & (self.split == "train"))
        self.valid_rows = np.flatnonzero((~self.ctl) & (self.split == "valid"))
        if len(self.train_rows) == 0:
            raise SplitError(f"no treated 'train' cells in {split!r}", field=split)

    def set_lincs_features(self, pretrained_dir, shards_dir) -> None:
        names = sorted(set(self.drug[~self.ctl]))
        self.feat, self.lincs_imputed, self.lincs_missing = lincs_features(
            pretrained_dir, shards_dir, {n: self.smiles.get(n, "") for n in names})
        if not self.feat:
            raise ConfigError("drug_rep='lincs': none of the data's drugs has a LINCS signature in the shards",
                              field="lincs_shards", hint="check the shard folder, or use drug_rep=morgan")
        self.feat_dim = len(next(iter(self.feat.values())))
        if self.lincs_imputed:
            print(f"drug_rep='lincs': {len(self.lincs_imputed)} of {len(names)} drugs have no LINCS signature; their "
                  "representation is predicted from structure (Morgan -> LINCS representation, fit over the LINCS "
                  "compounds in the shards)", flush=True)
        if self.lincs_missing:
            warnings.warn(f"drug_rep='lincs': {len(self.lincs_missing)} of {len(names)} drugs have neither a LINCS "
                          f"signature nor a usable structure map (e.g. {self.lincs_missing[:3]}) and get a zero drug "
                          "vector", UserWarning, stacklevel=2)

    def use_saved_features(self, meta: dict) -> None:
        """The drug features a saved model was finetuned with ('lincs': its encoded-signature table), for scoring
        a saved model on this data without its pretraining."""
        if DRUG_REPS[self.rep].needs_pretrained:
            self.feat = {k: np.asarray(v, np.float32) for k, v in meta.get("lincs_feat", {}).items()}
            self.feat_dim = int(meta["feat_dim"])

    def drug_input(self, names):
        import torch

        if DRUG_REPS[self.rep].table:
            pos = {d: i for i, d in enumerate(self.drugs)}
            return torch.tensor([pos.get(n, 0) for n in names], dtype=torch.long)
        return torch.tensor(np.stack([self.feat.get(n, np.zeros(self.feat_dim, np.float32)) for n in names]))

    def control_means(self) -> dict[str, np.ndarray]:
        return {c: self.X[r].mean(0) for c, r in self.ctl_by_line.items()}


def condition_groups(prep: Prepared, rows: np.ndarray) -> dict[tuple, np.ndarray]:
    """(drug, cell line, dose) -> the rows of that condition."""
    g: dict[tuple, list] = {}
    for r in rows:
        g.setdefault((prep.drug[r], prep.cell[r], float(prep.dose[r])), []).append(r)
    return {k: np.array(v) for k, v in g.items()}


def encode_pool(model, X: np.ndarray, chunk: int = 32):
    """What the decoder reads of control cells X [N, G] (`FinetuneModel.encode`), computed once under no_grad in
    chunks, with the encoder in eval mode."""
    import torch

    was = model.encoder.training
    model.encoder.eval()
    with torch.no_grad():
        h = torch.cat([model.encode(torch.from_numpy(np.ascontiguousarray(X[i:i + chunk])))
                       for i in range(0, len(X), chunk)])
    model.encoder.train(was)
    return h


class ControlPool:
    """Control cells per line with their encoder states cached: what every prediction draws its control cells from
    (training's frozen-encoder steps and validation, the benchmark, `scpert predict`, the sweep's test metric).

    `h`: the encoder states (`FinetuneModel.encode`), refreshed by `refresh` while the encoder trains; `read`: the
    decoder's own per-cell part of them (`Decoder.read`), cached by `freeze` once the model is trained."""

    def __init__(self, model, cells: dict[str, np.ndarray], rows: dict[str, np.ndarray] | None = None):
        self.lines = list(cells)
        self.offset, self.size, o = {}, {}, 0
        for c in self.lines:
            self.offset[c], self.size[c], o = o, len(cells[c]), o + len(cells[c])
        self.X = np.concatenate([np.asarray(cells[c], np.float32) for c in self.lines])
        self.rows = rows
        """The cells' rows in the data they were drawn from (the training pool), else None."""
        self.h = self.read = None
        self.refresh(model)

    @classmethod
    def drawn(cls, model, prep: Prepared, size: int, rng) -> ControlPool:
        """Up to `size` control cells of each line of `prep`, drawn without replacement (the training pool)."""
        rows = {c: np.sort(rng.choice(r, size=min(size, len(r)), replace=False)) for c, r in prep.ctl_by_line.items()}
        return cls(model, {c: prep.X[r] for c, r in rows.items()}, rows)

    @classmethod
    def every_control(cls, model, prep: Prepared) -> ControlPool:
        """Every control cell of each line of `prep`, frozen (scoring a trained model on a data set)."""
        return cls(model, {c: prep.X[r] for c, r in prep.ctl_by_line.items()}, dict(prep.ctl_by_line)).freeze(model)

    @property
    def all_rows(self) -> np.ndarray:
        return np.concatenate([self.rows[c] for c in self.lines])

    def refresh(self, model) -> None:
        """Encode the pool again (the encoder is training)."""
        self.h = encode_pool(model, self.X)

    def freeze(self, model) -> ControlPool:
        """Cache the decoder's reads of the pool too: the model is trained, predictions read them as they are."""
        import torch

        with torch.no_grad():
            self.read = model.decoder.read(self.h)
        return self

    def as_anndata(self, prep: Prepared) -> ad.AnnData:
        """The pool's control cells (saved with the model, so predictions need no data file)."""
        rows = self.all_rows
        obs = pd.DataFrame({S.OBS_DRUG: S.CONTROL_NAME, S.OBS_SMILES: "", S.OBS_DOSE: 0.0,
                            S.OBS_CELL_LINE: prep.cell[rows], S.OBS_CONTROL: True},
                           index=[f"control_{r}" for r in rows])
        var = pd.DataFrame(index=prep.genes)
        if prep.gene_symbols:
            var[S.VAR_SYMBOL] = prep.gene_symbols
        return ad.AnnData(X=self.X.copy(), obs=obs, var=var)

    def sample(self, line: str, n: int, rng) -> np.ndarray:
        """Indices into the pool for n cells of `line`, drawn with replacement."""
        return self.offset[line] + rng.integers(0, self.size[line], size=n)
