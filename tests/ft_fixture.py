"""Small realistic sci-Plex3-shaped AnnData for finetune tests: NB counts, log1p-CP10k, drug effects that are a
fixed function of each drug's real Morgan fingerprint (so similar drugs act alike), Hill dose response."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def real_smiles(n: int, shared: Path | None = None) -> list[tuple[str, str]]:
    import pandas as pd

    p = shared / "sciplex" / "sciplex3_compounds_with_lincs_overlap.csv" if shared else None
    if p is not None and p.is_file():
        t = pd.read_csv(p).dropna(subset=["chemcpa_smiles"])
        return list(zip(t["chemcpa_name"].astype(str), t["chemcpa_smiles"].astype(str), strict=False))[:n]
    import rdkit

    f = Path(rdkit.__file__).parent / "Data" / "NCI" / "first_5K.smi"
    rows = [ln.split() for ln in f.read_text().splitlines()[:n]]
    return [(f"nci_{r[1]}", r[0]) for r in rows]


def make_adata(n_drugs: int = 12, n_genes: int = 40, cells_per: int = 30, seed: int = 0, shared=None):
    import anndata as ad
    import pandas as pd

    from scpert_dist.data.drugs import morgan_fingerprints

    rng = np.random.default_rng(seed)
    drugs = real_smiles(n_drugs, shared)
    fp = morgan_fingerprints([s for _, s in drugs], n_bits=1024).astype(np.float32)
    W = rng.normal(0, 1, (1024, n_genes)).astype(np.float32) / 6
    eff = fp @ W                                    # [D, G] log-fold effects from the structure
    lines = ["A549", "MCF7"]
    base = {c: rng.gamma(2.0, 2.0, n_genes) for c in lines}
    doses = [0.1, 1.0, 10.0]
    rows, X = [], []
    for c in lines:
        for _ in range(cells_per * 2):
            X.append(rng.negative_binomial(5, 5 / (5 + base[c])))
            rows.append(("control", "", 0.0, c, True))
        for (name, smi), e in zip(drugs, eff, strict=False):
            for d in doses:
                hill = d / (d + 1.0)
                mu = base[c] * np.exp(hill * e)
                for _ in range(cells_per // 3):
                    X.append(rng.negative_binomial(5, 5 / (5 + mu)))
                    rows.append((name, smi, d, c, False))
    counts = np.asarray(X, np.float32)
    lib = counts.sum(1, keepdims=True).clip(1)
    obs = pd.DataFrame(rows, columns=["drug", "smiles", "dose_um", "cell_line", "is_control"])
    obs.index = [f"c{i}" for i in range(len(obs))]
    names = [n for n, _ in drugs]
    split = {n: "train" for n in names}
    for n in names[-2:]:
        split[n] = "test"
    for n in names[-4:-2]:
        split[n] = "valid"
    obs["split_test"] = [("train" if r[4] else split[r[0]]) for r in rows]
    a = ad.AnnData(X=np.log1p(counts / lib * 1e4).astype(np.float32), obs=obs,
                   var=pd.DataFrame(index=[str(1000 + i) for i in range(n_genes)]))
    a.layers["counts"] = counts
    a.uns["scpert"] = {"normalized": "log1p_cp10k", "semi_synthetic": True}
    return a, names


def ft_config(**fields):
    """A FinetuneConfig from field names (each found in the one section that has it: split -> data.split, epochs ->
    optim.epochs, ...) or dotted paths, as `ScPert(**kw)` takes them."""
    from scpert_dist.config import with_overrides
    from scpert_dist.finetune.config import FinetuneConfig

    return with_overrides(FinetuneConfig(), fields)
