"""The simulator against the real files, side by side (`scpert data calibrate`).

Measured on both sides with the same code:
- single cells (per line, landmark genes both hold; `sciplex.cell_stats`): library size, genes detected, zero
  fraction, mean-variance slope, median CV^2. Real: the 2,247 real sci-Plex3 cells (only cell_type is a true label).
- responses (the 9 drugs of the real pseudobulk, 10 uM, 24 h, three lines; logFC = treated - vehicle pseudobulk of
  mean log-normalised expression, landmark genes): correlation of logFC within a mechanism (HDAC, HSP90, Aurora
  inhibitors; same line), between mechanisms (same line), of the same drug across lines; |logFC| quantiles and the
  share of genes with |logFC| > 0.2, in units of the data set's mean non-zero log-normalised value (the real file's
  normalisation has another scale than log1p(CP10k)).
- bulk (one real L1000 plate, A375, 6 h, ~354 compounds, level 4): signature Pearson r vs Morgan Tanimoto of the two
  compounds; the simulated side uses the simulated level-5 signatures of one cell line at >= 1.11 uM.
- scPerturb (scPerturb's real 189 x 189 sci-Plex3 tables: E-distances and pseudobulk correlations between all 188
  compounds and control, cells pooled per compound): the share of compounds with an effect, the shape of the
  E-distance-to-control distribution, the distribution of pairwise response correlations; the simulated side is a
  simulation of all 188 compounds (preset `scperturb`) pooled and summarised the same way (simulate/scperturb.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ... import schema as S
from ...errors import ConfigError, InputFileError
from ...paths import ensure_writable_dir
from ..drugs import canonical_smiles, is_valid_smiles, morgan_fingerprints, tanimoto
from ..readers.compounds import brd_smiles, name_keys
from ..readers.l1000 import read_l1000
from ..readers.pseudobulk import CONTROL, TREATED, read_profiles
from ..readers.sciplex import cell_stats, read_sciplex
from ..readers.scperturb import read_scperturb_table
from .scperturb import sim_tables, table_stats

REAL_CELLS = "sciplex/real/sciplex3_chemcpa_format_n2247x2000_SHUFFLED_LABELS.h5ad"
REAL_PSEUDOBULK = "sciplex/real/sciplex3_native_ood_pseudobulk_9drugs_x3lines_2000genes.parquet"
REAL_PLATE = "lincs/plates/CPC006_A375_6H_X1/gctv13_01_zs.gctx"
REAL_EDIST = "sciplex/real/scperturb/pairwise_edist_SrivatsanTrapnell2020_sciplex3.csv"
REAL_PBCORR = "sciplex/real/scperturb/pseudobulk_correlations_SrivatsanTrapnell2020_sciplex3_tables.csv"
SCPERTURB_PRESET = "scperturb"
PSEUDOBULK_DRUGS = ("Alvespimycin", "Belinostat", "Dacinostat", "Flavopiridol", "Givinostat", "Hesperadin",
                    "Quisinostat", "TAK-901", "Tanespimycin")
MECHANISMS = {"HDAC": ("Belinostat", "Dacinostat", "Givinostat", "Quisinostat"),
              "HSP90": ("Alvespimycin", "Tanespimycin"), "Aurora": ("Hesperadin", "TAK-901")}
"""the real drugs' mechanisms (Selleck targets) as the staging notes of the pseudobulk file group them."""
TANIMOTO_BINS = (0.0, 0.2, 0.3, 0.45, 1.01)
LFC_MOVED = 0.2
SIM_DOSE_NM = 10000.0


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputFileError(f"{what} not found", path=str(path),
                             hint="pass --metadata: the public data folder (see SOURCES.md) with the real files")
    return path


# ------------------------------------------------------------------------------------------ response statistics
@dataclass
class Responses:
    """logFC [n, genes] per (drug, cell_line) row of `keys`; `unit`: the data set's mean non-zero log-normalised
    value in single cells (the two normalisations differ in scale, so sizes are compared in these units)."""

    keys: pd.DataFrame
    lfc: np.ndarray
    unit: float = 1.0


def _pair_mean(r: np.ndarray, mask: np.ndarray) -> float:
    iu = np.triu_indices(len(r), 1)
    m = mask[iu]
    return float(r[iu][m].mean()) if m.any() else float("nan")


