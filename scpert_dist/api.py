"""The notebook API, in the manner of scvi-tools: set up the AnnData once, train, predict, save, load.

    import scanpy as sc
    from scpert_dist import ScPert

    adata = sc.read_h5ad("sciplex3.h5ad")
    ScPert.setup_anndata(adata, drug_key="product_name", dose_key="dose", dose_unit="nM",
                         cell_line_key="cell_type", control_key="control", smiles_key="SMILES")
    model = ScPert.from_pretrained("RUN_ID_OR_FOLDER")      # or ScPert() to start from scratch
    model.train(adata, split="split_ood", epochs=3)         # an obs column of train/valid/test
    pred = model.predict(drug="Dacinostat", cell_line="A549", dose=1.0)   # AnnData of predicted cells
    model.save("my_model/");  model = ScPert.load("my_model/")  # also a run id or models:/name@alias

The CLI (`scpert finetune`, `scpert predict`) is built on this class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from . import schema as S
from .checkpoint.finetuned import CONTROLS_FILE, save_finetuned
from .config import with_overrides
from .data.readers.sciplex import check_output, write_h5ad_atomic
from .errors import InputFileError, MetadataError, SplitError, ValueRangeError
from .finetune.build import load_finetuned, saved_config
from .finetune.config import FinetuneConfig
from .finetune.data import load_adata
from .finetune.predict import one_per_control
from .finetune.train import run_finetune

_DOSE_FACTOR = {"uM": 1.0, "nM": 1e-3, "mM": 1e3, "M": 1e6}
_CONTROL_NAMES = {"control", "vehicle", "dmso", "ctl_vehicle", "ctrl"}


class ScPert:
    """A finetuned single-cell drug-response model. Build with `ScPert(**config)`, `ScPert.from_pretrained(...)`
    or `ScPert.load(...)`; `train` fits it, `predict` returns predicted cells as AnnData. Config keywords are
    FinetuneConfig fields, by dotted path (`**{"optim.epochs": 2}`) or by a name one section has (`epochs=2`,
    `decoder="gru"`)."""

    def __init__(self, config: FinetuneConfig | None = None, **overrides):
        self.config = with_overrides(config or FinetuneConfig(), overrides)
        self.model = self.meta = self.result = None
        self._controls: ad.AnnData | None = None

    # ------------------------------------------------------------------------------------------------ data
    @staticmethod
    def setup_anndata(adata: ad.AnnData, *, drug_key: str, dose_key: str, cell_line_key: str,
                      control_key: str | None = None, smiles_key: str | None = None,
                      dose_unit: str = "uM") -> ad.AnnData:
        """Register the obs columns once (in place): copies them into the columns the package reads (schema.py:
        drug, smiles, dose_um, cell_line, is_control), doses converted to uM. Controls: `control_key` (a
        boolean/0-1 column) or, without it, drug names such as 'control', 'vehicle', 'DMSO'."""
        obs = adata.obs
        for key in (drug_key, dose_key, cell_line_key, control_key, smiles_key):
            if key is not None and key not in obs:
                raise MetadataError(f"obs has no column {key!r}", field=key,
                                    hint=f"obs columns: {list(obs.columns)[:20]}")
        if dose_unit not in _DOSE_FACTOR:
            raise MetadataError(f"unknown dose unit {dose_unit!r}", field="dose_unit", hint=f"one of {list(_DOSE_FACTOR)}")
        drug = obs[drug_key].astype(str)
        if control_key is not None:
            ctl = obs[control_key].astype(str).str.lower().isin({"1", "true", "1.0", "yes"}).to_numpy()
        else:
            ctl = drug.str.lower().isin(_CONTROL_NAMES).to_numpy()
        if not ctl.any():
            raise MetadataError("no control cells found", field=control_key or drug_key,
                                hint="pass control_key= (a boolean column) or name vehicle cells 'control'/'DMSO'")
        dose = pd.to_numeric(obs[dose_key], errors="coerce").to_numpy(float) * _DOSE_FACTOR[dose_unit]
        bad = ~ctl & ~(np.isfinite(dose) & (dose >= 0))
        if bad.any():
            raise ValueRangeError(f"{int(bad.sum())} treated cells have no valid dose", field=dose_key,
                                  hint="doses must be numbers >= 0")
        adata.obs[S.OBS_DRUG] = np.where(ctl, S.CONTROL_NAME, drug.to_numpy())
        adata.obs[S.OBS_DOSE] = np.where(ctl, 0.0, dose)
        adata.obs[S.OBS_CELL_LINE] = obs[cell_line_key].astype(str).to_numpy()
        adata.obs[S.OBS_CONTROL] = ctl
        adata.obs[S.OBS_SMILES] = np.where(ctl, "", obs[smiles_key].astype(str).to_numpy()) if smiles_key else ""
        setup = {"drug_key": drug_key, "dose_key": dose_key, "dose_unit": dose_unit, "cell_line_key": cell_line_key,
                 "control_key": control_key or "", "smiles_key": smiles_key or ""}
        adata.uns.setdefault(S.UNS_KEY, {})["setup"] = setup
        return adata

    # ------------------------------------------------------------------------------------------- build
    @classmethod
    def from_pretrained(cls, run_or_path: str, **overrides) -> ScPert:
        """Start from a pretrained encoder: a `scpert pretrain` run id, a models:/ URI or a checkpoint folder."""
        return cls(**{"model.pretrained": str(run_or_path)}, **overrides)

    @classmethod
    def load(cls, spec: str | Path, tracking: str | None = None) -> ScPert:
        """A finetuned model from a folder, an MLflow run id, models:/name@alias or models:/name/version."""
        self = cls.__new__(cls)
        self.model, self.meta = load_finetuned(spec, tracking)
        self.config = saved_config(self.meta)
        self.result = None
        ctl = Path(self.meta["dir"]) / CONTROLS_FILE
        self._controls = ad.read_h5ad(ctl) if ctl.is_file() else None
        return self

    # ---------------------------------------------------------------------------------------------- train
    def train(self, adata: ad.AnnData | str | Path, split: str = "split_random", *, track: bool = False,
              out: str | None = None, **overrides) -> ScPert:
        """Finetune on the 'train' drugs of `split`, early-stopping on its 'valid' drugs (never its 'test' drugs).
        `overrides`: any FinetuneConfig field (epochs=5, lr=1e-3, ...; dotted keys via **{"model.decoder": ...}).
        track=True logs an MLflow run (config.tracking)."""
        self.config = with_overrides(self.config, {"data.split": split, **({"out": out} if out else {}),
                                                   **overrides})
        adata = load_adata(adata)
        if split not in adata.obs:
            raise SplitError(f"split column {split!r} not in obs", field=split,
                             hint="make one with scpert_dist.data.readers.splits.add_splits(adata, 'cpa'), or name it")
        self.result = run_finetune(self.config, adata, log_mlflow=track)
        loaded = ScPert.load(self.result.model_dir)
        self.model, self.meta, self._controls = loaded.model, loaded.meta, loaded._controls
        return self

    # -------------------------------------------------------------------------------------------- predict
    def predict(self, adata_controls: ad.AnnData | None = None, *, cell_line: str, dose: float,
                drug: str | None = None, smiles: str | None = None, n_cells: int | None = None,
                seed: int = 0) -> ad.AnnData:
        """Predicted cells of `cell_line` under `drug` (a name the model knows) or `smiles` (any molecule) at
        `dose` uM, one per control cell (or `n_cells`). Controls: `adata_controls`, else the ones saved with the
        model."""
        self._check_trained()
        if not np.isfinite(dose) or dose < 0:
            raise ValueRangeError(f"dose must be a finite number of uM >= 0, got {dose!r}", field="dose",
                                  hint="give the dose in uM, e.g. dose=1.0 (0 = vehicle)")
        if not drug and not smiles:
            raise MetadataError("pass drug= (a name) or smiles=", field="drug")
        ctl = self._control_matrix(adata_controls, cell_line)
        n = n_cells or max(1, len(ctl))
        X = one_per_control(self.model, self.meta, ctl, drug=drug, smiles=smiles, cell_line=cell_line, dose_um=dose,
                            n_cells=n, rng=np.random.default_rng(seed))
        return self._as_anndata(X, drug=drug, smiles=smiles, cell_line=cell_line, dose=dose)

    def _check_trained(self) -> None:
        if self.model is None:
            raise SplitError("the model is not trained", hint="call model.train(adata, split=...) or ScPert.load(...)")

    def _control_matrix(self, adata_controls, cell_line: str) -> np.ndarray:
        a = adata_controls if adata_controls is not None else self._controls
        if a is None:
            raise InputFileError("no control cells: this model was saved without them", field="--data",
                                 hint="pass an h5ad with control cells of the line (--data / adata_controls=)")
        genes = self.meta["genes"]
        missing = [g for g in genes if g not in a.var_names]
        if missing:
            raise InputFileError(f"{len(missing)} model genes missing from the control cells (e.g. {missing[:3]})",
                                 field="var_names")
        sel = (a.obs[S.OBS_CONTROL].to_numpy(bool)) & (a.obs[S.OBS_CELL_LINE].astype(str) == cell_line).to_numpy()
        if cell_line in self.meta["cells"] and not sel.any():
            raise InputFileError(f"no control cells of {cell_line!r} in the data", field=S.OBS_CELL_LINE,
                                 hint=f"lines with controls: {sorted(set(a.obs.loc[a.obs[S.OBS_CONTROL].astype(bool), S.OBS_CELL_LINE].astype(str)))}")
        return S.dense(a[sel][:, genes].X, np.float32)

    def _as_anndata(self, X: np.ndarray, *, drug, smiles, cell_line: str, dose: float) -> ad.AnnData:
        n = len(X)
        smi = smiles or self.meta["smiles"].get(drug or "", "")
        obs = pd.DataFrame({S.OBS_DRUG: drug or "", S.OBS_SMILES: smi, S.OBS_DOSE: float(dose),
                            S.OBS_CELL_LINE: cell_line, S.OBS_CONTROL: False}, index=[f"pred_{i}" for i in range(n)])
        var = pd.DataFrame(index=pd.Index(self.meta["genes"], name="gene_id"))
        symbols = self.meta.get("gene_symbols")
        if symbols:
            var[S.VAR_SYMBOL] = symbols
        res = ad.AnnData(X=X, obs=obs, var=var)
        res.uns[S.UNS_KEY] = {"predicted": True, "model": self.meta.get("source", self.meta.get("dir", ""))}
        return res

    # ----------------------------------------------------------------------------------------------- save
    def save(self, path: str | Path) -> Path:
        """The finetuned model folder (weights, metadata, its control cells); `ScPert.load(path)` reads it."""
        self._check_trained()
        meta = {k: v for k, v in self.meta.items() if k not in ("dir", "source")}
        return save_finetuned(path, self.model, meta, controls=self._controls)

    def __repr__(self) -> str:
        state = "untrained" if self.model is None else (
            f"{len(self.meta['genes'])} genes, {len(self.meta['cells'])} cell lines, "
            f"{len(self.meta['drugs'])} training drugs, drug_rep={self.meta['drug_rep']}")
        c = self.config
        return (f"ScPert({state}; decoder={c.model.decoder}, pretrained={c.model.pretrained!r}"
                + (f", config={dataclasses.asdict(c.model)}" if self.model is None else "") + ")")


def predict_h5ad(model_spec, data=None, out=None, *, cell_line: str, dose_um: float, drug=None, smiles=None,
                 n_cells: int | None = None, seed: int = 0, tracking: str | None = None) -> Path:
    """`scpert predict`: predicted cells written atomically to `out` (h5ad). `data` (an h5ad with control cells)
    is needed only when the model was saved without its control cells."""
    if not np.isfinite(dose_um) or dose_um < 0:  # checked before the model, the data or the output are touched
        raise ValueRangeError(f"dose must be a finite number of uM >= 0, got {dose_um!r}", field="--dose",
                              hint="give the dose in uM, e.g. --dose 1.0 (0 = vehicle)")
    out = check_output(out)
    model = ScPert.load(model_spec, tracking)
    res = model.predict(load_adata(data) if data is not None else None, drug=drug, smiles=smiles,
                        cell_line=cell_line, dose=dose_um, n_cells=n_cells, seed=seed)
    return write_h5ad_atomic(res, out)
