"""Runs inside the separate Python 3.10 environment made by `scpert baselines setup cpa` (cpa-tools needs < 3.11):
trains CPA (cpa-tools, Lotfollahi et al. 2023) on an AnnData written by `CpaPredictor` and writes its counterfactual
predictions back as AnnData. Imports nothing from scpert_dist: only cpa-tools and what it brings.

Input obs columns (written by CpaPredictor): cpa_pert (drug name, or 'control'), cpa_dose (dose / max dose),
cpa_smiles, cell_line, cpa_split ('train' | 'valid' | 'ood') and query_id (-1 for training cells). The 'ood' rows are
control cells relabelled with a held-out condition (CPA's counterfactual recipe: control expression in, the target
perturbation's labels on); CPA never trains on them, they only register the held-out drugs (and their SMILES for the
RDKit drug embedding) and are what it predicts.

Output: X = CPA's predicted expression of the ood rows, obs['query_id']; uns['cpa_timing'] with the training time
per epoch and the number of training cells per epoch.

Usage: python cpa_runner.py IN.h5ad OUT.h5ad PARAMS.json
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst, params_file = argv
    params = json.loads(open(params_file).read())

    import anndata as ad
    import numpy as np
    import torch
    try:  # scvi-tools 0.20 (under cpa-tools 0.8) drives pytorch_lightning's Trainer
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        from lightning.pytorch.callbacks import Callback

    import cpa

    torch.set_num_threads(int(params.get("threads", 1)))
    a = ad.read_h5ad(src)
    a.X = np.asarray(a.X, dtype=np.float32)
    for c in ("cpa_pert", "cpa_smiles", "cell_line", "cpa_split"):
        a.obs[c] = a.obs[c].astype(str)
    cpa.CPA.setup_anndata(a, perturbation_key="cpa_pert", control_group="control", dosage_key="cpa_dose",
                          smiles_key="cpa_smiles", is_count_data=False, categorical_covariate_keys=["cell_line"],
                          max_comb_len=1)
    model = cpa.CPA(a, split_key="cpa_split", train_split="train", valid_split="valid", test_split="ood",
                    use_rdkit_embeddings=True, **params["model"])

    class EpochTimer(Callback):
        def __init__(self):
            self.times: list[float] = []
            self._t = 0.0

        def on_train_epoch_start(self, trainer, pl_module):
            self._t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._t)
            print(f"[cpa] epoch {len(self.times)}/{params['max_epochs']} {self.times[-1]:.1f}s", flush=True)

    timer = EpochTimer()
    t0 = time.perf_counter()
    model.train(max_epochs=int(params["max_epochs"]), use_gpu=False, batch_size=int(params["batch_size"]),
                plan_kwargs=params["plan"], early_stopping_patience=int(params.get("patience", 5)),
                # CPA restores its best validation state at the end: validate at least once, or it restores the
                # untrained initialisation (seen with max_epochs < check_val_every_n_epoch)
                check_val_every_n_epoch=min(int(params.get("check_val_every_n_epoch", 5)), int(params["max_epochs"])),
                callbacks=[timer], enable_progress_bar=False, save_path=False)
    train_s = time.perf_counter() - t0
    q = a[a.obs["cpa_split"] == "ood"].copy()
    t1 = time.perf_counter()
    model.predict(q, batch_size=512)
    pred_s = time.perf_counter() - t1
    out = ad.AnnData(X=np.asarray(q.obsm["CPA_pred"], dtype=np.float32))
    out.obs_names = q.obs_names
    out.obs["query_id"] = q.obs["query_id"].to_numpy()
    out.var_names = q.var_names
    out.uns["cpa_timing"] = {"train_s": train_s, "epochs": len(timer.times),
                             "epoch_s": float(np.median(timer.times)) if timer.times else float("nan"),
                             "train_cells": int((a.obs["cpa_split"] == "train").sum()), "predict_s": pred_s,
                             "predicted_cells": int(q.n_obs), "cpa_version": cpa.__version__}
    out.write_h5ad(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