def response_stats(resp: Responses) -> dict[str, float]:
    """Within-mechanism (per mechanism), between-mechanism and same-drug-across-lines mean Pearson r of logFC;
    |logFC| quantiles; median share of genes moved by > LFC_MOVED."""
    r = np.corrcoef(resp.lfc)
    drug, line = resp.keys["drug"].to_numpy(), resp.keys["cell_line"].to_numpy()
    mech = np.array([next((m for m, ds in MECHANISMS.items() if d in ds), f"own:{d}") for d in drug])
    same_line = line[:, None] == line[None]
    out = {}
    for m in MECHANISMS:
        sel = (mech[:, None] == m) & (mech[None] == m) & same_line & (drug[:, None] != drug[None])
        out[f"r within {m}"] = _pair_mean(r, sel)
    out["r between mechanisms"] = _pair_mean(r, same_line & (mech[:, None] != mech[None]))
    out["r same drug across lines"] = _pair_mean(r, (drug[:, None] == drug[None]) & ~same_line)
    a = np.abs(resp.lfc) / resp.unit
    for q in (50, 99):
        out[f"abs logFC p{q} (units)"] = float(np.percentile(a, q))
    out["abs logFC p99 / p50"] = out["abs logFC p99 (units)"] / out["abs logFC p50 (units)"]
    out[f"genes with abs logFC > {LFC_MOVED:g} units (share)"] = float(np.median((a > LFC_MOVED).mean(1)))
    return out


def nonzero_unit(X) -> float:
    """Mean non-zero value of a (sparse or dense) log-normalised matrix."""
    v = X.data if hasattr(X, "data") and not isinstance(X, np.ndarray) else np.asarray(X)[np.asarray(X) != 0]
    return float(np.mean(v))


def real_responses(metadata: Path, genes: list[str] | None = None, unit: float = 1.0) -> Responses:
    """Real logFC of the 9 drugs x 3 lines (treated - vehicle pseudobulk), on `genes` (symbols) when given."""
    p = read_profiles(_need(metadata / REAL_PSEUDOBULK, "real pseudobulk table"))
    t, c = p.select(TREATED), p.select(CONTROL)
    ck = {(d, ln): i for i, (d, ln) in enumerate(zip(c.keys.drug, c.keys.cell_line, strict=True))}
    lfc = np.stack([t.values[i] - c.values[ck[d, ln]] for i, (d, ln) in
                    enumerate(zip(t.keys.drug, t.keys.cell_line, strict=True))])
    if genes is not None:
        col = {g: i for i, g in enumerate(p.genes)}
        lfc = lfc[:, [col[g] for g in genes if g in col]]
    return Responses(t.keys[["drug", "cell_line"]].reset_index(drop=True), lfc, unit)


def _real_name(sim_name: str) -> str | None:
    keys = set(name_keys(sim_name))
    return next((d for d in PSEUDOBULK_DRUGS if set(name_keys(d)) & keys), None)


def sim_responses(sim_adata) -> Responses:
    """Simulated logFC of the pseudobulk drugs at 10 uM: mean log-normalised expression of treated minus vehicle
    cells per line (a read_sciplex AnnData)."""
    o = sim_adata.obs
    ctl, dose = o[S.OBS_CONTROL].to_numpy(bool), o[S.OBS_DOSE].to_numpy(float)
    real_of = {d: _real_name(d) for d in o[S.OBS_DRUG].astype(str).unique()}
    keep = ctl | (np.isclose(dose, SIM_DOSE_NM / 1000) & o[S.OBS_DRUG].astype(str).map(real_of).notna().to_numpy())
    o, X = o[keep], S.dense(sim_adata.X[np.flatnonzero(keep)])  # only the rows used: the bench preset is large
    line, ctl = o[S.OBS_CELL_LINE].astype(str).to_numpy(), o[S.OBS_CONTROL].to_numpy(bool)
    drug, dose = o[S.OBS_DRUG].astype(str).to_numpy(), o[S.OBS_DOSE].to_numpy(float)
    rows, lfc = [], []
    for d in sorted(set(drug[~ctl])):
        real = real_of[d]
        if real is None:
            continue
        for ln in sorted(set(line)):
            m = (drug == d) & (line == ln) & np.isclose(dose, SIM_DOSE_NM / 1000)
            if m.any():
                rows.append((real, ln))
                lfc.append(X[m].mean(0) - X[ctl & (line == ln)].mean(0))
    return Responses(pd.DataFrame(rows, columns=["drug", "cell_line"]), np.asarray(lfc), nonzero_unit(X[ctl]))


