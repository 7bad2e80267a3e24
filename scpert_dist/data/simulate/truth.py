"""The simulator's hidden ground truth: a full-response log-fold change per (compound, cell line) and a Hill
dose-response on top.

Two versions:

- `CalibratedTruth` (every preset): mechanisms, not fingerprint bits, carry the response. A sci-Plex3 compound's
  mechanism is its real Selleck target (the four HDAC inhibitors share one, the HSP90 inhibitors another); every
  other compound copies the mechanism of its most similar earlier compound with a probability that rises with their
  atom-pair Tanimoto similarity (fitted so that bulk signature similarity follows Morgan Tanimoto as on the real A375
  plate), else it gets a random one. The response is a weighted sum of: the mechanism's gene program (partly shared
  across cell lines, partly line-specific), a structure term from topological-torsion counts through a random
  two-layer tanh network, a compound-specific term that no structure feature explains, and a generic per-line response shared by
  all active compounds (LINCS' plate z-scores remove it: the bulk side leaves it out). Morgan bits (what ridge and
  our model read) enter nowhere, so a linear model of them is not handed the answer.
- `LegacyTruth` (before 2026-11-30, kept for comparison): effect = a linear function of the Morgan bits plus the
  class of the nearest prototype fingerprint.
"""

from __future__ import annotations

import numpy as np

from ..drugs import mol_of, tanimoto

TIME_FACTOR = {6.0: 0.6, 24.0: 1.0}

# ---- calibrated truth: constants fitted by `scpert data calibrate` against the real files (docs/calibration.md)
N_ANON_MECH = 150
"""mechanisms beyond the sci-Plex3 targets (the LINCS compounds' many other targets)."""
SHARE_P_MAX, SHARE_S0, SHARE_W = 0.9, 0.56, 0.06
"""P(copy the nearest earlier compound's mechanism) = P_MAX * sigmoid((atom-pair Tanimoto - S0) / W)."""
W_MECH, W_STRUCT, W_IDIO, W_GENERIC = 0.80, 0.25, 0.25, 0.75
"""weights of the mechanism program, torsion-network term, compound-specific term and generic per-line response."""
BULK_GENERIC = 0.4
"""share of the generic response left in bulk z-scores (plate z-scoring removes most of it, not all)."""
RHO_LINE = 0.25
"""share of a mechanism's program common to all cell lines (the rest is line-specific)."""
PROGRAM_DENSITY, PROGRAM_DF, PROGRAM_DENSE = 0.3, 5.0, 0.02
"""gene programs: fraction of genes moved strongly, Student-t tail of their weights, sd of the small change of
every gene (0.15 did not bring the |logFC| p99 / p50 ratio nearer the real one: the median is noise)."""
AMP_MEDIAN, AMP_SD, INACTIVE_FRAC = 0.6, 0.5, 0.25
"""full-response effect size (RMS natural-log fold change over genes) and the share of near-inactive compounds."""
POTENT_AMP = 1.8
"""effect-size factor of the sci-Plex3 compounds real DESeq2 calls strong in all three lines (always active)."""
ANTIPROLIF_WORDS = ("HDAC", "Aurora", "CDK", "PLK", "Topoisomerase", "HSP", "Microtubule", "Kinesin", "DNA/RNA",
                    "Proteasome", "PARP", "Mitotic")
"""sci-Plex3 targets whose inhibitors deplete cycling cells."""


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / (np.sqrt((x**2).mean(-1, keepdims=True)) + 1e-9)


def _sparse_programs(rng: np.random.Generator, n: int, n_genes: int, density: float, df: float) -> np.ndarray:
    """[n, genes] gene programs: heavy-tailed weights on a random gene subset, unit RMS per row."""
    w = rng.standard_t(df, (n, n_genes)) * (rng.random((n, n_genes)) < density)
    return _unit_rows(w + PROGRAM_DENSE * rng.normal(0, 1, (n, n_genes)))


def torsion_counts(smiles: list[str], n_bits: int = 512) -> np.ndarray:
    """[n, n_bits] hashed topological-torsion counts (float32): four-atom paths, another view of structure than
    Morgan's circular neighbourhoods."""
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetTopologicalTorsionGenerator(fpSize=n_bits)
    out = np.zeros((len(smiles), n_bits), np.float32)
    for i, s in enumerate(smiles):
        out[i] = gen.GetCountFingerprintAsNumPy(mol_of(s))
    return out


def atom_pair_fingerprints(smiles: list[str], n_bits: int = 1024) -> np.ndarray:
    """[n, n_bits] hashed atom-pair fingerprints (uint8)."""
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetAtomPairGenerator(fpSize=n_bits)
    return np.stack([gen.GetFingerprintAsNumPy(mol_of(s)).astype(np.uint8) for s in smiles]) if smiles else \
        np.zeros((0, n_bits), np.uint8)


