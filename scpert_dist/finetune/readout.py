"""The readout: a closed-form, regularised linear map from drug features to the drug's response, on top of the best
simple baseline, that keeps only what inner cross-validation over TRAINING drugs says helps.

    prediction(drug, context) = base(context) + sum_b  K_b(drug, training drugs) @ A          (kernel blocks)
                                              + sum_d  beta_d * (D_d(drug) - mean D_d)         (aligned blocks)

- `base` is what the caller's best simple baseline predicts from the training drugs alone (e.g. the mean response of
  the training drugs in the same context: line, dose, time). With no block kept, the readout IS that baseline.
- A kernel block is a feature matrix X_b [n, p] (Morgan bits, an encoder's embedding of the drug's LINCS signature, the
  drug's measured signature in another context, ...); its linear kernel X_b X_b^T is scaled to unit mean diagonal so
  one weight grid fits every source. The kernel blocks together are multi-kernel ridge regression in dual form:
  A = (sum_b w_b K_b + I)^-1 (Y - base), so a block's weight w_b = 1 / its ridge penalty; with one block this is
  exactly ridge regression with alpha = trace(X_b X_b^T) / (n w_b) (tested against sklearn's Ridge).
- An aligned block D_d [n, G] lives in the response's own gene space (the same drug's signature measured in another
  cell line): one scalar beta_d by least squares on the residual, fit before the kernel blocks (identity, scaled).
- Selection: greedy forward over blocks. Start from the base alone; add the block (at its best weight on the grid)
  whose inner-CV score (mean Pearson per response row, drug-grouped folds, the base refit inside every fold) improves
  the current score by at least `min_gain`; stop when none does. Every choice, with the inner-CV score of each
  candidate, is kept in `Readout.report` so a benchmark can say what was kept and why.

Plain numpy, no torch: the pseudobulk, bulk and transfer benchmarks and the finetuned single-cell model (whose
drug-specific shift it gives) all call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import cholesky, eigh, solve_triangular
from threadpoolctl import threadpool_limits

from ..errors import ConfigError

WEIGHTS = tuple(float(w) for w in np.logspace(-3, 2, 11))
"""Grid of kernel-block weights (1 / ridge penalty on a unit-mean-diagonal kernel)."""

BaseFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""base(train_rows, query_rows) -> [len(query_rows), G]: the simple baseline fit on `train_rows` only."""


@dataclass
class ReadoutConfig:
    """How the readout chooses its blocks and weights (inner cross-validation over training drugs)."""

    folds: int = 5
    """Inner folds over training drugs (leave-one-drug-out when there are fewer drugs)."""
    weights: tuple[float, ...] = WEIGHTS
    """Kernel-block weights tried (1 / ridge penalty on a unit-mean-diagonal kernel)."""
    min_gain: float = 0.0
    """A block is kept only if it raises the inner-CV score by more than this."""
    select: bool = True
    """False: keep every block given, each at its best inner-CV weight (used to reproduce plain ridge)."""
    seed: int = 0
    """Seed of the inner fold assignment."""

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"readout.folds must be >= 2, got {self.folds}", field="readout.folds")
        if not self.weights or min(self.weights) <= 0:
            raise ConfigError("readout.weights must be positive", field="readout.weights")


