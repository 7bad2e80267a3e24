"""`scpert bench finetune`: finetuning epoch time and prediction throughput of our model against CPA (cpa-tools, in
its own Python 3.10 environment) on the same AnnData and the same machine, measured side by side in one run.

An epoch is one pass over the training cells for both (ours: ceil(cells / batch) steps of `batch` cells; CPA: its own
epoch over its training split, 90% of the same cells). Training cells per second is what is compared, so the
different split does not bias the ratio. Both get the same number of torch threads.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import schema as S


def run_finetune_bench(data, *, split: str = "split_chemcpa_ood", epochs: int = 2, cpa_epochs: int = 3,
                       threads: int = 2, pretrained: str | None = None, predict_cells: int = 20_000,
                       with_cpa: bool = True, out: Path | None = None) -> dict:
    import torch

    from ..config import load
    from ..evaluate import metrics as M
    from ..evaluate.baselines.base import FitContext
    from ..finetune.config import FinetuneConfig
    from ..finetune.predict import FinetunedPredictor
    from ..finetune.train import load_adata

    a = load_adata(data)
    split = M.resolve_split(a, split)
    o = a.obs
    ctl = o[S.OBS_CONTROL].to_numpy(bool)
    train_mask = ctl | (o[split].astype(str) == "train").to_numpy()  # as evaluate_predictor fits the baselines
    n_train = int(train_mask.sum())
    conds = M.held_out_conditions(a, split)
    batch = 64
    steps = math.ceil(n_train / batch)
    print(f"bench finetune: {a.n_obs} cells x {a.n_vars} genes, {n_train} training cells (controls + training "
          f"drugs), {len(conds)} held-out conditions, {threads} torch threads", flush=True)
    rows = []
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="scpert-bench-ft-"))
    torch.set_num_threads(threads)
    ov = {"epochs": epochs, "steps_per_epoch": steps, "batch": batch, "threads": threads,
          "pretrained": pretrained or "none", "model.decoder": "lstm", "model.drug_rep": "morgan"}
    cfg = load(FinetuneConfig, None, [*(f"{k}={v}" for k, v in ov.items()), f"split={split}", f"out={work / 'ours'}"])
    ours = FinetunedPredictor(cfg, name="scpert_lstm_morgan", data=a)
    t0 = time.perf_counter()
    ours.fit(a, FitContext(genes=[str(g) for g in a.var_names], query=conds))
    fit_s = time.perf_counter() - t0
    ep = [r["epoch_s"] for r in ours.result.history]
    ep_s = float(np.median(ep))
    per_epoch = steps * batch
    ctl_by_line = {ln: a[(o[S.OBS_CELL_LINE].astype(str) == ln).to_numpy() & ctl]
                   for ln in sorted({c.cell_line for c in conds})}
    for c in conds:  # warm each line's control pool (encoded once, as in any evaluation)
        ours.predict(ctl_by_line[c.cell_line], c, 16, np.random.default_rng(0))
    t1 = time.perf_counter()
    done = 0
    rng = np.random.default_rng(0)
    while done < predict_cells:
        c = conds[done // 1000 % len(conds)]
        ours.predict(ctl_by_line[c.cell_line], c, 1000, rng)
        done += 1000
    pred_rate = done / (time.perf_counter() - t1)
    rows.append({"method": "scpert (ours, LSTM decoder)", "cells_per_epoch": per_epoch, "epoch_s": ep_s,
                 "train_cells_per_s": per_epoch / ep_s, "predict_cells_per_s": pred_rate, "fit_total_s": fit_s})
    print(f"  ours: epoch of {per_epoch} cells {ep_s:.2f}s ({per_epoch / ep_s:,.0f} cells/s), "
          f"predict {pred_rate:,.0f} cells/s, whole fit {fit_s:.1f}s", flush=True)
    if with_cpa:
        from ..evaluate.baselines.cpa_baseline import CpaPredictor

        if not CpaPredictor.available():
            print("  cpa: no CPA environment (`scpert baselines setup cpa`); CPA not measured", flush=True)
        else:
            cpa = CpaPredictor(params={"max_epochs": cpa_epochs, "threads": threads,
                                       "check_val_every_n_epoch": cpa_epochs}, verbose=False)
            t0 = time.perf_counter()
            cpa.fit(a[train_mask],
                    FitContext(genes=[str(g) for g in a.var_names], query=conds))
            t = cpa.timing
            rows.append({"method": f"CPA (cpa-tools {t['cpa_version']})", "cells_per_epoch": t["train_cells"],
                         "epoch_s": t["epoch_s"], "train_cells_per_s": t["train_cells"] / t["epoch_s"],
                         "predict_cells_per_s": t["predicted_cells"] / max(t["predict_s"], 1e-9),
                         "fit_total_s": time.perf_counter() - t0})
            print(f"  cpa: epoch of {t['train_cells']} cells {t['epoch_s']:.2f}s "
                  f"({rows[-1]['train_cells_per_s']:,.0f} cells/s), predict {rows[-1]['predict_cells_per_s']:,.0f} "
                  f"cells/s, {t['epochs']} epochs", flush=True)
    print("\n| method | training cells / epoch | epoch s | training cells/s | prediction cells/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['cells_per_epoch']} | {r['epoch_s']:.2f} | {r['train_cells_per_s']:,.0f} | "
              f"{r['predict_cells_per_s']:,.0f} |")
    res = {"rows": rows}
    if len(rows) == 2:
        res["train_speedup"] = rows[0]["train_cells_per_s"] / rows[1]["train_cells_per_s"]
        res["predict_speedup"] = rows[0]["predict_cells_per_s"] / rows[1]["predict_cells_per_s"]
        print(f"\nours vs CPA, same data and machine: training {res['train_speedup']:.1f}x the cells/s (epoch time "
              f"ratio for the same cells; goal >= 20x, the paper claims 11.6x), prediction "
              f"{res['predict_speedup']:.1f}x", flush=True)
    return res