# ------------------------------------------------------------------------------------------ bulk: r vs Tanimoto
def tanimoto_curve(values: np.ndarray, smiles: list[str], groups: np.ndarray | None = None) -> pd.DataFrame:
    """Mean Pearson r of signature pairs (distinct compounds, same group) per Morgan Tanimoto bin."""
    ok = np.array([is_valid_smiles(s) for s in smiles])
    values, smiles = values[ok], [s for s, k in zip(smiles, ok, strict=True) if k]
    groups = np.zeros(len(smiles)) if groups is None else np.asarray(groups)[ok]
    fp = morgan_fingerprints(smiles)
    t, r = tanimoto(fp, fp), np.corrcoef(values)
    iu = np.triu_indices(len(smiles), 1)
    keep = (groups[:, None] == groups[None])[iu] & (np.array(smiles)[:, None] != np.array(smiles)[None])[iu]
    tt, rr = t[iu][keep], r[iu][keep]
    rows = []
    for lo, hi in zip(TANIMOTO_BINS[:-1], TANIMOTO_BINS[1:], strict=True):
        m = (tt >= lo) & (tt < hi)
        rows.append({"bin": f"{lo:g}-{min(hi, 1):g}", "pairs": int(m.sum()),
                     "r": float(rr[m].mean()) if m.any() else float("nan")})
    return pd.DataFrame(rows)


