"""Small conditional VAE baseline: encoder/decoder MLPs on log-normalised cells, conditioned on the drug's Morgan
fingerprint, a one-hot cell line and log10 dose (controls: zero fingerprint, dose 0). Prediction: decode z ~ N(0, I)
under the test condition (drug fingerprint is the only handle on unseen drugs)."""
from __future__ import annotations

import numpy as np

from ... import schema as S
from ...data.drugs import morgan_fingerprints
from ..predictor import Condition, FitContext


class CvaePredictor:
    name = "cvae"

    def __init__(self, latent: int = 16, hidden: int = 128, epochs: int = 30, lr: float = 2e-3,
                 n_bits: int = 256, batch: int = 128, beta: float = 0.5):
        self.latent, self.hidden, self.epochs, self.lr = latent, hidden, epochs, lr
        self.n_bits, self.batch, self.beta = n_bits, batch, beta
        self.losses: list[float] = []

    def _cond(self, smiles: list[str], lines: list[str], doses: np.ndarray) -> np.ndarray:
        uniq = sorted({s for s in smiles if s})
        fps = dict(zip(uniq, morgan_fingerprints(uniq, n_bits=self.n_bits).astype(np.float32), strict=True))
        zero = np.zeros(self.n_bits, np.float32)
        fp = np.stack([fps[s] if s else zero for s in smiles])
        oh = np.zeros((len(lines), len(self.lines)), np.float32)
        for i, ln in enumerate(lines):
            if ln in self.lines:
                oh[i, self.lines.index(ln)] = 1
        dz = np.where(doses > 0, np.log10(doses + 1e-3) + 4, 0.0)[:, None].astype(np.float32)
        return np.concatenate([fp, oh, dz], 1)

    def fit(self, train, ctx: FitContext):
        import torch
        from torch import nn

        torch.manual_seed(ctx.seed)
        o = train.obs
        self.lines = sorted(o[S.OBS_CELL_LINE].astype(str).unique())
        X = torch.tensor(S.dense(train.X), dtype=torch.float32)
        smiles = ["" if c else str(s) for s, c in zip(o[S.OBS_SMILES], o[S.OBS_CONTROL].to_numpy(bool), strict=True)]
        C = torch.tensor(self._cond(smiles, list(o[S.OBS_CELL_LINE].astype(str)), o[S.OBS_DOSE].to_numpy(float)))
        g, c, h, z = X.shape[1], C.shape[1], self.hidden, self.latent
        self.enc = nn.Sequential(nn.Linear(g + c, h), nn.ReLU(), nn.Linear(h, 2 * z))
        self.dec = nn.Sequential(nn.Linear(z + c, h), nn.ReLU(), nn.Linear(h, g))
        opt = torch.optim.Adam([*self.enc.parameters(), *self.dec.parameters()], lr=self.lr)
        gen = torch.Generator().manual_seed(ctx.seed)
        self.losses = []
        for _ in range(self.epochs):
            perm, tot = torch.randperm(len(X), generator=gen), 0.0
            for i in range(0, len(X), self.batch):
                b = perm[i:i + self.batch]
                mu, lv = self.enc(torch.cat([X[b], C[b]], 1)).chunk(2, 1)
                zz = mu + torch.randn_like(mu) * (0.5 * lv).exp()
                rec = ((self.dec(torch.cat([zz, C[b]], 1)) - X[b]) ** 2).sum(1).mean()
                kl = (-0.5 * (1 + lv - mu ** 2 - lv.exp()).sum(1)).mean()
                loss = rec + self.beta * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(b)
            self.losses.append(tot / len(X))
        return self

    def predict(self, controls, cond: Condition, n_cells: int, rng) -> np.ndarray:
        import torch

        c = torch.tensor(self._cond([cond.smiles], [cond.cell_line], np.array([cond.dose_um])))
        z = torch.tensor(rng.standard_normal((n_cells, self.latent)), dtype=torch.float32)
        with torch.no_grad():
            out = self.dec(torch.cat([z, c.expand(n_cells, -1)], 1)).numpy()
        return np.clip(out.astype(np.float64), 0, None)