@dataclass
class Readout:
    """Fit with `fit(...)`; predict with `predict(...)`. `report` says what inner CV kept."""

    cfg: ReadoutConfig = field(default_factory=ReadoutConfig)
    kernel_w: dict[str, float] = field(default_factory=dict)
    """Kept kernel blocks -> weight."""
    aligned_names: list[str] = field(default_factory=list)
    """Kept aligned blocks."""
    report: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ fitting
    def fit(self, Y: np.ndarray, groups: np.ndarray, base: BaseFn, *, kernels: Mapping[str, np.ndarray] | None = None,
            aligned: Mapping[str, np.ndarray] | None = None) -> Readout:
        """Y [n, G] training responses; groups [n] drug of each row (folds never split a drug); base the simple
        baseline; kernels name -> features [n, p]; aligned name -> [n, G] signatures in Y's gene space.

        BLAS runs on one thread here: the matrices are small (n = training conditions), and on a loaded 2-core machine
        a multi-threaded OpenBLAS made this fit 11x slower (12.0 s vs 1.1 s, n=236, 3 blocks, load 10)."""
        with threadpool_limits(limits=1, user_api="blas"):
            return self._fit_blocks(Y, groups, base, kernels, aligned)

    def _fit_blocks(self, Y, groups, base, kernels, aligned) -> Readout:
        Y = np.asarray(Y, np.float64)
        n = len(Y)
        kernels = {k: np.asarray(v, np.float64) for k, v in (kernels or {}).items()}
        aligned = {k: np.asarray(v, np.float64) for k, v in (aligned or {}).items()}
        for name, X in [*kernels.items(), *aligned.items()]:
            if X.ndim != 2 or len(X) != n or not np.isfinite(X).all():
                raise ConfigError(f"readout block {name!r}: {len(X)} rows for {n} responses, or non-finite values",
                                  field=f"readout.{name}", hint="give one finite feature row per training response")
        self._X, self._D, self._Y = kernels, aligned, Y
        self._G = {k: X @ X.T for k, X in kernels.items()}
        self._scale = {k: _kernel_scale(G) for k, G in self._G.items()}
        folds = _group_folds(np.asarray(groups), self.cfg.folds, self.cfg.seed)
        self._folds = [(tr, te, base(tr, te), base(tr, tr), {k: self._centred(k, tr, tr, te) for k in kernels})
                       for tr, te in folds]
        kw: dict[str, float] = {}
        al: list[str] = []
        score = self._cv(kw, al)
        trail = [{"step": "base", "score": score}]
        cands = [("kernel", k) for k in kernels] + [("aligned", d) for d in aligned]
        if not self.cfg.select:
            for kind, name in cands:
                if kind == "aligned":
                    al.append(name)
                else:
                    grid = self._cv_grid(kw, al, name)
                    kw[name] = self.cfg.weights[int(np.argmax(grid))]
            score = self._cv(kw, al)
            trail.append({"step": "all blocks", "score": score, "weights": dict(kw), "aligned": list(al)})
        while self.cfg.select:
            best = None
            for kind, name in cands:
                if name in kw or name in al:
                    continue
                if kind == "aligned":
                    s, w = self._cv(kw, [*al, name]), None
                else:
                    grid = self._cv_grid(kw, al, name)
                    w, s = self.cfg.weights[int(np.argmax(grid))], float(np.max(grid))
                trail.append({"step": f"try {name}", "score": s, "weight": w})
                if best is None or s > best[0]:
                    best = (s, kind, name, w)
            if best is None or not best[0] > score + self.cfg.min_gain:
                break
            score, kind, name, w = best
            if kind == "aligned":
                al.append(name)
            else:
                kw[name] = w
            trail.append({"step": f"keep {name}", "score": score, "weight": w})
        self.kernel_w, self.aligned_names = kw, al
        self.report = {"kept": [*kw, *al], "weights": dict(kw), "inner_cv_score": score,
                       "base_score": trail[0]["score"], "trail": trail, "folds": len(folds)}
        rows = np.arange(n)
        K = {k: self._centred(k, rows, rows, rows)[0] for k in kw}
        self._fit = self._solve(rows, base(rows, rows), K, kw, al)
        self._mean = {k: kernels[k].mean(0) for k in kw}
        self._Xc = {k: kernels[k] - self._mean[k] for k in kw}
        del self._folds, self._G
        return self

    def _centred(self, name: str, tr: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(K[tr, tr], K[b, tr]) of block `name`, features centred on the mean over rows `tr`, unscaled."""
        G = self._G[name]
        g = G[:, tr].mean(1)                     # mean over tr of <x_i, x_k>
        gg = g[tr].mean()
        Ktr = G[np.ix_(tr, tr)] - g[tr][:, None] - g[tr][None, :] + gg
        Kb = G[np.ix_(b, tr)] - g[b][:, None] - g[tr][None, :] + gg
        return Ktr, Kb

    def _solve(self, tr, base_tr, K: dict, kw: dict, al: list):
        """(aligned betas and means, dual coefficients, residual mean) fit on rows `tr`."""
        betas, R = self._aligned(tr, base_tr, al)
        ym = R.mean(0)
        if not kw:
            return betas, None, ym
        Ktot = sum((w / self._scale[k]) * K[k] for k, w in kw.items())
        return betas, np.linalg.solve(Ktot + np.eye(len(tr)), R - ym), ym

    def _cv(self, kw: dict, al: list) -> float:
        scores = []
        for tr, te, base_te, base_tr, Kf in self._folds:
            betas, A, ym = self._solve(tr, base_tr, {k: Kf[k][0] for k in kw}, kw, al)
            P = base_te + ym
            for name, (b, mu) in betas.items():
                P = P + b * (self._D[name][te] - mu)
            if A is not None:
                P = P + sum((w / self._scale[k]) * Kf[k][1] for k, w in kw.items()) @ A
            scores.extend(_row_pearson(P, self._Y[te]))
        return float(np.mean(scores)) if scores else float("nan")

    def _cv_grid(self, kw: dict, al: list, name: str) -> np.ndarray:
        """Inner-CV score of adding kernel block `name` to `kw` at every weight of the grid, from one generalised
        eigendecomposition per fold: with M0 = sum_kw w K + I = L L^T and L^-1 K_name L^-T = U diag(lam) U^T,
        (M0 + w K_name)^-1 = Q diag(1 / (1 + w lam)) Q^T, Q = L^-T U; so each weight costs one small product."""
        ws = np.asarray(self.cfg.weights)
        per_w = [[] for _ in ws]
        for tr, te, base_te, base_tr, Kf in self._folds:
            betas, R = self._aligned(tr, base_tr, al)
            P0 = base_te.copy()
            for nm, (b, mu) in betas.items():
                P0 += b * (self._D[nm][te] - mu)
            ym = R.mean(0)
            M0 = np.eye(len(tr)) + sum((w / self._scale[k]) * Kf[k][0] for k, w in kw.items())
            L = cholesky(M0, lower=True)
            Kn = Kf[name][0] / self._scale[name]
            T = solve_triangular(L, solve_triangular(L, Kn, lower=True).T, lower=True)
            lam, U = eigh((T + T.T) / 2)
            Q = solve_triangular(L.T, U, lower=False)
            B = Q.T @ (R - ym)
            Kq0 = sum((w / self._scale[k]) * Kf[k][1] for k, w in kw.items())
            C0 = (Kq0 @ Q) if kw else 0.0
            Cn = (Kf[name][1] / self._scale[name]) @ Q
            for i, w in enumerate(ws):
                Bw = B / (1 + w * np.clip(lam, 0, None))[:, None]
                P = P0 + ym + (C0 + w * Cn) @ Bw
                per_w[i].extend(_row_pearson(P, self._Y[te]))
        return np.array([np.mean(x) for x in per_w])

    def _aligned(self, tr, base_tr, al):
        R = self._Y[tr] - base_tr
        betas = {}
        for nm in al:
            D = self._D[nm][tr]
            mu = D.mean(0)
            Dc = D - mu
            b = float((Dc * R).sum() / max((Dc * Dc).sum(), 1e-12))
            betas[nm] = (b, mu)
            R = R - b * Dc
        return betas, R

    # --------------------------------------------------------------------------------------------- prediction
    def predict(self, base_q: np.ndarray, *, kernels: Mapping[str, np.ndarray] | None = None,
                aligned: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """[m, G] for query rows: base_q = the baseline fit on all training rows, evaluated at the queries; the
        blocks' features of the query drugs (only the kept blocks are read)."""
        betas, A, ym = self._fit
        P = np.asarray(base_q, np.float64) + ym
        for name, (b, mu) in betas.items():
            P = P + b * (np.asarray(aligned[name], np.float64) - mu)
        if A is not None:
            Kq = sum((w / self._scale[k]) * ((np.asarray(kernels[k], np.float64) - self._mean[k]) @ self._Xc[k].T)
                     for k, w in self.kernel_w.items())
            P = P + Kq @ A
        return P

    def ridge_alpha(self, name: str) -> float:
        """The sklearn-Ridge alpha equivalent to the kept weight of a lone kernel block."""
        return self._scale[name] / self.kernel_w[name]


def _kernel_scale(G: np.ndarray) -> float:
    """Mean diagonal of the centred linear kernel from the Gram matrix G = X X^T (so every block's weight is on one
    scale)."""
    g = G.mean(1)
    return max(float(np.mean(np.diag(G) - 2 * g + g.mean())), 1e-12)


def _group_folds(groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds over unique groups (leave-one-group-out when there are at most k groups)."""
    u = np.unique(groups)
    if len(u) < 2:
        raise ConfigError(f"the readout needs at least 2 training drugs, got {len(u)}", field="readout",
                          hint="give more training drugs")
    k = min(k, len(u))
    fold_of = dict(zip(np.random.default_rng(seed).permutation(u), np.arange(len(u)) % k, strict=True))
    f = np.array([fold_of[g] for g in groups])
    return [(np.flatnonzero(f != j), np.flatnonzero(f == j)) for j in range(k)]


def _row_pearson(P: np.ndarray, Y: np.ndarray) -> list[float]:
    """Pearson per row (a constant prediction scores 0, as the benchmarks score it)."""
    Pc, Yc = P - P.mean(1, keepdims=True), Y - Y.mean(1, keepdims=True)
    den = np.sqrt((Pc * Pc).sum(1) * (Yc * Yc).sum(1))
    return list(np.where(den > 0, (Pc * Yc).sum(1) / np.where(den > 0, den, 1), 0.0))
