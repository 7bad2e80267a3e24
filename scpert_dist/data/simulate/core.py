"""Semi-synthetic default dataset: a hidden ground truth on real metadata, written as LINCS-shaped GCTX + tables
and a sci-Plex3-shaped h5ad (raw counts), so the demo runs through the real ingestion path.

Hidden truth: Morgan fingerprint -> mechanism class (nearest of K prototype fingerprints, so similar structures share
classes) -> low-rank gene program (class loadings + fixed random projection of the fingerprint, on r gene factors);
some compounds near-inactive; per (cell line x class) sensitivity; Hill dose-response (EC50 log-normal around 1 uM);
time factor (6 h = 0.6 of 24 h). Bulk z = effect * Z_PER_LOG + noise (clipped +-10). Single cells: basal profile of the
line + sub-population program + sub-population-scaled effect; negative-binomial counts, log-normal size factors,
dropout; anti-proliferative classes deplete cycling cells with dose.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..paths import ensure_writable_dir
from .metadata import SC_DOSES_NM, SimMetadata, load_metadata


@dataclass(frozen=True)
class SimPreset:
    """Size of one simulated dataset."""

    n_bulk: int
    """treated bulk signatures sampled from the (cell, compound) design (plus the sci-Plex3 compounds LINCS measured)."""
    n_sci_compounds: int | None
    """sci-Plex3 compounds on the single-cell side (None = all 188); the chemCPA OOD drugs are always kept."""
    cells_per_condition: int
    """cells per (compound, dose, line)."""
    vehicle_cells_per_line: int
    """vehicle cells per line."""
    vehicle_frac: float = 0.05
    """vehicle (DMSO) signatures as a fraction of n_bulk."""
    n_classes: int = 10
    """mechanism classes (prototype fingerprints)."""
    rank: int = 12
    """gene factors of the low-rank effect programs."""


PRESETS: dict[str, SimPreset] = {
    "tiny": SimPreset(n_bulk=800, n_sci_compounds=24, cells_per_condition=6, vehicle_cells_per_line=200),
    "default": SimPreset(n_bulk=16000, n_sci_compounds=None, cells_per_condition=8, vehicle_cells_per_line=600),
    "large": SimPreset(n_bulk=60000, n_sci_compounds=None, cells_per_condition=40, vehicle_cells_per_line=3000),
}

LINCS_DOSES_UM = np.array([0.04, 0.12, 0.37, 1.11, 3.33, 10.0])
TIMES_H = np.array([6.0, 24.0])
TIME_FACTOR = {6.0: 0.6, 24.0: 1.0}
Z_PER_LOG = 3.0
"""bulk z units per natural-log unit of the hidden effect."""
SUBPOPS = ["cycling", "quiescent", "stressed"]
SUBPOP_RESPONSE = np.array([2.0, 1.0, 0.15])
"""cycling cells respond with 2x the effect, stressed cells barely."""
NB_THETA = 4.0
DROPOUT = 0.08
LIB_TARGET = 4000.0


MU_CAP = 1e5  # largest NB mean of one gene in one cell


def _dose_str(um: float) -> str:
    return f"{um * 1000:g} nM" if um < 1 else f"{um:g} uM"


def _sid(smiles: str) -> str:
    return "SIM-" + hashlib.sha1(smiles.encode()).hexdigest()[:10].upper()


class Truth:
    """The hidden ground truth: deterministic functions of (compound fingerprint, line, dose, time)."""

    def __init__(self, meta: SimMetadata, preset: SimPreset, seed: int, fps: np.ndarray, n_genes: int):
        rng = np.random.default_rng([seed, 1])
        n_lines = len(meta.basal.index)
        self.lines = {c: i for i, c in enumerate(meta.basal.index)}
        k, r = preset.n_classes, preset.rank
        # prototype fingerprints: K compounds chosen at random; class = nearest prototype by Tanimoto
        proto = fps[rng.choice(len(fps), size=k, replace=False)].astype(np.float32)
        f = fps.astype(np.float32)
        inter = f @ proto.T
        union = f.sum(1, keepdims=True) + proto.sum(1)[None] - inter
        self.cls = np.argmax(inter / np.maximum(union, 1), axis=1)
        self.antiprolif = np.zeros(k, bool)
        self.antiprolif[: max(1, k // 3)] = True
        self.factors = rng.normal(0, 1, (r, n_genes)) * (rng.random((r, n_genes)) < 0.25)  # sparse gene factors
        self.class_load = rng.normal(0, 1, (k, r))
        proj = rng.normal(0, 1, (fps.shape[1], r))
        fc = f - f.mean(0, keepdims=True)
        own = fc @ proj / np.sqrt(np.maximum(f.sum(1, keepdims=True), 1))
        load = self.class_load[self.cls] + 0.6 * own / (own.std() + 1e-9)
        eff = load @ self.factors
        eff /= eff.std(1, keepdims=True) + 1e-9
        n = len(fps)
        self.amp = rng.lognormal(np.log(0.35), 0.35, n)  # effect sd (log units) at full response
        self.inactive = rng.random(n) < 0.15
        self.amp[self.inactive] *= 0.05
        self.effect = eff * self.amp[:, None]  # [compound, gene] full-response log-fold change
        self.ec50 = rng.lognormal(0.0, 1.0, n)  # uM
        self.hill = rng.uniform(0.8, 2.5, n)
        self.sens = rng.lognormal(0, 0.45, (n_lines, k))

    def response(self, ci: np.ndarray, line: np.ndarray, dose_um: np.ndarray, time_h: np.ndarray) -> np.ndarray:
        """Scalar response (Hill * sensitivity * time) per condition."""
        d = np.asarray(dose_um, float)
        h = self.hill[ci]
        hill = d**h / (d**h + self.ec50[ci] ** h)
        tf = np.vectorize(TIME_FACTOR.get)(np.asarray(time_h, float))
        return hill * self.sens[line, self.cls[ci]] * tf

    def lfc(self, ci, line, dose_um, time_h) -> np.ndarray:
        """Population-independent hidden log-fold change [n, genes]."""
        return self.effect[ci] * self.response(ci, line, dose_um, time_h)[:, None]


def _fingerprints(smiles: list[str]) -> np.ndarray:
    from .drugs import morgan_fingerprints

    return np.asarray(morgan_fingerprints(smiles, radius=2, n_bits=1024)).astype(bool)


def _atomic_dir_file(path: Path, writer) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    writer(tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    _atomic_dir_file(path, lambda p: p.write_text(text))


def _write_gctx(path: Path, z: np.ndarray, genes: pd.DataFrame, sig: pd.DataFrame) -> None:
    if not hasattr(np, "string_"):
        np.string_ = np.bytes_  # cmapPy 4.0.1 under numpy 2
    from cmapPy.pandasGEXpress.GCToo import GCToo
    from cmapPy.pandasGEXpress.write_gctx import write as write_gctx

    rid = pd.Index(genes.gene_id.astype(str).tolist(), name="rid")
    cid = pd.Index(sig.sig_id.tolist(), name="cid")
    data = pd.DataFrame(z.T.astype(np.float32), index=rid, columns=cid)
    rmeta = pd.DataFrame({"pr_gene_id": genes.gene_id.astype(str).values, "pr_gene_symbol": genes.gene_symbol.values,
                          "pr_is_lm": np.ones(len(genes), dtype=np.int64)}, index=rid)
    rmeta.columns.name = "rhd"
    cmeta = sig.set_index("sig_id", drop=False)
    cmeta.index = cid
    cmeta.columns.name = "chd"
    g = GCToo(data_df=data, row_metadata_df=rmeta, col_metadata_df=cmeta)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write_gctx(g, str(tmp))
    os.replace(tmp, path)


def simulate(out_dir: str | os.PathLike, preset: str = "default", metadata: str | os.PathLike | None = None,
             seed: int = 0, extra_genes: int = 200, progress: bool = True) -> dict:
    """Simulate the semi-synthetic dataset into `out_dir`; returns the SIMULATION.json content."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}", field="preset", hint=f"one of {sorted(PRESETS)}")
    if extra_genes < 0:
        raise ConfigError("extra_genes must be >= 0", field="extra_genes", hint="e.g. 200")
    p = PRESETS[preset]
    t0 = time.time()

    def say(msg: str) -> None:
        if progress:
            print(f"[simulate {time.time() - t0:5.1f}s] {msg}", flush=True)

    meta = load_metadata(Path(metadata) if metadata is not None else None)  # bad metadata: error, no output
    out = ensure_writable_dir(out_dir)
    if (out / "SIMULATION.json").exists():
        (out / "SIMULATION.json").unlink()  # folder is incomplete until rewritten
    say(f"metadata: {meta.description}")
    rng = np.random.default_rng([seed, 0])
    genes = meta.genes
    n_lm = len(genes)

    # ---- compounds: sci-Plex3 side
    from .drugs import canonical_smiles

    sci = meta.sciplex.copy()
    if p.n_sci_compounds is not None and p.n_sci_compounds < len(sci):
        keep = set(sci.index[sci.ood])
        rest = [i for i in rng.permutation(sci.index) if i not in keep]
        keep |= set(rest[: max(0, p.n_sci_compounds - len(keep))])
        sci = sci.loc[sorted(keep)].reset_index(drop=True)
    sci["canonical_smiles"] = [canonical_smiles(s) for s in sci.smiles]

    # ---- bulk design: a sample of the real (cell, compound) pairs + the sci-Plex3 compounds LINCS measured
    bd = meta.bulk_design
    take = bd.iloc[np.sort(rng.choice(len(bd), size=min(p.n_bulk, len(bd)), replace=False))]
    extra_rows = []
    lines_all = list(meta.basal.index)
    for _, r in sci[sci.in_lincs].iterrows():
        others = [c for c in lines_all if c not in meta.sc_lines]
        cells = list(meta.sc_lines) + list(rng.choice(others, size=min(2, len(others)), replace=False))
        extra_rows += [(c, r.canonical_smiles) for c in cells]
    bulk = pd.concat([take[["cell_id", "smiles"]], pd.DataFrame(extra_rows, columns=["cell_id", "smiles"])],
                     ignore_index=True)
    compounds = pd.Index(pd.unique(pd.concat([sci.canonical_smiles, bulk.smiles]).to_numpy()))
    say(f"{len(compounds)} compounds ({len(sci)} sci-Plex3), fingerprints ...")
    fps = _fingerprints(list(compounds))
    n_sc_genes = n_lm + extra_genes
    truth = Truth(meta, p, seed, fps, n_sc_genes)

    # ---- bulk signatures (landmarks only)
    nb = len(bulk)
    ci = compounds.get_indexer(bulk.smiles)
    li = np.array([truth.lines[c] for c in bulk.cell_id])
    dose = rng.choice(LINCS_DOSES_UM, size=nb)
    tim = rng.choice(TIMES_H, size=nb)
    z = truth.lfc(ci, li, dose, tim)[:, :n_lm] * Z_PER_LOG + rng.normal(0, 1, (nb, n_lm))
    n_veh = max(1, int(round(p.vehicle_frac * p.n_bulk)))
    veh_cells = rng.choice(lines_all, size=n_veh)
    zv = rng.normal(0, 1, (n_veh, n_lm))
    z = np.clip(np.vstack([z, zv]), -10, 10).astype(np.float32)
    name_of = dict(zip(sci.canonical_smiles, sci.name, strict=False))
    pid_of = dict(zip(sci.canonical_smiles, sci.pert_id, strict=False))
    pert_id = [pid_of.get(s, _sid(s)) for s in bulk.smiles]
    sig = pd.DataFrame({
        "sig_id": [f"SIM{seed}_{i:07d}" for i in range(nb + n_veh)],
        "pert_id": pert_id + ["DMSO"] * n_veh,
        "pert_iname": [name_of.get(s, pid) for s, pid in zip(bulk.smiles, pert_id, strict=True)] + ["DMSO"] * n_veh,
        "pert_type": ["trt_cp"] * nb + ["ctl_vehicle"] * n_veh,
        "cell_id": list(bulk.cell_id) + list(veh_cells),
        "pert_idose": [_dose_str(d) for d in dose] + ["-666"] * n_veh,
        "pert_itime": [f"{t:g} h" for t in tim] + [f"{t:g} h" for t in rng.choice(TIMES_H, size=n_veh)],
    })
    say(f"bulk: {nb} treated + {n_veh} vehicle signatures x {n_lm} genes")

    # ---- single cells
    sc_genes = genes.copy()
    if extra_genes:
        sc_genes = pd.concat([sc_genes, pd.DataFrame({
            "gene_id": [f"SIMX{i:05d}" for i in range(extra_genes)],
            "gene_symbol": [f"SIMX{i:05d}" for i in range(extra_genes)],
            "ensembl_id": [f"ENSGSIMX{i:09d}" for i in range(extra_genes)]})], ignore_index=True)
    srng = np.random.default_rng([seed, 2])
    prog = np.zeros((len(SUBPOPS), n_sc_genes))
    for k in (0, 2):  # cycling and stress programs on random gene sets
        idx = srng.choice(n_sc_genes, size=60, replace=False)
        prog[k, idx] = srng.normal(0.9, 0.25, 60)
    props = srng.dirichlet([6, 3, 1.5], size=len(meta.sc_lines))
    extra_basal = srng.normal(7.0, 1.8, extra_genes)
    sci_ci = compounds.get_indexer(sci.canonical_smiles)
    obs_parts, x_parts = [], []
    truth_lfc = np.zeros((len(sci), len(meta.sc_lines), len(SC_DOSES_NM), n_sc_genes), np.float32)
    truth_props = np.zeros((len(sci), len(meta.sc_lines), len(SC_DOSES_NM), len(SUBPOPS)), np.float32)
    from scipy import sparse

    def cells(line_i: int, lfc: np.ndarray, pr: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        basal = np.concatenate([meta.basal.loc[meta.sc_lines[line_i]].to_numpy() if meta.real
                                else meta.basal.iloc[line_i].to_numpy(), extra_basal])
        logm = basal * np.log(2) * 0.6
        sub = srng.choice(len(SUBPOPS), size=n, p=pr)
        lm = logm[None] + prog[sub] + SUBPOP_RESPONSE[sub, None] * lfc[None]
        mu = np.exp(lm - np.log(np.exp(logm).sum()) + np.log(LIB_TARGET))
        mu *= srng.lognormal(0, 0.35, n)[:, None]
        # a strong effect on a highly expressed gene can push the NB mean past int32 (seen: 2 cells of the default
        # preset wrapped to negative counts -> NaN after normalisation); 1e5 UMIs of one gene is beyond any real cell
        np.minimum(mu, MU_CAP, out=mu)
        counts = srng.poisson(srng.gamma(NB_THETA, mu / NB_THETA))
        counts[srng.random(counts.shape) < DROPOUT] = 0
        return sparse.csr_matrix(counts.astype(np.int32)), sub

    for li_, line in enumerate(meta.sc_lines):
        x, sub = cells(li_, np.zeros(n_sc_genes), props[li_], p.vehicle_cells_per_line)
        x_parts.append(x)
        obs_parts.append(pd.DataFrame({"product_name": "Vehicle", "dose": 0.0, "cell_type": line, "vehicle": True,
                                       "SMILES": "", "pathway": "Vehicle", "target": "Vehicle", "sim_subpop_i": sub}))
    line_idx = np.array([truth.lines[c] for c in meta.sc_lines])
    for j, r in sci.iterrows():
        for li_, line in enumerate(meta.sc_lines):
            for di, dnm in enumerate(SC_DOSES_NM):
                c1 = np.array([sci_ci[j]])
                lfc = truth.lfc(c1, line_idx[[li_]], np.array([dnm / 1000]), np.array([24.0]))[0]
                resp = truth.response(c1, line_idx[[li_]], np.array([dnm / 1000]), np.array([24.0]))[0]
                pr = props[li_].copy()
                if truth.antiprolif[truth.cls[sci_ci[j]]]:
                    pr[0] *= max(0.05, 1 - 0.9 * min(resp, 1.0))
                    pr /= pr.sum()
                truth_props[j, li_, di] = pr
                truth_lfc[j, li_, di] = (pr @ (prog + SUBPOP_RESPONSE[:, None] * lfc[None])) - props[li_] @ prog
                x, sub = cells(li_, lfc, pr, p.cells_per_condition)
                x_parts.append(x)
                obs_parts.append(pd.DataFrame({"product_name": r["name"], "dose": float(dnm), "cell_type": line,
                                               "vehicle": False, "SMILES": r.smiles, "pathway": r.pathway,
                                               "target": r.target, "sim_subpop_i": sub}))
        if progress and (j + 1) % 50 == 0:
            say(f"single cells: {j + 1}/{len(sci)} compounds")
    import anndata as ad

    obs = pd.concat(obs_parts, ignore_index=True)
    obs["sim_subpop"] = pd.Categorical(np.array(SUBPOPS)[obs.pop("sim_subpop_i")], categories=SUBPOPS)
    obs["replicate"] = np.where(np.arange(len(obs)) % 2 == 0, "rep1", "rep2")
    obs["time_point"] = 24
    obs.index = [f"simcell{i:07d}" for i in range(len(obs))]
    for c in ("product_name", "cell_type", "pathway", "target"):
        obs[c] = obs[c].astype("category")
    var = pd.DataFrame({"gene_short_name": sc_genes.gene_symbol.values, "entrez_id": sc_genes.gene_id.values},
                       index=pd.Index(sc_genes.ensembl_id.values))
    X = sparse.vstack(x_parts, format="csr")
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["scpert_simulation"] = {"semi_synthetic": True, "metadata": meta.description, "preset": preset,
                                      "seed": int(seed)}
    adata.uns["semi_synthetic"] = True  # top-level flag: the sci-Plex3 reader carries it into uns['scpert']
    say(f"single cells: {adata.n_obs} cells x {adata.n_vars} genes")

    # ---- write
    for sub_ in ("bulk", "sciplex", "truth"):
        ensure_writable_dir(out / sub_)
    label = ("SEMI-SYNTHETIC data from the scpert-dist simulator (hidden ground truth; not real measurements). "
             f"Metadata: {meta.description}. Preset {preset}, seed {seed}.\n")
    _write_gctx(out / "bulk" / "lincs_level5.gctx", z, genes, sig)
    _write_text(out / "bulk" / "siginfo.txt", sig.to_csv(sep="\t", index=False))
    _write_text(out / "bulk" / "geneinfo.txt", pd.DataFrame({"pr_gene_id": genes.gene_id, "pr_gene_symbol":
                                                              genes.gene_symbol, "pr_is_lm": 1}).to_csv(sep="\t", index=False))
    comp = pd.DataFrame({"pert_id": pert_id, "pert_iname": sig.pert_iname[:nb].values, "canonical_smiles": bulk.smiles})
    comp = pd.concat([comp, pd.DataFrame({"pert_id": sci.pert_id, "pert_iname": sci.name,
                                          "canonical_smiles": sci.canonical_smiles})]).drop_duplicates("pert_id")
    _write_text(out / "bulk" / "compounds.txt", comp.to_csv(sep="\t", index=False))
    _write_text(out / "bulk" / "SEMI_SYNTHETIC.txt", label)
    _atomic_dir_file(out / "sciplex" / "sciplex3_sim.h5ad", lambda q: adata.write_h5ad(q, compression="lzf"))
    _atomic_dir_file(out / "truth" / "sciplex_truth.npz", lambda q: open(q, "wb").write(_npz_bytes(
        lfc=truth_lfc, props=truth_props, drugs=sci.name.to_numpy(str), lines=np.array(meta.sc_lines),
        doses_nm=np.array(SC_DOSES_NM), genes=sc_genes.ensembl_id.to_numpy(str),
        subpops=np.array(SUBPOPS), subpop_response=SUBPOP_RESPONSE)))
    _atomic_dir_file(out / "truth" / "compound_effects.npz", lambda q: open(q, "wb").write(_npz_bytes(
        smiles=compounds.to_numpy(str), effect=truth.effect[:, :n_lm].astype(np.float32),
        mech_class=truth.cls, inactive=truth.inactive, ec50_um=truth.ec50, hill=truth.hill)))
    _write_text(out / "truth" / "README.txt", label + "sciplex_truth.npz: lfc[drug, line, dose, gene] = true mean "
                "log-fold change vs vehicle (natural log, population incl. sub-population shifts), props = sub-population "
                "proportions. compound_effects.npz: full-response effect per compound (landmarks), mechanism class.\n")
    tcomp = sci[["name", "pert_id", "canonical_smiles", "pathway", "target", "in_lincs", "ood"]].copy()
    tcomp["mech_class"] = truth.cls[sci_ci]
    tcomp["inactive"] = truth.inactive[sci_ci]
    tcomp["antiproliferative"] = truth.antiprolif[tcomp.mech_class]
    _atomic_dir_file(out / "truth" / "sciplex_compounds.parquet", lambda q: tcomp.to_parquet(q, index=False))
    summary = {
        "label": "semi-synthetic", "semi_synthetic": True, "metadata": meta.description, "preset": preset,
        "preset_config": asdict(p), "seed": int(seed), "extra_genes": int(extra_genes),
        "n_bulk_signatures": int(nb + n_veh), "n_bulk_treated": int(nb), "n_bulk_vehicle": int(n_veh),
        "n_bulk_compounds": int(len(set(bulk.smiles))), "n_genes_bulk": int(n_lm),
        "n_cells": int(adata.n_obs), "n_genes_sc": int(adata.n_vars), "n_sci_compounds": int(len(sci)),
        "sc_cell_lines": list(meta.sc_lines), "ood_drugs": sci.name[sci.ood].tolist(),
        "seconds": round(time.time() - t0, 2),
        "files": ["bulk/lincs_level5.gctx", "bulk/siginfo.txt", "bulk/geneinfo.txt", "bulk/compounds.txt",
                  "bulk/SEMI_SYNTHETIC.txt", "sciplex/sciplex3_sim.h5ad", "truth/sciplex_truth.npz",
                  "truth/compound_effects.npz", "truth/sciplex_compounds.parquet"],
    }
    _write_text(out / "SIMULATION.json", json.dumps(summary, indent=2))
    say(f"done: {out}")
    return summary


def _npz_bytes(**arrays) -> bytes:
    import io

    b = io.BytesIO()
    np.savez_compressed(b, **arrays)
    return b.getvalue()


__all__ = ["PRESETS", "SimPreset", "Truth", "simulate"]
