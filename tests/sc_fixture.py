"""Small realistic single-cell perturbation AnnData for metric/baseline tests (independent of data/simulate.py).

NB counts; 3 mechanism classes with class-specific gene programs, Hill dose response, 2 subpopulations with
different sensitivity, per-drug scaling; log1p CP10k; obs per schema.py; SMILES from RDKit's NCI sample.
"""
from __future__ import annotations

import os

import numpy as np


def _smiles(n: int) -> list[str]:
    import rdkit

    path = os.path.join(os.path.dirname(rdkit.__file__), "Data", "NCI", "first_5K.smi")
    out = []
    with open(path) as fh:
        for line in fh:
            s = line.split()[0]
            if 10 < len(s) < 60:
                out.append(s)
            if len(out) == n:
                break
    return out


def make_adata(n_drugs: int = 12, n_genes: int = 60, cells: int = 40, n_ctl: int = 120,
               lines=("A549", "MCF7"), doses=(1.0, 10.0), seed: int = 0, n_test: int = 4):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    base = {ln: rng.lognormal(0.5, 1.0, n_genes) for ln in lines}
    programs = rng.normal(0, 1.0, (3, n_genes)) * (rng.random((3, n_genes)) < 0.3)
    cls = np.arange(n_drugs) % 3
    strength = rng.uniform(0.8, 1.5, n_drugs)
    smi = _smiles(n_drugs)
    X, obs = [], []
    for ln in lines:
        def cells_of(mu, n, drug, s, dose, ctl, ln=ln):
            sub = rng.random(n) < 0.5
            for i in range(n):
                m = mu * (1.6 if sub[i] else 1.0) ** (not ctl)
                X.append(rng.negative_binomial(5, 5 / (5 + m * rng.lognormal(0, 0.2))))
                obs.append((drug, s, dose, ln, ctl))
        cells_of(base[ln], n_ctl, "control", "", 0.0, True)
        for d in range(n_drugs):
            for dose in doses:
                eff = strength[d] * dose / (dose + 3.0)
                mu = base[ln] * np.exp(eff * programs[cls[d]])
                cells_of(mu, cells, f"drug{d}", smi[d], dose, False)
    X = np.asarray(X, float)
    Xn = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
    obs = pd.DataFrame(obs, columns=["drug", "smiles", "dose_um", "cell_line", "is_control"])
    test = {f"drug{d}" for d in range(n_drugs - n_test, n_drugs)}
    obs["split_chemcpa_ood"] = np.where(obs.drug.isin(test), "test", "train")
    obs.loc[obs.is_control, "split_chemcpa_ood"] = "train"
    obs.index = [f"c{i}" for i in range(len(obs))]
    a = ad.AnnData(Xn.astype(np.float32), obs=obs)
    a.var_names = [str(1000 + g) for g in range(n_genes)]
    a.uns["truth_class"] = cls
    return a


def write_lincs_shards(adata, out_dir, seed: int = 1, reps: int = 3, extra_genes: int = 5):
    """LINCS-like shards (schema.py columns + manifest) whose signatures follow the fixture's mechanism classes:
    per (drug, line) `reps` noisy z-score rows of the drug's class program; drugs 0 and 1 are absent (to exercise
    the kNN fallback); the manifest has `extra_genes` genes not in adata and lacks the last 3 adata genes."""
    import json
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    genes = list(adata.var_names[:-3]) + [str(90000 + i) for i in range(extra_genes)]
    n_drugs = len(adata.uns["truth_class"])
    progs = rng.normal(0, 1, (3, len(genes)))
    smi = dict(zip(adata.obs.drug, adata.obs.smiles, strict=True))
    rows = []
    for ln in adata.obs.cell_line.unique():
        for d in range(2, n_drugs):
            for _ in range(reps):
                z = progs[adata.uns["truth_class"][d]] * 2 + rng.normal(0, 0.5, len(genes))
                rows.append(dict(sig_id=f"s{len(rows)}", cell_id=ln, pert_id=f"BRD-{d}", pert_iname=f"drug{d}",
                                 pert_type="trt_cp", dose_um=10.0, time_h=24.0, smiles=smi[f"drug{d}"],
                                 cell_idx=0, drug_idx=d, expr=z.astype(np.float32).tolist()))
        rows.append(dict(sig_id=f"s{len(rows)}", cell_id=ln, pert_id="DMSO", pert_iname="DMSO",
                         pert_type="ctl_vehicle", dose_um=float("nan"), time_h=24.0, smiles=None, cell_idx=0,
                         drug_idx=0, expr=rng.normal(0, 1, len(genes)).astype(np.float32).tolist()))
    t = pa.Table.from_pylist(rows)
    pq.write_table(t, out / "part-0000.parquet")
    (out / "manifest.json").write_text(json.dumps({"genes": genes, "n_genes": len(genes), "shards": [
        {"file": "part-0000.parquet", "rows": len(rows)}], "n_rows": len(rows)}))
    return out, progs
