"""The finetuning run (plain PyTorch, no Ray needed), in phases: setup -> warm start -> epochs (step, validate,
keep the best) -> save. Validation uses the VALIDATION drugs only; the test drugs are never looked at.

    run_finetune(cfg, adata, on_epoch=callback) -> FinetuneResult

`on_epoch(record, run_id)` is called after every epoch with {epoch, train_loss, val_logfc_pearson, epoch_s, steps}
(the sweep passes its Ray Tune report here). MLflow goes through one `Tracker`: a tracking failure is reported
once and never stops the run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.finetuned import save_finetuned
from ..config import params, to_dict
from ..registry import DRUG_REPS
from ..tracking import Tracker
from .build import build_model, resolve_pretrained
from .config import FinetuneConfig
from .data import ControlPool, Prepared, condition_groups, load_adata
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
        self.prep = prep = Prepared(load_adata(self.adata if self.adata is not None else cfg.data.path),
                                    cfg.data.split, cfg.model.drug_rep)
        _check_drugs(prep, cfg)
        src = resolve_pretrained(cfg.model.pretrained, cfg.tracking.uri)  # once: an MLflow run id means a download
        if DRUG_REPS[cfg.model.drug_rep].needs_pretrained:  # model.pretrained and data.lincs_shards: config-checked
            prep.set_lincs_features(src, cfg.data.lincs_shards)
        self.model, self.n_transferred, self.encoder_cfg = build_model(cfg, prep.genes, prep.cells, prep.drugs,
                                                                       prep.feat_dim, src)
        self.frozen = cfg.model.freeze_encoder
        if self.frozen:
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        t = time.perf_counter()
        self.pool = ControlPool.drawn(self.model, prep, cfg.model.control_pool, self.rng)
        pool_s = time.perf_counter() - t
        print(f"finetune: {len(prep.train_rows)} train cells, {len(prep.drugs)} train drugs, control pool "
              f"{len(self.pool.all_rows)} cells encoded in {pool_s:.1f}s, encoder "
              f"{'frozen (cached states)' if self.frozen else 'trained'}", flush=True)
        if self.frozen:
            self.model.encoder.eval()
        self.targets = Targets.build(prep, condition_groups(prep, prep.train_rows))
        o = cfg.optim
        self.k_cells = max(1, min(o.cells_per_cond, o.batch_size))
        self.n_cond = max(1, o.batch_size // self.k_cells)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                     weight_decay=o.weight_decay)
        self.pool_s = pool_s
        return self

    def track(self, tracker: Tracker, extra_params: dict | None = None) -> Finetuner:
        """Log into `tracker` from here on (started after setup, so bad input leaves no run behind)."""
        self.tracker = tracker
        tracker.log_params({**params(self.cfg), "n_genes": len(self.prep.genes),
                            "genes_transferred": self.n_transferred, "n_train_drugs": len(self.prep.drugs),
                            **(extra_params or {})})
        tracker.log_metrics({"control_pool_encode_s": self.pool_s})
        return self

    # ---------------------------------------------------------------------------------------- warm start
    def warm_start(self) -> dict:
        """Shift head on the training condition means; the warm-started model is the first candidate."""
        if self.model.shift is None or self.cfg.optim.cond_steps <= 0:
            return {}
        t = time.perf_counter()
        prep = self.prep
        vgroups = condition_groups(prep, prep.valid_rows) if len(prep.valid_rows) else None
        keys = self.targets.keys  # (drug, line, dose): the line term starts at the average training drug's response
        self.model.shift.set_anchor(torch.tensor([prep.cells.index(k[1]) for k in keys]),
                                    torch.tensor([k[2] for k in keys], dtype=torch.float32), self.targets.true_lfc)
        warm = warm_start_shift(self.model, prep, self.targets, self.cfg.optim, vgroups)
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
        o = self.cfg.optim
        for ep in range(o.epochs):
            t0, losses = time.perf_counter(), []
            for _ in range(o.steps_per_epoch):
                if o.max_steps and self.step >= o.max_steps:
                    break
                batch = sample_batch(self.prep, self.pool, self.targets, self.n_cond, self.k_cells, self.rng)
                losses.append(finetune_step(self.model, self.opt, self.prep, self.pool, self.targets, batch,
                                            frozen=self.frozen, objective=self.cfg.objective))
                self.step += 1
            dt = time.perf_counter() - t0
            if not self.frozen:
                self.pool.refresh(self.model)
            self._end_epoch({"epoch": ep, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                             "val_logfc_pearson": self.validate(), "epoch_s": dt, "steps": self.step})
            if o.max_steps and self.step >= o.max_steps:
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
        meta = {"config": to_dict(cfg), "encoder": self.encoder_cfg, "init": self.model.init_params, "genes": prep.genes,
                "gene_symbols": prep.gene_symbols, "cells": prep.cells,
                "drugs": prep.drugs, "smiles": prep.smiles, "drug_rep": prep.rep, "feat_dim": prep.feat_dim,
                "lincs_feat": ({k: [float(x) for x in v] for k, v in prep.feat.items()}
                               if DRUG_REPS[prep.rep].needs_pretrained else {}),
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
    if DRUG_REPS[cfg.model.drug_rep].table:
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
    tracker = (Tracker.start(cfg.tracking.uri, cfg.tracking.experiment, run_name=run_name, tags=tags,
                             parent_run_id=parent_run_id) if log_mlflow else Tracker.disabled())
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
