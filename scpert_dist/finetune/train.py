"""The finetuning run (plain PyTorch, no Ray needed), in phases: setup -> warm start -> epochs (step, validate,
keep the best) -> save. Validation uses the VALIDATION drugs only; the test drugs are never looked at.

    run_finetune(cfg, adata, on_epoch=callback) -> FinetuneResult

`on_epoch(record, run_id)` is called after every epoch with {epoch, train_loss, val_logfc_pearson, epoch_s, steps}
(the sweep passes its Ray Tune report here). MLflow goes through one `Tracker`: a tracking failure is reported
once and never stops the run.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_pretrained, transfer_gene_embeddings
from ..checkpoint.finetuned import read_finetuned, save_finetuned
from ..checkpoint.resolve import resolve
from ..config import to_dict
from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig, model_config
from ..model.encoder import GeneTokenEncoder
from ..tracking import Tracker
from .config import FinetuneConfig
from .data import ControlPool, Prepared, condition_groups, load_adata
from .model import FinetuneModel
from .step import Targets, finetune_step, sample_batch, warm_start_shift
from .validate import logfc_pearson_groups

EpochCallback = Callable[[dict, "str | None"], None]


@dataclass
class FinetuneResult:
    run_id: str | None
    model_dir: Path
    history: list[dict] = field(default_factory=list)
    val_metrics: dict = field(default_factory=dict)
    n_transferred: int = 0


def resolve_pretrained(spec: str, tracking: str | None = None) -> Path | None:
    """'none'/'scratch' -> None; else the folder of the pretrained model named by a folder, run id or model URI."""
    if not spec or spec.lower() in ("none", "scratch"):
        return None
    return resolve(spec, kind="pretrained", tracking=tracking)


_RESOLVE = object()


def build_finetune_model(encoder, model_cfg: dict, **shape) -> FinetuneModel:
    """A FinetuneModel around `encoder` from the `model` section of a finetune config (a dict): every key that
    FinetuneModel accepts is passed, so a saved model is rebuilt exactly as it was trained. `shape`: n_genes,
    n_cells, n_drugs, drug_feat_dim, drug_rep."""
    accepted = set(inspect.signature(FinetuneModel).parameters)
    kwargs = {k: v for k, v in model_cfg.items() if k in accepted and k not in shape}
    kwargs.setdefault("shift_head", False)  # models saved before the shift head existed have none
    return FinetuneModel(encoder, **kwargs, **shape)


def load_finetuned(spec, tracking: str | None = None) -> tuple[FinetuneModel, dict]:
    """(FinetuneModel in eval mode, meta) from a folder, run id, models:/name@alias or models:/name/version."""
    state, meta = read_finetuned(spec, tracking)
    m = build_finetune_model(GeneTokenEncoder(ModelConfig(**meta["encoder"])), meta["config"]["model"],
                             n_genes=len(meta["genes"]), n_cells=len(meta["cells"]), n_drugs=len(meta["drugs"]),
                             drug_feat_dim=meta["feat_dim"], drug_rep=meta["drug_rep"])
    try:
        m.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the saved config ({str(e).splitlines()[0]})",
                              path=meta["dir"]) from None
    return m.eval(), meta


def build_model(cfg: FinetuneConfig, genes: list[str], cells: list[str], drugs: list[str], feat_dim: int,
                src=_RESOLVE):
    """Returns (FinetuneModel, n genes transferred from the pretrained encoder, encoder ModelConfig dict).
    `src`: the pretrained checkpoint folder (or None = scratch) when the caller already resolved cfg.pretrained."""
    if src is _RESOLVE:
        src = resolve_pretrained(cfg.pretrained, cfg.tracking)
    n_tr = 0
    if src is None:
        mcfg = model_config(cfg.model.preset, n_genes=len(genes))
        enc = GeneTokenEncoder(mcfg)
    else:
        pre, pcfg, info = load_pretrained(src)
        mcfg = dataclasses.replace(pcfg, n_genes=len(genes), n_cells=0, n_drugs=0)
        enc = GeneTokenEncoder(mcfg)
        enc.load_state_dict({k: v for k, v in pre.encoder.state_dict().items() if not k.startswith("gene_emb")},
                            strict=False)
        n_tr = transfer_gene_embeddings(pre.encoder, info["genes"], enc, genes)
        print(f"pretrained encoder from {src}: {n_tr}/{len(genes)} gene embeddings transferred, "
              f"{len(genes) - n_tr} new genes initialised fresh")
    m = build_finetune_model(enc, to_dict(cfg.model), n_genes=len(genes), n_cells=len(cells), n_drugs=len(drugs),
                             drug_feat_dim=feat_dim, drug_rep=cfg.model.drug_rep)
    return m, n_tr, dataclasses.asdict(mcfg)


class Finetuner:
    """One finetuning run. Its parts are attributes set by `setup`: prep (arrays), model, pool (cached control
    states), targets, opt, tracker; `fit` runs the epochs, `save` writes the best state."""

    def __init__(self, cfg: FinetuneConfig, adata=None, *, on_epoch: EpochCallback | None = None):
        self.cfg, self.adata, self.on_epoch = cfg, adata, on_epoch
        self.tracker = Tracker.disabled()
        self.history: list[dict] = []
        self.best, self.best_state, self.step = -np.inf, None, 0
        self.rng = np.random.default_rng(cfg.seed)

    # --------------------------------------------------------------------------------------------- setup
    def setup(self) -> Finetuner:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.prep = prep = Prepared(load_adata(self.adata if self.adata is not None else cfg.data), cfg.split,
                                    cfg.model.drug_rep)
        _check_drugs(prep, cfg)
        src = resolve_pretrained(cfg.pretrained, cfg.tracking)  # once: an MLflow run id means a download
        if cfg.model.drug_rep == "lincs":
            if src is None or not cfg.lincs_shards:
                raise ConfigError("drug_rep='lincs' encodes each drug's LINCS signature with the pretrained encoder",
                                  field="pretrained" if src is None else "lincs_shards",
                                  hint="give pretrained=RUN|DIR and lincs_shards=DIR (from `scpert data lincs`)")
            prep.set_lincs_features(src, cfg.lincs_shards)
        self.model, self.n_transferred, self.encoder_cfg = build_model(cfg, prep.genes, prep.cells, prep.drugs,
                                                                       prep.feat_dim, src=src)
        self.frozen = cfg.model.freeze_encoder
        if self.frozen:
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        t = time.perf_counter()
        self.pool = ControlPool(self.model, prep, cfg.model.control_pool, self.rng)
        pool_s = time.perf_counter() - t
        print(f"finetune: {len(prep.train_rows)} train cells, {len(prep.drugs)} train drugs, control pool "
              f"{len(self.pool.all_rows)} cells encoded in {pool_s:.1f}s, encoder "
              f"{'frozen (cached states)' if self.frozen else 'trained'}", flush=True)
        if self.frozen:
            self.model.encoder.eval()
        self.targets = Targets.build(prep, condition_groups(prep, prep.train_rows))
        self.k_cells = max(1, min(cfg.cells_per_cond, cfg.batch))
        self.n_cond = max(1, cfg.batch // self.k_cells)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.pool_s = pool_s
        return self

    def track(self, tracker: Tracker, extra_params: dict | None = None) -> Finetuner:
        """Log into `tracker` from here on (started after setup, so bad input leaves no run behind)."""
        self.tracker = tracker
        tracker.log_params({**to_dict(self.cfg), "n_genes": len(self.prep.genes),
                            "genes_transferred": self.n_transferred, "n_train_drugs": len(self.prep.drugs),
                            **(extra_params or {})})
        tracker.log_metrics({"control_pool_encode_s": self.pool_s})
        return self

    # ---------------------------------------------------------------------------------------- warm start
    def warm_start(self) -> dict:
        """Shift head on the training condition means; the warm-started model is the first candidate."""
        if self.model.shift is None or self.cfg.cond_steps <= 0:
            return {}
        t = time.perf_counter()
        prep = self.prep
        vgroups = condition_groups(prep, prep.valid_rows) if len(prep.valid_rows) else None
        keys = self.targets.keys  # (drug, line, dose): the line term starts at the average training drug's response
        self.model.shift.set_anchor(torch.tensor([prep.cells.index(k[1]) for k in keys]),
                                    torch.tensor([k[2] for k in keys], dtype=torch.float32), self.targets.true_lfc)
        warm = warm_start_shift(self.model, prep, self.targets, self.cfg, vgroups)
        print(f"finetune: shift-head warm start on {len(self.targets.keys)} condition means: {warm} "
              f"({time.perf_counter() - t:.1f}s)", flush=True)
        self.tracker.log_metrics(warm)
        if len(prep.valid_rows):  # candidate 'epoch -1'
            self.best = self.validate()
            self.best_state = self._state()
            print(f"finetune: after warm start val logFC r {self.best:.3f}", flush=True)
        return warm

    # ----------------------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict]:
        cfg = self.cfg
        for ep in range(cfg.epochs):
            t0, losses = time.perf_counter(), []
            for _ in range(cfg.steps_per_epoch):
                if cfg.max_steps and self.step >= cfg.max_steps:
                    break
                batch = sample_batch(self.prep, self.pool, self.targets, self.n_cond, self.k_cells, self.rng)
                losses.append(finetune_step(self.model, self.opt, self.prep, self.pool, self.targets, batch,
                                            frozen=self.frozen, cond_weight=cfg.cond_weight,
                                            mmd_weight=cfg.mmd_weight))
                self.step += 1
            dt = time.perf_counter() - t0
            if not self.frozen:
                self.pool.refresh(self.model)
            self._end_epoch({"epoch": ep, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                             "val_logfc_pearson": self.validate(), "epoch_s": dt, "steps": self.step})
            if cfg.max_steps and self.step >= cfg.max_steps:
                break
        return self.history

    def validate(self) -> float:
        return logfc_pearson_groups(self.model, self.prep, self.prep.valid_rows,
                                    np.random.default_rng(self.cfg.seed + 1), n_cells=16, pool=self.pool)

    def _end_epoch(self, rec: dict) -> None:
        self.history.append(rec)
        val = rec["val_logfc_pearson"]
        print(f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f} val logFC r {val:.3f} ({rec['epoch_s']:.1f}s)",
              flush=True)
        self.tracker.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=rec["epoch"])
        score = val if np.isfinite(val) else -rec["train_loss"]
        if score > self.best:
            self.best, self.best_state = score, self._state()
        if self.on_epoch is not None:
            self.on_epoch(rec, self.tracker.run_id)

    def _state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ---------------------------------------------------------------------------------------------- save
    def save(self) -> FinetuneResult:
        """The best state (by validation-drug logFC r) to cfg.out, logged as the run's model/ artifact."""
        prep, cfg = self.prep, self.cfg
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        meta = {"config": to_dict(cfg), "encoder": self.encoder_cfg, "genes": prep.genes,
                "gene_symbols": prep.gene_symbols, "cells": prep.cells,
                "drugs": prep.drugs, "smiles": prep.smiles, "drug_rep": prep.rep, "feat_dim": prep.feat_dim,
                "lincs_feat": {k: [float(x) for x in v] for k, v in prep.feat.items()} if prep.rep == "lincs" else {},
                "lincs_imputed": prep.lincs_imputed,
                "genes_transferred": self.n_transferred, "history": self.history}
        out = save_finetuned(Path(cfg.out), self.model, meta, controls=self.pool.as_anndata(prep))
        best_rec = max(self.history, key=lambda r: r["val_logfc_pearson"] if np.isfinite(r["val_logfc_pearson"])
                       else -r["train_loss"])
        valm = {"val_logfc_pearson": best_rec["val_logfc_pearson"], "best_epoch": best_rec["epoch"]}
        self.tracker.log_metrics({"best_val_logfc_pearson": valm["val_logfc_pearson"]})
        self.tracker.log_artifact(out, "model")
        if self.tracker.run_id:
            plot_history(self.history, out.parent / "finetune_history.png")
            self.tracker.log_artifact(out.parent / "finetune_history.png", "plots")
        return FinetuneResult(self.tracker.run_id, out, self.history, valm, self.n_transferred)