def nearest_earlier(fp: np.ndarray, rank: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each compound, the most Tanimoto-similar compound of lower rank (-1 when none) and that similarity."""
    n = len(fp)
    best, sim = np.full(n, -1), np.zeros(n)
    for a in range(0, n, block):
        s = tanimoto(fp[a:a + block], fp)
        s[rank[None, :] >= rank[a:a + block, None]] = -1.0
        j = s.argmax(1)
        best[a:a + block] = np.where(s.max(1) >= 0, j, -1)
        sim[a:a + block] = np.maximum(s.max(1), 0.0)
    return best, sim


def share_probability(s: np.ndarray) -> np.ndarray:
    return SHARE_P_MAX / (1 + np.exp(-(np.asarray(s) - SHARE_S0) / SHARE_W))


def assign_mechanisms(rng: np.random.Generator, fp: np.ndarray, fixed: np.ndarray, n_mech: int) -> np.ndarray:
    """Mechanism per compound: `fixed` (>= 0) kept; the rest, in random order after the fixed ones, copy the nearest
    earlier compound's mechanism with share_probability(similarity), else draw one at random."""
    n = len(fp)
    free = np.flatnonzero(fixed < 0)
    rank = np.full(n, -1)
    rank[fixed >= 0] = -1  # fixed compounds come first
    rank[free] = rng.permutation(len(free))
    best, sim = nearest_earlier(fp, rank)
    mech = fixed.copy()
    u = rng.random(n)
    draw = rng.integers(0, n_mech, n)
    for i in free[np.argsort(rank[free])]:
        j = best[i]
        mech[i] = mech[j] if j >= 0 and mech[j] >= 0 and u[i] < share_probability(sim[i]) else draw[i]
    return mech


def sciplex_mechanisms(targets: list[str]) -> tuple[dict[str, int], list[str]]:
    """Mechanism id per distinct real target string ('unknown' gets none)."""
    names = sorted({t for t in targets if t and t not in ("unknown", "nan")})
    return {t: i for i, t in enumerate(names)}, names


class CalibratedTruth:
    """Hidden truth with mechanisms from real targets and analog similarity (see the module docstring)."""

    kind = "calibrated"

    def __init__(self, lines: list[str], seed: int, smiles: list[str], n_genes: int,
                 targets: dict[str, str] | None = None, potent: set[str] = frozenset(), rank: int = 16):
        rng = np.random.default_rng([seed, 11])
        self.lines = {c: i for i, c in enumerate(lines)}
        n, n_lines = len(smiles), len(lines)
        tmap, tnames = sciplex_mechanisms(list((targets or {}).values()))
        self.mech_names = tnames + [f"anon{i:03d}" for i in range(N_ANON_MECH)]
        k = len(self.mech_names)
        fixed = np.array([tmap.get((targets or {}).get(s, ""), -1) for s in smiles])
        self.cls = assign_mechanisms(rng, atom_pair_fingerprints(smiles), fixed, k)
        self.antiprolif = np.array([any(w.lower() in m.lower() for w in ANTIPROLIF_WORDS) for m in tnames]
                                   + list(rng.random(N_ANON_MECH) < 1 / 3))
        self.program = _sparse_programs(rng, k, n_genes, PROGRAM_DENSITY, PROGRAM_DF)  # shared across lines
        self.line_f = _sparse_programs(rng, rank, n_genes, PROGRAM_DENSITY, PROGRAM_DF)
        self.line_u, self.line_v = rng.normal(0, 1, (k, rank)), rng.normal(0, 1, (n_lines, rank))
        self.generic = _unit_rows(_sparse_programs(rng, 1, n_genes, 0.3, PROGRAM_DF)
                                  + _sparse_programs(rng, n_lines, n_genes, 0.3, PROGRAM_DF))
        x = np.log1p(torsion_counts(smiles)).astype(np.float64)
        x = (x - x.mean(0)) / (x.std(0) + 0.1)
        h = np.tanh(x @ rng.normal(0, 1.5 / np.sqrt(x.shape[1]), (x.shape[1], 48)) + rng.normal(0, 0.5, 48))
        self.struct = _unit_rows((h - h.mean(0)) @ _sparse_programs(rng, 48, n_genes, 0.2, PROGRAM_DF))
        self.idio = _sparse_programs(rng, n, n_genes, 0.2, PROGRAM_DF)
        self.amp = rng.lognormal(np.log(AMP_MEDIAN), AMP_SD, n)
        self.inactive = rng.random(n) < INACTIVE_FRAC
        strong = np.array([c in potent for c in smiles], bool)
        self.inactive &= ~strong
        self.amp[strong] *= POTENT_AMP
        self.amp[self.inactive] *= 0.05
        shared = W_MECH * np.sqrt(RHO_LINE) * self.program[self.cls] + W_STRUCT * self.struct + W_IDIO * self.idio
        self.effect = shared * self.amp[:, None]
        """[compound, gene] the line-independent part of the full response (what compound_effects.npz stores)."""
        self.ec50 = rng.lognormal(0.0, 1.0, n)
        self.hill = rng.uniform(0.8, 2.5, n)
        self.sens = rng.lognormal(0, 0.45, (n_lines, k))

    def full_response(self, ci: np.ndarray, line: np.ndarray, generic: float = 1.0) -> np.ndarray:
        """[n, genes] full-response log-fold change of compounds ci in lines `line`."""
        m = self.cls[ci]
        spec = _unit_rows((self.line_u[m] * self.line_v[line]) @ self.line_f)
        out = self.effect[ci] + (self.amp[ci] * W_MECH * np.sqrt(1 - RHO_LINE))[:, None] * spec
        if generic:
            out = out + (self.amp[ci] * W_GENERIC * generic)[:, None] * self.generic[line]
        return out

    def response(self, ci: np.ndarray, line: np.ndarray, dose_um: np.ndarray, time_h: np.ndarray) -> np.ndarray:
        return _hill_response(self, ci, line, dose_um, time_h)

    def lfc(self, ci, line, dose_um, time_h, generic: float = 1.0) -> np.ndarray:
        """Population-independent hidden log-fold change [n, genes]; `generic` scales the per-line response that
        all compounds share (BULK_GENERIC on the bulk side: LINCS' plate z-scores remove most of it)."""
        ci, line = np.asarray(ci), np.asarray(line)
        return self.full_response(ci, line, generic) * self.response(ci, line, dose_um, time_h)[:, None]


def _hill_response(t, ci, line, dose_um, time_h) -> np.ndarray:
    """Scalar response (Hill * sensitivity * time) per condition."""
    d = np.asarray(dose_um, float)
    h = t.hill[ci]
    hill = d**h / (d**h + t.ec50[ci] ** h)
    tf = np.vectorize(TIME_FACTOR.get)(np.asarray(time_h, float))
    return hill * t.sens[line, t.cls[ci]] * tf


class LegacyTruth:
    """The truth before 2026-11-30: Morgan fingerprint -> nearest of K prototype fingerprints (class) -> low-rank
    gene program (class loadings + a fixed random linear projection of the same Morgan bits)."""

    kind = "legacy"

    def __init__(self, lines: list[str], seed: int, fps: np.ndarray, n_genes: int, n_classes: int = 10,
                 rank: int = 12):
        rng = np.random.default_rng([seed, 1])
        n_lines = len(lines)
        self.lines = {c: i for i, c in enumerate(lines)}
        k, r = n_classes, rank
        proto = fps[rng.choice(len(fps), size=k, replace=False)].astype(np.float32)
        f = fps.astype(np.float32)
        inter = f @ proto.T
        union = f.sum(1, keepdims=True) + proto.sum(1)[None] - inter
        self.cls = np.argmax(inter / np.maximum(union, 1), axis=1)
        self.antiprolif = np.zeros(k, bool)
        self.antiprolif[: max(1, k // 3)] = True
        self.factors = rng.normal(0, 1, (r, n_genes)) * (rng.random((r, n_genes)) < 0.25)
        self.class_load = rng.normal(0, 1, (k, r))
        proj = rng.normal(0, 1, (fps.shape[1], r))
        fc = f - f.mean(0, keepdims=True)
        own = fc @ proj / np.sqrt(np.maximum(f.sum(1, keepdims=True), 1))
        load = self.class_load[self.cls] + 0.6 * own / (own.std() + 1e-9)
        eff = load @ self.factors
        eff /= eff.std(1, keepdims=True) + 1e-9
        n = len(fps)
        self.amp = rng.lognormal(np.log(0.35), 0.35, n)
        self.inactive = rng.random(n) < 0.15
        self.amp[self.inactive] *= 0.05
        self.effect = eff * self.amp[:, None]
        self.ec50 = rng.lognormal(0.0, 1.0, n)
        self.hill = rng.uniform(0.8, 2.5, n)
        self.sens = rng.lognormal(0, 0.45, (n_lines, k))

    def response(self, ci, line, dose_um, time_h) -> np.ndarray:
        return _hill_response(self, ci, line, dose_um, time_h)

    def lfc(self, ci, line, dose_um, time_h, generic: float = 1.0) -> np.ndarray:
        return self.effect[ci] * self.response(ci, line, dose_um, time_h)[:, None]


__all__ = ["CalibratedTruth", "BULK_GENERIC", "LegacyTruth", "TIME_FACTOR", "assign_mechanisms", "atom_pair_fingerprints",
           "share_probability", "torsion_counts"]
