"""Semi-synthetic default dataset: a hidden ground truth on real metadata, written as LINCS-shaped GCTX + tables
and a sci-Plex3-shaped h5ad (raw counts), so the demo runs through the real ingestion path.

Hidden truth (truth.py): mechanism programs (real sci-Plex3 targets; analogs share a mechanism with a probability
that rises with their atom-pair similarity) + a topological-torsion network term + a compound-specific term + a generic
per-line response; per (cell line x mechanism) sensitivity; Hill dose-response (EC50 log-normal around 1 uM); time
factor (6 h = 0.6 of 24 h). Bulk z = effect with 40% of the generic response * Z_PER_LOG + noise (clipped +-10). Single
cells (noise.py): basal profile of the line + sub-population program + sub-population-scaled effect; negative-binomial
counts ('deep' or real-calibrated per-line noise); anti-proliferative mechanisms deplete cycling cells with dose.

Where the truth is: truth/sciplex_truth.npz (lfc[drug, line, dose, gene], the true mean log-fold change of every
single-cell condition), truth/compound_effects.npz, truth/sciplex_compounds.parquet; the h5ad's uns['scpert_simulation']
names the folder layout and obs['sim_subpop'] holds each cell's sub-population.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from ...errors import ConfigError
from ...paths import ensure_writable_dir
from ...registry import Registry
from ..drugs import canonical_smiles, morgan_fingerprints
from ..readers.compounds import name_keys
from .metadata import SC_DOSES_NM, SimMetadata, load_metadata
from .noise import noise_for, sample_counts
from .truth import BULK_GENERIC, CalibratedTruth, LegacyTruth


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
    noise: str = "deep"
    """single-cell noise model (noise.py): 'deep' (4,000 UMIs over the simulated genes) or 'calibrated' (per-line
    library size, depth and NB dispersion fitted to real sci-Plex3 cells)."""
    truth: str = "calibrated"
    """hidden truth (truth.py): 'calibrated' (mechanisms from real targets + analog similarity; no Morgan bits) or
    'legacy' (a linear function of the Morgan bits, before 2026-11-30)."""


PRESETS = Registry("simulated data set", "preset", {
    "tiny": SimPreset(n_bulk=800, n_sci_compounds=24, cells_per_condition=6, vehicle_cells_per_line=200),
    "default": SimPreset(n_bulk=16000, n_sci_compounds=None, cells_per_condition=8, vehicle_cells_per_line=600),
    "large": SimPreset(n_bulk=60000, n_sci_compounds=None, cells_per_condition=40, vehicle_cells_per_line=3000),
    "bench": SimPreset(n_bulk=16000, n_sci_compounds=None, cells_per_condition=200, vehicle_cells_per_line=2500,
                       noise="calibrated"),
    "calib": SimPreset(n_bulk=5000, n_sci_compounds=16, cells_per_condition=200, vehicle_cells_per_line=2500,
                       noise="calibrated"),
    "scperturb": SimPreset(n_bulk=2000, n_sci_compounds=None, cells_per_condition=25, vehicle_cells_per_line=300,
                           noise="calibrated"),
})
"""The simulated data sets by name (the data sources a sweep's `data.simulate`, the headline's `data.preset` and
`scpert data simulate --preset` name). bench: all 188 compounds, 200 cells per condition (real sci-Plex3: ~650,000
cells over ~2,300 conditions) with the real-calibrated noise. calib: what `scpert data calibrate` simulates (16 compounds incl. the 9 with real pseudobulk).
scperturb: all 188 compounds, 25 cells per condition (300 per compound), the calibrated noise: the single-cell side
`scpert data calibrate` compares with scPerturb's 188 x 188 tables (the same truth and noise model as bench)."""