def _check_drugs(prep: Prepared, cfg: FinetuneConfig) -> None:
    test_drugs = set(prep.drug[(~prep.ctl) & (prep.split == "test")])
    assert not (set(prep.drug[prep.valid_rows]) & test_drugs), "validation rows include a test drug"
    if cfg.model.drug_rep == "learned":
        unseen = sorted(set(prep.drug[~prep.ctl]) - set(prep.drugs))
        if unseen:
            warnings.warn(f"drug_rep='learned' is a lookup table: {len(unseen)} drugs not in training "
                          f"(e.g. {unseen[:3]}) get an untrained vector and cannot be predicted from their "
                          "structure; use drug_rep='morgan' for unseen drugs", UserWarning, stacklevel=3)


def run_finetune(cfg: FinetuneConfig, adata=None, *, log_mlflow: bool = True, on_epoch: EpochCallback | None = None,
                 run_name: str | None = None, tags: dict | None = None, parent_run_id: str | None = None,
                 extra_params: dict | None = None) -> FinetuneResult:
    """Finetune per `cfg` on `adata` (or cfg.data). With log_mlflow, one MLflow run (nested under
    `parent_run_id` when given) holds the params (+ `extra_params`), per-epoch metrics, the model/ artifact and
    plots."""
    ft = Finetuner(cfg, adata, on_epoch=on_epoch).setup()
    tracker = (Tracker.start(cfg.tracking, cfg.experiment, run_name=run_name, tags=tags, parent_run_id=parent_run_id)
               if log_mlflow else Tracker.disabled())
    try:
        ft.track(tracker, extra_params)
        ft.warm_start()
        ft.fit()
        result = ft.save()
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return result


def plot_history(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].plot([h["train_loss"] for h in history])
    ax[0].set_title("train loss")
    ax[1].plot([h["val_logfc_pearson"] for h in history])
    ax[1].set_title("val logFC Pearson (valid drugs)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
