"""Single-cell count noise: negative-binomial counts around each cell's expected profile.

Two noise models:

- `calibrated` (the `bench` and `calib` presets): per cell line, fitted to the 2,247 real sci-Plex3 cells
  (`scpert data calibrate --fit-noise`): the cell's total UMIs (n_counts) are log-normal with the real line's median
  and spread; the simulated genes receive `frac` of them, spread over genes as exp(expo * ln2 * basal log2 level);
  counts are NB with the line's dispersion `theta`; no extra dropout (NB zeros alone give the real zero fraction).
  The fit lands on frac = 1 (the bound) and a very small theta (0.05 in A549/K562): these are effective values that
  reproduce the real file's statistics, whose normalisation is not plain log1p(CP10k) of integer counts (its
  smallest values are ~1e-7); they are not estimates of the biology.
- `deep` (the `tiny`, `default` and `large` presets, as before 2026-11-30): 4,000 UMIs over the simulated genes,
  basal exponent 0.6, NB theta 4, 8% extra dropout. Far deeper than real sci-Plex3 (about 7x the genes detected per
  cell), which keeps a signal in the 6-8 cells per condition of those presets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoiseParams:
    lib_median: float
    """median total UMIs per cell (obs n_counts)."""
    lib_sd: float
    """sd of log total UMIs."""
    frac: float
    """share of the total UMIs that falls on the simulated genes."""
    expo: float
    """gene expression spread: mean ~ exp(expo * ln2 * basal log2 level)."""
    theta: float
    """NB inverse dispersion (variance = mu + mu^2 / theta)."""
    dropout: float = 0.0
    """extra zero-inflation."""


DEEP = NoiseParams(lib_median=4000.0, lib_sd=0.35, frac=1.0, expo=0.6, theta=4.0, dropout=0.08)

# fitted by `scpert data calibrate --fit-noise` on sciplex/real/sciplex3_chemcpa_format_n2247x2000_SHUFFLED_LABELS.h5ad
CALIBRATED: dict[str, NoiseParams] = {
    "A549": NoiseParams(lib_median=1342.0, lib_sd=0.714, frac=1.0, expo=1.631, theta=0.053),
    "K562": NoiseParams(lib_median=1384.0, lib_sd=0.762, frac=1.0, expo=1.835, theta=0.056),
    "MCF7": NoiseParams(lib_median=1292.0, lib_sd=0.774, frac=1.0, expo=1.873, theta=0.278),
}
"""per real line; a line without its own entry (synthetic metadata) gets calibrated_other()."""


def calibrated_other() -> NoiseParams:
    """The mean of the fitted lines, for lines without their own fit."""
    vals = list(CALIBRATED.values())
    return NoiseParams(**{k: float(np.mean([getattr(v, k) for v in vals])) for k in NoiseParams.__dataclass_fields__})


def noise_for(model: str, line: str) -> NoiseParams:
    if model == "deep":
        return DEEP
    return CALIBRATED.get(line) or calibrated_other()


def sample_counts(rng: np.random.Generator, log_level: np.ndarray, log_shift: np.ndarray, p: NoiseParams
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Counts [n, genes] and total UMIs [n] of cells whose expected log expression is log_level (the line's
    vehicle level, natural log, [genes]) + log_shift ([n, genes]: sub-population program + drug effect).
    The drug effect changes each gene's mean count by exp(log_shift): the truth's log-fold change."""
    n = len(log_shift)
    lib = rng.lognormal(np.log(p.lib_median), p.lib_sd, n)
    base = p.expo * log_level
    base = base - np.log(np.exp(base - base.max()).sum()) - base.max()  # vehicle shares sum to 1
    mu = np.exp(base[None] + log_shift) * (lib * p.frac)[:, None]
    # a strong effect on a highly expressed gene can push the NB mean past int32 (seen with the deep model: 2 cells
    # of the default preset wrapped to negative counts); 1e5 UMIs of one gene is beyond any real cell
    np.minimum(mu, 1e5, out=mu)
    counts = rng.poisson(rng.gamma(p.theta, mu / p.theta))
    if p.dropout:
        counts[rng.random(counts.shape) < p.dropout] = 0
    return counts, lib