LINCS_DOSES_UM = np.array([0.04, 0.12, 0.37, 1.11, 3.33, 10.0])
TIMES_H = np.array([6.0, 24.0])
Z_PER_LOG = 4.0
"""bulk z units per natural-log unit of the hidden effect."""
SUBPOPS = ["cycling", "quiescent", "stressed"]
SUBPOP_RESPONSE = np.array([2.0, 1.0, 0.15])
"""cycling cells respond with 2x the effect, stressed cells barely."""


def _dose_str(um: float) -> str:
    return f"{um * 1000:g} nM" if um < 1 else f"{um:g} uM"


def _sid(smiles: str) -> str:
    return "SIM-" + hashlib.sha1(smiles.encode()).hexdigest()[:10].upper()


def _fingerprints(smiles: list[str]) -> np.ndarray:
    return np.asarray(morgan_fingerprints(smiles, radius=2, n_bits=1024)).astype(bool)


def atomic_dir_file(path: Path, writer) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    writer(tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    atomic_dir_file(path, lambda p: p.write_text(text))


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


def make_truth(kind: str, meta: SimMetadata, seed: int, compounds: list[str], n_genes: int, sci: pd.DataFrame,
               preset: SimPreset, potent: set[str] = frozenset()):
    """The hidden truth of `kind` ('calibrated' or 'legacy') over `compounds` (canonical SMILES)."""
    lines = list(meta.basal.index)
    if kind == "legacy":
        return LegacyTruth(lines, seed, _fingerprints(compounds), n_genes, preset.n_classes, preset.rank)
    if kind != "calibrated":
        raise ConfigError(f"unknown truth {kind!r}", field="truth", hint="'calibrated' or 'legacy'")
    targets = dict(zip(sci.canonical_smiles, sci.target.astype(str), strict=False))
    return CalibratedTruth(lines, seed, compounds, n_genes, targets=targets, potent=potent)


RESPONDERS = "sciplex/sciplex3_maxdose_deg_ranklists_sigrecon.parquet"
"""real sci-Plex3 DESeq2 results: the 23 compounds with >= 5 up-regulated genes in all three lines at the top dose."""


def real_responders(metadata: Path | None, sci: pd.DataFrame) -> set[str]:
    """Canonical SMILES of the sci-Plex3 compounds real DESeq2 calls strong responders (empty without the file)."""
    if metadata is None or not (Path(metadata) / RESPONDERS).is_file():
        return set()

    names = pd.read_parquet(Path(metadata) / RESPONDERS, columns=["product_name"]).product_name.unique()
    keys = {k for n in names for k in name_keys(n)}
    return {s for n, s in zip(sci.name, sci.canonical_smiles, strict=True) if keys & set(name_keys(n))}


def _choose_sci(meta: SimMetadata, p: SimPreset, rng: np.random.Generator, include=()) -> pd.DataFrame:
    """The sci-Plex3 compounds of the preset: all, or the chemCPA OOD drugs + `include` (names) + a random rest."""
    sci = meta.sciplex.copy()
    if p.n_sci_compounds is not None and p.n_sci_compounds < len(sci):
        want = {k for n in include for k in name_keys(n)}
        keep = set(sci.index[sci.ood]) | {i for i, n in zip(sci.index, sci.name, strict=True)
                                          if want & set(name_keys(n))}
        rest = [i for i in rng.permutation(sci.index) if i not in keep]
        keep |= set(rest[: max(0, p.n_sci_compounds - len(keep))])
        sci = sci.loc[sorted(keep)].reset_index(drop=True)
    sci["canonical_smiles"] = [canonical_smiles(s) for s in sci.smiles]
    return sci


SC_LINE_COVERAGE = (0.85, 0.88, 0.15)
"""P(LINCS measured an in-LINCS sci-Plex3 compound in A549 / MCF7 / K562): 133, 138 and 23 of the 157 in the real
LINCS 2020 index (sciplex3_compounds_with_lincs_overlap.csv)."""


def _bulk_design(meta: SimMetadata, p: SimPreset, rng: np.random.Generator, sci: pd.DataFrame) -> pd.DataFrame:
    """A sample of the real (cell, compound) pairs + the sci-Plex3 compounds LINCS measured: each sc line with the
    real coverage (SC_LINE_COVERAGE; at least one) + 2 other lines."""
    bd = meta.bulk_design
    take = bd.iloc[np.sort(rng.choice(len(bd), size=min(p.n_bulk, len(bd)), replace=False))]
    extra_rows = []
    lines_all = list(meta.basal.index)
    cover = np.resize(np.asarray(SC_LINE_COVERAGE), len(meta.sc_lines))
    for _, r in sci[sci.in_lincs].iterrows():
        others = [c for c in lines_all if c not in meta.sc_lines]
        hit = rng.random(len(cover)) < cover
        if not hit.any():
            hit[int(np.argmax(cover))] = True
        cells = [c for c, h in zip(meta.sc_lines, hit, strict=True) if h]
        cells += list(rng.choice(others, size=min(2, len(others)), replace=False))
        extra_rows += [(c, r.canonical_smiles) for c in cells]
    return pd.concat([take[["cell_id", "smiles"]], pd.DataFrame(extra_rows, columns=["cell_id", "smiles"])],
                     ignore_index=True)


def _bulk_signatures(truth, meta: SimMetadata, p: SimPreset, rng: np.random.Generator, bulk: pd.DataFrame,
                     compounds: pd.Index, sci: pd.DataFrame, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Level-5-like z-scores (landmarks) of the bulk design + vehicle signatures, and their sig_info table."""
    n_lm = len(meta.genes)
    nb = len(bulk)
    ci = compounds.get_indexer(bulk.smiles)
    li = np.array([truth.lines[c] for c in bulk.cell_id])
    dose = rng.choice(LINCS_DOSES_UM, size=nb)
    tim = rng.choice(TIMES_H, size=nb)
    z = np.vstack([truth.lfc(ci[a:a + 4096], li[a:a + 4096], dose[a:a + 4096], tim[a:a + 4096],
                             generic=BULK_GENERIC)[:, :n_lm] for a in range(0, nb, 4096)]) * Z_PER_LOG
    z += rng.normal(0, 1, (nb, n_lm))
    n_veh = max(1, int(round(p.vehicle_frac * p.n_bulk)))
    veh_cells = rng.choice(list(meta.basal.index), size=n_veh)
    z = np.clip(np.vstack([z, rng.normal(0, 1, (n_veh, n_lm))]), -10, 10).astype(np.float32)
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
    return z, sig


class _CellSampler:
    """Cells of one line: basal level + sub-population program + sub-population-scaled effect -> NB counts."""

    def __init__(self, meta: SimMetadata, noise: str, seed: int, n_genes: int, extra_genes: int):
        self.rng = np.random.default_rng([seed, 2])
        self.prog = np.zeros((len(SUBPOPS), n_genes))
        for k in (0, 2):  # cycling and stress programs on random gene sets
            idx = self.rng.choice(n_genes, size=60, replace=False)
            self.prog[k, idx] = self.rng.normal(0.9, 0.25, 60)
        self.props = self.rng.dirichlet([6, 3, 1.5], size=len(meta.sc_lines))
        extra_basal = self.rng.normal(7.0, 1.8, extra_genes)
        self.level, self.noise = [], []
        for i, line in enumerate(meta.sc_lines):
            b = meta.basal.loc[line].to_numpy() if meta.real else meta.basal.iloc[i].to_numpy()
            self.level.append(np.concatenate([b, extra_basal]) * np.log(2))
            self.noise.append(noise_for(noise, line))

    def __call__(self, line_i: int, lfc: np.ndarray, pr: np.ndarray, n: int):
        sub = self.rng.choice(len(SUBPOPS), size=n, p=pr)
        shift = self.prog[sub] + SUBPOP_RESPONSE[sub, None] * lfc[None]
        counts, lib = sample_counts(self.rng, self.level[line_i], shift, self.noise[line_i])
        return sparse.csr_matrix(counts.astype(np.int32)), sub, np.round(lib)


def _single_cells(truth, meta: SimMetadata, p: SimPreset, sci: pd.DataFrame, compounds: pd.Index, seed: int,
                  n_genes: int, extra_genes: int, say) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Vehicle and treated cells of every (compound, line, dose); the true population logFC and proportions."""
    cells = _CellSampler(meta, p.noise, seed, n_genes, extra_genes)
    sci_ci = compounds.get_indexer(sci.canonical_smiles)
    obs_parts, x_parts = [], []
    truth_lfc = np.zeros((len(sci), len(meta.sc_lines), len(SC_DOSES_NM), n_genes), np.float32)
    truth_props = np.zeros((len(sci), len(meta.sc_lines), len(SC_DOSES_NM), len(SUBPOPS)), np.float32)

    def add(x, sub, lib, **cols):
        x_parts.append(x)
        obs_parts.append(pd.DataFrame({**cols, "n_counts": lib.astype(np.float32), "sim_subpop_i": sub}))

    for li_, line in enumerate(meta.sc_lines):
        add(*cells(li_, np.zeros(n_genes), cells.props[li_], p.vehicle_cells_per_line), product_name="Vehicle",
            dose=0.0, cell_type=line, vehicle=True, SMILES="", pathway="Vehicle", target="Vehicle")
    line_idx = np.array([truth.lines[c] for c in meta.sc_lines])
    for j, r in sci.iterrows():
        c1 = np.array([sci_ci[j]])
        for li_, line in enumerate(meta.sc_lines):
            for di, dnm in enumerate(SC_DOSES_NM):
                args = (c1, line_idx[[li_]], np.array([dnm / 1000]), np.array([24.0]))
                lfc, resp = truth.lfc(*args)[0], truth.response(*args)[0]
                pr = cells.props[li_].copy()
                if truth.antiprolif[truth.cls[sci_ci[j]]]:
                    pr[0] *= max(0.05, 1 - 0.9 * min(resp, 1.0))
                    pr /= pr.sum()
                truth_props[j, li_, di] = pr
                truth_lfc[j, li_, di] = (pr @ (cells.prog + SUBPOP_RESPONSE[:, None] * lfc[None])
                                         - cells.props[li_] @ cells.prog)
                add(*cells(li_, lfc, pr, p.cells_per_condition), product_name=r["name"], dose=float(dnm),
                    cell_type=line, vehicle=False, SMILES=r.smiles, pathway=r.pathway, target=r.target)
        if (j + 1) % 50 == 0:
            say(f"single cells: {j + 1}/{len(sci)} compounds")
    return obs_parts, x_parts, truth_lfc, truth_props


def _anndata(obs_parts, x_parts, sc_genes: pd.DataFrame, meta: SimMetadata, preset: str, seed: int, noise: str):
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
    adata = ad.AnnData(X=sparse.vstack(x_parts, format="csr"), obs=obs, var=var)
    adata.uns["scpert_simulation"] = {
        "semi_synthetic": True, "metadata": meta.description, "preset": preset, "seed": int(seed), "noise": noise,
        "truth_files": "truth/sciplex_truth.npz (lfc[drug, line, dose, gene]: true mean log-fold change per "
                       "condition), truth/compound_effects.npz, truth/sciplex_compounds.parquet (beside sciplex/)",
        "n_counts": "obs n_counts = the cell's total UMIs over all genes; X holds the simulated genes' share"}
    adata.uns["semi_synthetic"] = True  # top-level flag: the sci-Plex3 reader carries it into uns['scpert']
    return adata


def _sc_genes(genes: pd.DataFrame, extra_genes: int) -> pd.DataFrame:
    if not extra_genes:
        return genes.copy()
    ids = [f"SIMX{i:05d}" for i in range(extra_genes)]
    return pd.concat([genes, pd.DataFrame({"gene_id": ids, "gene_symbol": ids,
                                           "ensembl_id": [f"ENSGSIMX{i:09d}" for i in range(extra_genes)]})],
                     ignore_index=True)


def simulate(out_dir: str | os.PathLike, preset: str = "default", metadata: str | os.PathLike | None = None,
             seed: int = 0, extra_genes: int = 200, progress: bool = True, include=(),
             truth: str | None = None) -> dict:
    """Simulate the semi-synthetic dataset into `out_dir`; returns the SIMULATION.json content.
    `include`: sci-Plex3 compound names always kept by presets that sample compounds; `truth`: override the
    preset's truth ('calibrated' | 'legacy')."""
    PRESETS.check(preset)
    if extra_genes < 0:
        raise ConfigError("extra_genes must be >= 0", field="extra_genes", hint="e.g. 200")
    p = PRESETS[preset]
    if truth is not None:
        p = replace(p, truth=truth)
    if p.truth not in ("calibrated", "legacy"):
        raise ConfigError(f"unknown truth {p.truth!r}", field="truth", hint="'calibrated' or 'legacy'")
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
    sci = _choose_sci(meta, p, rng, include)
    bulk = _bulk_design(meta, p, rng, sci)
    compounds = pd.Index(pd.unique(pd.concat([sci.canonical_smiles, bulk.smiles]).to_numpy()))
    say(f"{len(compounds)} compounds ({len(sci)} sci-Plex3), {p.truth} truth ...")
    n_sc_genes = len(meta.genes) + extra_genes
    tr = make_truth(p.truth, meta, seed, list(compounds), n_sc_genes, sci, p, real_responders(metadata, sci))
    z, sig = _bulk_signatures(tr, meta, p, rng, bulk, compounds, sci, seed)
    say(f"bulk: {len(bulk)} treated + {len(sig) - len(bulk)} vehicle signatures x {len(meta.genes)} genes")
    sc_genes = _sc_genes(meta.genes, extra_genes)
    obs_parts, x_parts, truth_lfc, truth_props = _single_cells(tr, meta, p, sci, compounds, seed, n_sc_genes,
                                                               extra_genes, say)
    adata = _anndata(obs_parts, x_parts, sc_genes, meta, preset, seed, p.noise)
    say(f"single cells: {adata.n_obs} cells x {adata.n_vars} genes ({p.noise} noise)")
    _write_all(out, tr, meta, p, preset, seed, sci, bulk, compounds, z, sig, adata, sc_genes, truth_lfc, truth_props)
    summary = {
        "label": "semi-synthetic", "semi_synthetic": True, "metadata": meta.description, "preset": preset,
        "preset_config": asdict(p), "seed": int(seed), "extra_genes": int(extra_genes),
        "n_bulk_signatures": int(len(sig)), "n_bulk_treated": int(len(bulk)), "n_bulk_vehicle": int(len(sig) - len(bulk)),
        "n_bulk_compounds": int(len(set(bulk.smiles))), "n_genes_bulk": int(len(meta.genes)),
        "n_cells": int(adata.n_obs), "n_genes_sc": int(adata.n_vars), "n_sci_compounds": int(len(sci)),
        "sc_cell_lines": list(meta.sc_lines), "ood_drugs": sci.name[sci.ood].tolist(),
        "seconds": round(time.time() - t0, 2), "files": OUTPUT_FILES,
    }
    _write_text(out / "SIMULATION.json", json.dumps(summary, indent=2))
    say(f"done: {out}")
    return summary


OUTPUT_FILES = ["bulk/lincs_level5.gctx", "bulk/siginfo.txt", "bulk/geneinfo.txt", "bulk/compounds.txt",
                "bulk/SEMI_SYNTHETIC.txt", "sciplex/sciplex3_sim.h5ad", "truth/sciplex_truth.npz",
                "truth/compound_effects.npz", "truth/sciplex_compounds.parquet"]


def _write_all(out: Path, tr, meta, p, preset, seed, sci, bulk, compounds, z, sig, adata, sc_genes, truth_lfc,
               truth_props) -> None:
    genes, n_lm, nb = meta.genes, len(meta.genes), len(bulk)
    for sub_ in ("bulk", "sciplex", "truth"):
        ensure_writable_dir(out / sub_)
    label = ("SEMI-SYNTHETIC data from the scpert-dist simulator (hidden ground truth; not real measurements). "
             f"Metadata: {meta.description}. Preset {preset}, seed {seed}.\n")
    _write_gctx(out / "bulk" / "lincs_level5.gctx", z, genes, sig)
    _write_text(out / "bulk" / "siginfo.txt", sig.to_csv(sep="\t", index=False))
    _write_text(out / "bulk" / "geneinfo.txt", pd.DataFrame({"pr_gene_id": genes.gene_id, "pr_gene_symbol":
                                                              genes.gene_symbol, "pr_is_lm": 1}).to_csv(sep="\t", index=False))
    comp = pd.DataFrame({"pert_id": sig.pert_id[:nb].values, "pert_iname": sig.pert_iname[:nb].values,
                         "canonical_smiles": bulk.smiles})
    comp = pd.concat([comp, pd.DataFrame({"pert_id": sci.pert_id, "pert_iname": sci.name,
                                          "canonical_smiles": sci.canonical_smiles})]).drop_duplicates("pert_id")
    _write_text(out / "bulk" / "compounds.txt", comp.to_csv(sep="\t", index=False))
    _write_text(out / "bulk" / "SEMI_SYNTHETIC.txt", label)
    atomic_dir_file(out / "sciplex" / "sciplex3_sim.h5ad", lambda q: adata.write_h5ad(q, compression="lzf"))
    atomic_dir_file(out / "truth" / "sciplex_truth.npz", lambda q: open(q, "wb").write(_npz_bytes(
        lfc=truth_lfc, props=truth_props, drugs=sci.name.to_numpy(str), lines=np.array(meta.sc_lines),
        doses_nm=np.array(SC_DOSES_NM), genes=sc_genes.ensembl_id.to_numpy(str),
        subpops=np.array(SUBPOPS), subpop_response=SUBPOP_RESPONSE)))
    mech_names = np.array(getattr(tr, "mech_names", [f"class{i}" for i in range(len(tr.antiprolif))]))
    atomic_dir_file(out / "truth" / "compound_effects.npz", lambda q: open(q, "wb").write(_npz_bytes(
        smiles=compounds.to_numpy(str), effect=tr.effect[:, :n_lm].astype(np.float32),
        mech_class=tr.cls, mech_names=mech_names, inactive=tr.inactive, ec50_um=tr.ec50, hill=tr.hill)))
    _write_text(out / "truth" / "README.txt", label + "sciplex_truth.npz: lfc[drug, line, dose, gene] = true mean "
                "log-fold change vs vehicle (natural log of mean counts, population incl. sub-population shifts), "
                "props = sub-population proportions. compound_effects.npz: line-independent part of the full "
                f"response per compound (landmarks), mechanism per compound ({p.truth} truth).\n")
    sci_ci = compounds.get_indexer(sci.canonical_smiles)
    tcomp = sci[["name", "pert_id", "canonical_smiles", "pathway", "target", "in_lincs", "ood"]].copy()
    tcomp["mech_class"] = tr.cls[sci_ci]
    tcomp["mechanism"] = mech_names[tr.cls[sci_ci]]
    tcomp["inactive"] = tr.inactive[sci_ci]
    tcomp["antiproliferative"] = tr.antiprolif[tcomp.mech_class]
    atomic_dir_file(out / "truth" / "sciplex_compounds.parquet", lambda q: tcomp.to_parquet(q, index=False))

def _npz_bytes(**arrays) -> bytes:
    import io

    b = io.BytesIO()
    np.savez_compressed(b, **arrays)
    return b.getvalue()


__all__ = ["PRESETS", "SimPreset", "make_truth", "simulate"]
