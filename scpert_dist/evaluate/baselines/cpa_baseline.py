"""CPA (cpa-tools) as a baseline, run in its own Python 3.10 environment (`scpert baselines setup cpa`; every
cpa-tools release needs Python < 3.11). This side writes an AnnData, runs `cpa_runner.py` with that environment's
interpreter as a subprocess, reads CPA's predictions back and hands them to our metrics like any other predictor.

Protocol (CPA's counterfactual recipe, the same information our model gets): CPA trains on the training cells
(controls + training drugs; 10% of them, seeded, for its early stopping); for each held-out condition, control cells
of that cell line are relabelled with the held-out drug (its SMILES feeds CPA's RDKit drug embedding), dose and line,
and CPA predicts their perturbed expression. CPA never sees a held-out drug's cells.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ... import schema as S
from ...errors import ConfigError, OutputError
from ..predictor import Condition, FitContext, sample_cells

ENV_CPA = "SCPERT_CPA_ENV"
CPA_VERSION = "0.8.8"
CPA_RELEASED = "2024-08-15"
"""The day after cpa-tools 0.8.8 was uploaded to PyPI (2024-08-14)."""
RESOLVE_BEFORE = "2024-06-01"
"""cpa-tools 0.8.8 pins jax/torch/numpy of early 2024 but leaves most of its ~200 dependencies open: resolving them
against packages released before this date installs in seconds instead of pip backtracking for an hour."""


def cpa_env_dir(env: str | None = None) -> Path:
    """--env, else $SCPERT_CPA_ENV, else ~/.cache/scpert/cpa-env."""
    return Path(env or os.environ.get(ENV_CPA) or Path.home() / ".cache" / "scpert" / "cpa-env")


def cpa_python(env: str | None = None) -> Path | None:
    p = cpa_env_dir(env) / "bin" / "python"
    return p if p.exists() else None


# A CPU-sized version of the cpa-tools sci-Plex tutorial settings (Gaussian loss on log-normalised data, logsigm
# doser, batch-norm MLPs, adversarial classifiers with gradient penalty); fewer epochs than the tutorial's 2000 with
# early stopping, and the warm-up phases scaled down with them.
DEFAULT_PARAMS = {
    "max_epochs": 30, "batch_size": 128, "patience": 5, "check_val_every_n_epoch": 5, "threads": 2,
    "model": {"n_latent": 64, "recon_loss": "gauss", "doser_type": "logsigm", "n_hidden_encoder": 256,
              "n_layers_encoder": 3, "n_hidden_decoder": 256, "n_layers_decoder": 3,
              "use_batch_norm_encoder": True, "use_layer_norm_encoder": False, "use_batch_norm_decoder": True,
              "use_layer_norm_decoder": False, "dropout_rate_encoder": 0.1, "dropout_rate_decoder": 0.1,
              "variational": False},
    "plan": {"n_epochs_pretrain_ae": 5, "n_epochs_adv_warmup": 5, "n_epochs_mixup_warmup": 3, "mixup_alpha": 0.1,
             "adv_steps": 2, "n_hidden_adv": 64, "n_layers_adv": 2, "use_batch_norm_adv": True,
             "use_layer_norm_adv": False, "dropout_rate_adv": 0.3, "reg_adv": 20.0, "pen_adv": 20.0, "lr": 3e-4,
             "wd": 4e-7, "adv_lr": 3e-4, "adv_wd": 4e-7, "adv_loss": "cce", "doser_lr": 3e-4, "doser_wd": 4e-7,
             "do_clip_grad": False, "gradient_clip_value": 1.0, "step_size_lr": 45},
}


class CpaPredictor:
    """CPA through cpa-tools in its own environment; see the module docstring."""

    name = "cpa"

    def __init__(self, env: str | None = None, params: dict | None = None, max_query_cells: int = 256,
                 timeout_s: int = 7200, verbose: bool = True, keep_dir: str | None = None):
        self.env, self.max_query_cells, self.timeout_s, self.verbose = env, max_query_cells, timeout_s, verbose
        self.keep_dir = keep_dir
        """Where to keep the exchanged files (in.h5ad, params.json, pred.h5ad) instead of deleting them."""
        self.params = json.loads(json.dumps(DEFAULT_PARAMS))
        for k, v in (params or {}).items():
            if isinstance(v, dict):
                self.params[k].update(v)
            else:
                self.params[k] = v
        self.timing: dict = {}

    @staticmethod
    def available(env: str | None = None) -> bool:
        return cpa_python(env) is not None

    def fit(self, train, ctx: FitContext):
        from anndata import AnnData


        py = cpa_python(self.env)
        if py is None:
            raise ConfigError(f"no CPA environment at {cpa_env_dir(self.env)}", field="cpa",
                              hint="run `scpert baselines setup cpa` (Python 3.10 + cpa-tools) first")
        if not ctx.query:
            raise ConfigError("CPA needs the held-out conditions (drug, SMILES, dose, line) when it is set up",
                              field="FitContext.query", hint="use evaluate_predictor, which passes them")
        o = train.obs
        ctl = o[S.OBS_CONTROL].to_numpy(bool)
        dmax = float(np.nanmax([o[S.OBS_DOSE].to_numpy(float).max(), *[c.dose_um for c in ctx.query]])) or 1.0
        rng = np.random.default_rng(ctx.seed)
        X = S.dense(train.X).astype(np.float32)
        split = np.where(rng.random(train.n_obs) < 0.1, "valid", "train")
        lines = o[S.OBS_CELL_LINE].astype(str).to_numpy()
        obs = {"cpa_pert": np.where(ctl, "control", o[S.OBS_DRUG].astype(str).to_numpy()),
               "cpa_dose": np.where(ctl, 0.0, o[S.OBS_DOSE].to_numpy(float) / dmax),
               "cpa_smiles": np.where(ctl, "", o[S.OBS_SMILES].astype(str).to_numpy()),
               "cell_line": lines, "cpa_split": split, "query_id": np.full(train.n_obs, -1)}
        qX, qobs = [X], {k: [v] for k, v in obs.items()}
        self.query = list(ctx.query)
        for qi, c in enumerate(self.query):
            pool = np.flatnonzero(ctl & (lines == c.cell_line))
            if len(pool) == 0:
                raise ConfigError(f"no control cells of {c.cell_line} to predict {c.drug} from", field="cell_line")
            pick = rng.choice(pool, size=min(self.max_query_cells, len(pool)), replace=False)
            n = len(pick)
            qX.append(X[pick])
            for k, v in (("cpa_pert", c.drug), ("cpa_dose", c.dose_um / dmax), ("cpa_smiles", c.smiles),
                         ("cell_line", c.cell_line), ("cpa_split", "ood"), ("query_id", qi)):
                qobs[k].append(np.full(n, v))
        import pandas as pd

        obs_df = pd.DataFrame({k: np.concatenate(v) for k, v in qobs.items()})
        obs_df.index = [f"c{i}" for i in range(len(obs_df))]
        ad_in = AnnData(X=np.concatenate(qX), obs=obs_df)
        ad_in.var_names = [str(g) for g in train.var_names]
        params = dict(self.params, model=dict(self.params["model"], seed=int(ctx.seed)))
        work = Path(tempfile.mkdtemp(prefix="scpert-cpa-"))
        try:
            ad_in.write_h5ad(work / "in.h5ad")
            (work / "params.json").write_text(json.dumps(params))
            runner = Path(__file__).with_name("cpa_runner.py")
            cmd = [str(py), str(runner), str(work / "in.h5ad"), str(work / "pred.h5ad"), str(work / "params.json")]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=work, stdout=None if self.verbose else subprocess.PIPE,
                                  stderr=subprocess.STDOUT if not self.verbose else None, text=True,
                                  timeout=self.timeout_s, env={**os.environ, "PYTHONNOUSERSITE": "1"})
            wall = time.perf_counter() - t0
            if proc.returncode != 0 or not (work / "pred.h5ad").exists():
                tail = (proc.stdout or "")[-2000:] if not self.verbose else "(see the output above)"
                raise OutputError(f"the CPA run failed (exit {proc.returncode}): {tail}", path=str(work),
                                  hint="rerun `scpert baselines setup cpa`; the runner is " + str(runner))
            import anndata

            pred = anndata.read_h5ad(work / "pred.h5ad")
        finally:
            if self.keep_dir:
                shutil.copytree(work, Path(self.keep_dir) / f"seed{ctx.seed}", dirs_exist_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        self.timing = dict(pred.uns.get("cpa_timing", {}), wall_s=wall)
        qid = pred.obs["query_id"].to_numpy(int)
        P = np.asarray(pred.X, dtype=np.float64)
        self.pools = {i: P[qid == i] for i in range(len(self.query))}
        self.index = {(c.drug, c.cell_line, float(c.dose_um)): i for i, c in enumerate(self.query)}
        return self

    def predict(self, controls, cond: Condition, n_cells: int, rng) -> np.ndarray:
        i = self.index.get((cond.drug, cond.cell_line, float(cond.dose_um)))
        if i is None:
            raise ConfigError(f"CPA was not set up to predict {cond.drug} / {cond.cell_line} / {cond.dose_um} uM",
                              field="condition", hint="pass every condition to predict in FitContext.query")
        return np.clip(sample_cells(self.pools[i], n_cells, rng), 0, None)