def _rms_row(values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame([{"bin": "rms z", "pairs": len(values),
                          "r": float(np.median(np.sqrt((values.astype(np.float64) ** 2).mean(1))))}])


def real_curve(metadata: Path) -> pd.DataFrame:
    t = read_l1000(_need(metadata / REAL_PLATE, "real L1000 plate"))
    smi = brd_smiles(metadata)
    m = t.meta
    sel = np.flatnonzero((m.pert_type == "trt_cp").to_numpy() & m.pert_id.isin(smi).to_numpy())
    return pd.concat([tanimoto_curve(t.values[sel], [smi[p] for p in m.pert_id.iloc[sel]]), _rms_row(t.values[sel])],
                     ignore_index=True)


def sim_curve(sim_dir: Path, min_dose_um: float = 1.11, n_lines: int = 3) -> pd.DataFrame:
    """The simulated bulk signatures at >= min_dose_um of the n_lines lines with most of them; pairs within a line."""
    t = read_l1000(sim_dir / "bulk" / "lincs_level5.gctx", siginfo=sim_dir / "bulk" / "siginfo.txt")
    comp = pd.read_csv(sim_dir / "bulk" / "compounds.txt", sep="\t", dtype=str)
    smi = dict(zip(comp.pert_id, comp.canonical_smiles, strict=True))
    m = t.meta
    ok = (m.pert_type == "trt_cp").to_numpy() & (m.dose_um.to_numpy(float) >= min_dose_um)
    top = m[ok].cell_id.value_counts().index[:n_lines]
    sel = np.flatnonzero(ok & m.cell_id.isin(top).to_numpy())
    return pd.concat([tanimoto_curve(t.values[sel], [smi[p] for p in m.pert_id.iloc[sel]], m.cell_id.to_numpy()[sel]),
                      _rms_row(t.values[sel])], ignore_index=True)


# ------------------------------------------------------------------------------------------ single-cell noise fit
def _stats_of_counts(counts: np.ndarray, genes: np.ndarray) -> dict[str, float]:
    """cell_stats' gene-wise statistics of raw counts after log1p(CP10k) (the reader's normalisation)."""
    Y = counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4
    Y = Y[:, genes]
    mu, var = Y.mean(0), Y.var(0)
    ok = (mu > 0) & (var > 0)
    return {"zero_fraction": float((Y == 0).mean()), "genes_detected_median": float(np.median((Y > 0).sum(1))),
            "mv_slope": float(np.polyfit(np.log10(mu[ok]), np.log10(var[ok]), 1)[0]),
            "cv2_median": float(np.median(var[ok] / mu[ok] ** 2))}


def _noise_loss(sim: dict, real: pd.Series) -> float:
    return float(((sim["zero_fraction"] - real["zero_fraction"]) / 0.01) ** 2
                 + (np.log(sim["cv2_median"] / real["cv2_median"]) / 0.15) ** 2
                 + ((sim["mv_slope"] - real["mv_slope"]) / 0.05) ** 2
                 + (np.log((sim["genes_detected_median"] + 1) / (real["genes_detected_median"] + 1)) / 0.1) ** 2)


def fit_noise(metadata: Path, extra_genes: int = 200, seed: int = 0, max_evals: int = 90) -> pd.DataFrame:
    """Per real line: library size (median, log sd) from obs n_counts; depth share `frac`, expression spread `expo`
    and NB `theta` by Nelder-Mead (fixed random numbers) so that simulated vehicle cells match the real zero
    fraction, genes detected, mean-variance slope and median CV^2 on the landmark genes."""
    from scipy.optimize import minimize

    from .metadata import load_metadata
    from .noise import NoiseParams, sample_counts

    real = read_sciplex(_need(metadata / REAL_CELLS, "real sci-Plex3 cells"), metadata=metadata)
    lm = real.var[S.VAR_LANDMARK].to_numpy(bool)
    rs = cell_stats(real, real.var_names[lm]).set_index("cell_line")
    meta = load_metadata(metadata)
    genes = np.flatnonzero(np.isin(meta.genes.gene_id.to_numpy(), real.var_names[lm]))
    extra = np.random.default_rng(seed).normal(7.0, 1.8, extra_genes)
    rows = []
    for line in rs.index:
        n = int(rs.loc[line, "cells"])
        lib = pd.to_numeric(real.obs.loc[(real.obs[S.OBS_CELL_LINE] == line).to_numpy(), "n_counts"]).to_numpy()
        med, sd = float(np.median(lib)), float(np.std(np.log(lib)))
        level = np.concatenate([meta.basal.loc[line].to_numpy(), extra]) * np.log(2)

        def params(v, med=med, sd=sd):
            return NoiseParams(med, sd, float(min(np.exp(v[0]), 1.0)), float(v[1]), float(np.exp(v[2])))

        def loss(v, level=level, n=n, line=line):
            counts, _ = sample_counts(np.random.default_rng(seed), level, np.zeros((n, len(level))), params(v))
            return _noise_loss(_stats_of_counts(counts, genes), rs.loc[line])

        x0 = np.array([np.log(0.8), 1.4, np.log(0.05)])
        simplex = np.vstack([x0, x0 + [-0.7, 0, 0], x0 + [0, 0.4, 0], x0 + [0, 0, 0.7]])
        res = minimize(loss, x0, method="Nelder-Mead",
                       options={"maxfev": max_evals, "initial_simplex": simplex, "xatol": 0.02, "fatol": 0.05})
        counts, _ = sample_counts(np.random.default_rng(seed), level, np.zeros((n, len(level))), params(res.x))
        rows.append({"cell_line": line, **params(res.x).__dict__, "loss": float(res.fun),
                     **{f"sim {k}": v for k, v in _stats_of_counts(counts, genes).items()},
                     **{f"real {k}": float(rs.loc[line, k]) for k in ("zero_fraction", "genes_detected_median",
                                                                       "mv_slope", "cv2_median")}})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ side by side
TOLERANCE = {"lib_median": ("ratio", 1.15), "zero_fraction": ("abs", 0.03), "genes_detected_median": ("ratio", 1.4),
             "mv_slope": ("abs", 0.15), "cv2_median": ("ratio", 2.0), "r within": ("abs", 0.2),
             "r between": ("abs", 0.15), "r same drug": ("abs", 0.15), "p99 / p50": ("ratio", 2.0),
             "abs logFC": ("ratio", 2.0), "r at Tanimoto": ("abs", 0.05), "rms z": ("ratio", 1.3)}
"""how close a simulated statistic must be to the real one: 'abs' difference or 'ratio' (either way)."""


SCPERTURB_TOLERANCE = {
    "share of compounds with an effect": ("abs", 0.15), "share of compounds with a strong effect": ("abs", 0.1),
    "median E to control / noise level": ("ratio", 2.0), "E to control p90 / p50": ("ratio", 1.5),
    "E to control max / p50": ("ratio", 2.0), "median E between compounds": ("ratio", 1.5),
    "pseudobulk r between compounds p": ("abs", 0.1), "share of compound pairs with pseudobulk r": ("abs", 0.02),
    "mean pseudobulk r among the strong responders": ("abs", 0.15),
    "mean pseudobulk r of a compound with control": ("abs", 0.1)}
"""tolerances of the scPerturb rows (looked up before TOLERANCE: their names overlap)."""


def _tolerance(stat: str) -> tuple[str, float]:
    hit = next((v for k, v in SCPERTURB_TOLERANCE.items() if stat.startswith(k)), None)
    return hit or next(v for k, v in TOLERANCE.items() if k in stat)


def within(stat: str, real: float, sim: float) -> bool:
    kind, tol = _tolerance(stat)
    if not (np.isfinite(real) and np.isfinite(sim)):
        return False
    if kind == "abs":
        return abs(sim - real) <= tol
    return real > 0 and sim > 0 and max(sim / real, real / sim) <= tol


def side_by_side(cells: pd.DataFrame, resp_real: dict, resp_sim: dict, curve_real: pd.DataFrame,
                 curve_sim: pd.DataFrame, scp_real: dict | None = None, scp_sim: dict | None = None) -> pd.DataFrame:
    """One table: section, statistic, real, simulated, tolerance, within."""
    rows = []
    real_c, sim_c = (cells[cells["source"] == s].set_index("cell_line") for s in ("real", "simulated"))
    for line in real_c.index:
        for k in ("lib_median", "zero_fraction", "genes_detected_median", "mv_slope", "cv2_median"):
            rows.append(("cells", f"{line} {k}", real_c.loc[line, k], sim_c.loc[line, k]))
    rows += [("responses", k, resp_real[k], resp_sim.get(k, float("nan"))) for k in resp_real]
    for (_, a), (_, b) in zip(curve_real.iterrows(), curve_sim.iterrows(), strict=True):
        if a["bin"] == "rms z":
            rows.append(("bulk", "median rms z of a treated signature", a["r"], b["r"]))
        else:
            rows.append(("bulk", f"r at Tanimoto {a['bin']} (pairs {a['pairs']} / {b['pairs']})", a["r"], b["r"]))
    rows += [("scPerturb", k, v, (scp_sim or {}).get(k, float("nan"))) for k, v in (scp_real or {}).items()]
    df = pd.DataFrame(rows, columns=["section", "statistic", "real", "simulated"])
    df["tolerance"] = [("+-" if _tolerance(s)[0] == "abs" else "x/") + f"{_tolerance(s)[1]:g}" for s in df.statistic]
    df["within"] = [within(s, r, m) for s, r, m in zip(df.statistic, df.real, df.simulated, strict=True)]
    return df


@dataclass
class Calibration:
    table: pd.DataFrame
    cells: pd.DataFrame
    resp_real: Responses
    resp_sim: Responses
    curve_real: pd.DataFrame
    curve_sim: pd.DataFrame
    cell_profiles: dict
    """per (source, line): per-gene mean and variance of normalised expression, for the figure."""
    scperturb: dict | None = None
    """{'real': (E-distance table, correlation table), 'simulated': (...), 'info': how the simulated side was
    pooled} (None when no scPerturb comparison was made)."""


def _gene_moments(a, genes) -> dict:
    out = {}
    for line in sorted(a.obs[S.OBS_CELL_LINE].astype(str).unique()):
        m = (a.obs[S.OBS_CELL_LINE].astype(str) == line).to_numpy()
        Y = np.expm1(S.dense(a[m][:, genes].X).astype(np.float64))
        Y = Y / np.maximum(Y.sum(1, keepdims=True), 1e-9) * 1e4  # both sides to CP10k of the shared genes
        out[line] = (Y.mean(0), Y.var(0), (Y == 0).mean(0))
    return out


def scperturb_side(metadata: Path, sim_dir: Path) -> dict:
    """scPerturb's real tables and the same tables of the simulation in `sim_dir` (all 188 compounds wanted)."""
    import anndata as ad

    real = (read_scperturb_table(_need(metadata / REAL_EDIST, "scPerturb E-distance table"), metadata=metadata),
            read_scperturb_table(_need(metadata / REAL_PBCORR, "scPerturb pseudobulk correlation table"),
                                 metadata=metadata))
    raw = ad.read_h5ad(_need(sim_dir / "sciplex" / "sciplex3_sim.h5ad", "simulated h5ad"))
    e, c, info = sim_tables(raw)
    return {"real": real, "simulated": (e, c), "info": info}


def measure(metadata: Path, sim_dir: Path, scperturb_dir: Path | None = None) -> Calibration:
    """Every statistic on the real files and on the simulation in `sim_dir` (scPerturb's rows on the simulation in
    `scperturb_dir`, when given)."""
    real = read_sciplex(_need(metadata / REAL_CELLS, "real sci-Plex3 cells"), metadata=metadata)
    sim = read_sciplex(_need(sim_dir / "sciplex" / "sciplex3_sim.h5ad", "simulated h5ad"), metadata=metadata)
    lm_r = set(real.var_names[real.var[S.VAR_LANDMARK].to_numpy(bool)])
    shared = [g for g in sim.var_names[sim.var[S.VAR_LANDMARK].to_numpy(bool)] if g in lm_r]
    lines = sorted(set(real.obs[S.OBS_CELL_LINE].astype(str)) & set(sim.obs[S.OBS_CELL_LINE].astype(str)))
    parts, profiles = [], {}
    for src, a in (("real", real), ("simulated", sim)):
        a = a[a.obs[S.OBS_CELL_LINE].astype(str).isin(lines).to_numpy()]
        # real: every cell (its drug labels are shuffled); simulated: the vehicle cells
        a = a if src == "real" else a[a.obs[S.OBS_CONTROL].to_numpy(bool)]
        t = cell_stats(a, shared)
        t.insert(0, "source", src)
        parts.append(t)
        profiles[src] = _gene_moments(a, shared)
    cells = pd.concat(parts, ignore_index=True)
    lm_sim = sim[:, sim.var[S.VAR_LANDMARK].to_numpy(bool)]
    rs = sim_responses(lm_sim)
    rr = real_responses(metadata, list(lm_sim.var[S.VAR_SYMBOL]), nonzero_unit(real.X))
    cr, cs = real_curve(metadata), sim_curve(sim_dir)
    scp = scperturb_side(metadata, scperturb_dir) if scperturb_dir is not None else None
    table = side_by_side(cells, response_stats(rr), response_stats(rs), cr, cs,
                         table_stats(*scp["real"]) if scp else None, table_stats(*scp["simulated"]) if scp else None)
    return Calibration(table, cells, rr, rs, cr, cs, profiles, scp)


# ------------------------------------------------------------------------------------------ figure
MECH_ORDER = ("HDAC", "HSP90", "Aurora")


def _ordered(resp: Responses, keys: pd.DataFrame) -> np.ndarray:
    """resp's correlation matrix in the row order of `keys` (NaN rows where resp lacks a condition)."""
    idx = {(d, ln): i for i, (d, ln) in enumerate(zip(resp.keys.drug, resp.keys.cell_line, strict=True))}
    r = np.corrcoef(resp.lfc)
    pos = [idx.get((d, ln), -1) for d, ln in zip(keys.drug, keys.cell_line, strict=True)]
    out = np.full((len(pos), len(pos)), np.nan)
    for a, i in enumerate(pos):
        for b, j in enumerate(pos):
            if i >= 0 and j >= 0:
                out[a, b] = r[i, j]
    return out


def heatmap_keys(resp: Responses) -> pd.DataFrame:
    rank = {d: k for k, m in enumerate(MECH_ORDER) for d in MECHANISMS[m]}
    k = resp.keys.copy()
    k["o"] = [rank.get(d, len(MECH_ORDER)) for d in k.drug]
    return k.sort_values(["cell_line", "o", "drug"]).reset_index(drop=True)


def _plot_scperturb(scp: dict | None, ax) -> None:
    """Bottom row: E-distance to control (sorted, per median), pairwise pseudobulk r, share of compounds with an
    effect against the threshold (in units of each table's noise level); real vs simulated."""
    from .scperturb import noise_level

    if scp is None:
        for a in ax:
            a.axis("off")
        return
    for src, ls in (("real", "-"), ("simulated", "--")):
        e, c = scp[src]
        ec = np.sort(e.to_control().to_numpy())[::-1]
        ax[0].semilogy(np.arange(1, len(ec) + 1), ec / np.median(ec), ls, label=src)
        ax[1].hist(c.among_drugs(), bins=60, range=(-1, 1), histtype="step", density=True, ls=ls, label=src)
        k = np.logspace(-0.5, 2.5, 60)
        ax[2].semilogx(k, [(ec > kk * noise_level(e)).mean() for kk in k], ls, label=src)
    info = scp["info"]
    ax[0].set(xlabel="compound (rank)", ylabel="E-distance to control / median",
              title="scPerturb: E-distance to control, 188 compounds (pooled lines, doses)")
    ax[1].set(xlabel="pseudobulk r between two compounds (PCA space)", ylabel="density",
              title="scPerturb: pairwise response correlations")
    ax[2].set(xlabel="threshold (x the table's noise level)", ylabel="share of compounds above",
              title=f"compounds with an effect (simulated: {info['cells_per_group']} cells per compound)")
    for a in ax:
        a.legend(fontsize=8)


def plot(cal: Calibration, path: Path) -> None:
    """Six panels: mean-variance and zero fraction per gene (real vs simulated, per line), logFC correlation
    heatmaps (real, simulated), signature r vs Tanimoto, |logFC| distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 3, figsize=(17, 15.5))
    _plot_scperturb(cal.scperturb, ax[2])
    colors = dict(zip(sorted(cal.cell_profiles["real"]), ("tab:blue", "tab:orange", "tab:green"), strict=False))
    for line, c in colors.items():
        for src, mk in (("real", "o"), ("simulated", "x")):
            mu, var, zf = cal.cell_profiles[src][line]
            ok = (mu > 0) & (var > 0)
            ax[0, 0].scatter(np.log10(mu[ok]), np.log10(var[ok]), s=4, marker=mk, color=c, alpha=0.35,
                             label=f"{line} {src}")
            ax[0, 1].scatter(np.log10(mu[mu > 0]), zf[mu > 0], s=4, marker=mk, color=c, alpha=0.35,
                             label=f"{line} {src}")
    ax[0, 0].set(xlabel="log10 mean (CP10k of shared landmark genes)", ylabel="log10 variance",
                 title="mean-variance per gene (o real, x simulated)")
    ax[0, 1].set(xlabel="log10 mean", ylabel="fraction of cells with zero", title="zero fraction per gene")
    for a in (ax[0, 0], ax[0, 1]):
        a.legend(fontsize=7, markerscale=3, ncol=2)
        a.set_xlim(-4, 3.2)
    ax[0, 0].set_ylim(-5, 7)
    keys = heatmap_keys(cal.resp_real)
    labels = [f"{d[:10]} {ln}" for d, ln in zip(keys.drug, keys.cell_line, strict=True)]
    for a, resp, name in ((ax[0, 2], cal.resp_real, "real"), (ax[1, 0], cal.resp_sim, "simulated")):
        im = a.imshow(_ordered(resp, keys), vmin=-0.2, vmax=1, cmap="viridis")
        a.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
        a.set_yticks(range(len(labels)), labels, fontsize=5)
        a.set_title(f"logFC Pearson r, 10 uM, {name} (9 drugs x 3 lines)")
        fig.colorbar(im, ax=a, fraction=0.046)
    for cur, name, mk in ((cal.curve_real, "real A375 plate (6 h, 10 uM)", "o-"),
                          (cal.curve_sim, "simulated level 5 (>= 1.11 uM)", "s--")):
        cv = cur[cur["bin"] != "rms z"]
        ax[1, 1].plot(range(len(cv)), cv["r"], mk, label=name)
    ax[1, 1].set_xticks(range(len(cv)), [f"{b}\n(n={p})" for b, p in zip(cv["bin"], cal.curve_real["pairs"],
                                                                         strict=False)], fontsize=8)
    ax[1, 1].set(xlabel="Morgan Tanimoto of the two compounds (n = real pairs)", ylabel="mean signature Pearson r",
                 title="bulk signature similarity vs structure")
    ax[1, 1].legend(fontsize=8)
    for resp, name, ls in ((cal.resp_real, "real", "-"), (cal.resp_sim, "simulated", "--")):
        a = np.sort(np.abs(resp.lfc).ravel() / resp.unit)[::-1]
        ax[1, 2].loglog(a, np.arange(1, len(a) + 1) / len(a), ls, label=name)
    ax[1, 2].set(xlabel="|logFC| (units of mean non-zero expression)", ylabel="share of (condition, gene) >= x",
                 title="response size, 9 drugs x 3 lines, landmark genes", xlim=(1e-3, 3))
    ax[1, 2].legend(fontsize=8)
    fig.suptitle("Simulator (presets calib, scperturb) vs real sci-Plex3 cells, pseudobulk, L1000 plate, scPerturb "
                 "tables",
                 fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the command
def check_real_files(metadata: Path) -> None:
    for rel, what in ((REAL_CELLS, "real sci-Plex3 cells"), (REAL_PSEUDOBULK, "real pseudobulk table"),
                      (REAL_PLATE, "real L1000 plate"), (REAL_EDIST, "scPerturb E-distance table"),
                      (REAL_PBCORR, "scPerturb pseudobulk correlation table")):
        _need(metadata / rel, what)


def calibrate(metadata: Path, out: Path, *, preset: str = "calib", seed: int = 0, sim_dir: Path | None = None,
              scperturb_dir: Path | None = None, progress: bool = False) -> Calibration:
    """Simulate `preset` (with the pseudobulk drugs) into out/sim unless `sim_dir` is given, and preset `scperturb`
    (all 188 compounds) into out/sim_scperturb unless `scperturb_dir` is given; measure both sides, write
    out/calibration.csv and out/calibration.png."""
    from . import PRESETS, simulate
    from .core import atomic_dir_file

    metadata = Path(metadata)
    check_real_files(metadata)
    if sim_dir is not None:
        _need(Path(sim_dir) / "sciplex" / "sciplex3_sim.h5ad", "simulated h5ad (--sim: a `scpert data simulate` folder)")
    if scperturb_dir is not None:
        _need(Path(scperturb_dir) / "sciplex" / "sciplex3_sim.h5ad",
              "simulated h5ad (--sim-scperturb: a `scpert data simulate` folder of all 188 compounds)")
    elif preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}", field="preset", hint=f"one of {sorted(PRESETS)}")
    out = ensure_writable_dir(out)
    if sim_dir is None:
        sim_dir = out / "sim"
        simulate(sim_dir, preset=preset, metadata=metadata, seed=seed, include=PSEUDOBULK_DRUGS, progress=progress)
    if scperturb_dir is None:
        scperturb_dir = out / "sim_scperturb"
        simulate(scperturb_dir, preset=SCPERTURB_PRESET, metadata=metadata, seed=seed, progress=progress)
    cal = measure(metadata, Path(sim_dir), Path(scperturb_dir))
    atomic_dir_file(out / "calibration.csv", lambda q: cal.table.to_csv(q, index=False))
    atomic_dir_file(out / "calibration.png", lambda q: plot(cal, q))
    return cal


# ------------------------------------------------------------------------------------------ what ridge is handed
RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1000.0)


def morgan_ridge_r2(smiles: list[str], effect: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 (pooled over genes, compound folds) of ridge regression from Morgan bits (radius 2,
    1024: what ridge and our model read) to each compound's true full-response effect; the best of RIDGE_ALPHAS
    (the same optimism for every truth compared)."""
    from sklearn.model_selection import KFold
    from threadpoolctl import threadpool_limits


    X = morgan_fingerprints(smiles).astype(np.float64)
    sse = np.zeros(len(RIDGE_ALPHAS))
    with threadpool_limits(1):  # small matrices: threads only contend
        for tr, te in KFold(folds, shuffle=True, random_state=seed).split(X):
            xm, ym = X[tr].mean(0), effect[tr].mean(0)
            u, sv, vt = np.linalg.svd(X[tr] - xm, full_matrices=False)
            uy = u.T @ (effect[tr] - ym)
            for k, a in enumerate(RIDGE_ALPHAS):
                pred = (X[te] - xm) @ (vt.T @ ((sv / (sv**2 + a))[:, None] * uy)) + ym
                sse[k] += float(((effect[te] - pred) ** 2).sum())
    return float(1 - sse.min() / ((effect - effect.mean(0)) ** 2).sum())


def truth_r2(metadata: Path | None, n_compounds: int = 600, seed: int = 0) -> dict[str, float]:
    """morgan_ridge_r2 of the legacy and the calibrated truth on the same compounds (active ones only)."""
    from .core import PRESETS, make_truth, real_responders
    from .metadata import load_metadata

    meta = load_metadata(metadata)
    sci = meta.sciplex.copy()
    sci["canonical_smiles"] = [canonical_smiles(s) for s in sci.smiles]
    rng = np.random.default_rng(seed)
    bulk = pd.unique(meta.bulk_design.smiles.to_numpy())
    pick = [canonical_smiles(s) for s in rng.choice(bulk, size=min(n_compounds, len(bulk)), replace=False)]
    comps = list(pd.unique(np.array(list(sci.canonical_smiles) + pick)))
    out = {}
    for kind in ("legacy", "calibrated"):
        tr = make_truth(kind, meta, seed, comps, len(meta.genes), sci, PRESETS["default"],
                        real_responders(metadata, sci))
        act = ~tr.inactive
        out[kind] = morgan_ridge_r2([c for c, a in zip(comps, act, strict=True) if a], tr.effect[act])
    return out
