"""Finetune loop (plain PyTorch, no Ray needed): random (control cell, perturbed cell) pairs per step, MSE
(+ optional energy-distance term), validation on VALIDATION drugs only, best epoch kept, MLflow tracking."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import schema as S
from ..config import flatten, to_dict
from ..errors import CheckpointError, ConfigError, InputFileError, SplitError
from .config import FinetuneConfig

MODEL_FILE, META_FILE = "model.safetensors", "scpert_finetune.json"


@dataclass
class FinetuneResult:
    run_id: str | None
    model_dir: Path
    history: list[dict] = field(default_factory=list)
    val_metrics: dict = field(default_factory=dict)
    n_transferred: int = 0


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float32)


def load_adata(data):
    import anndata as ad

    if isinstance(data, ad.AnnData):
        return data
    p = Path(data)
    if not p.is_file():
        raise InputFileError("data file not found", path=str(p), hint="pass an h5ad written by `scpert data sciplex/simulate`")
    a = ad.read_h5ad(p)
    for c in (S.OBS_DRUG, S.OBS_CELL_LINE, S.OBS_DOSE, S.OBS_CONTROL):
        if c not in a.obs:
            raise InputFileError(f"obs column {c!r} missing", path=str(p), field=c, hint="see scpert_dist/schema.py")
    return a


def resolve_pretrained(spec: str, tracking: str | None = None) -> Path | None:
    """'none' -> None; an existing folder -> itself; otherwise an MLflow run id whose artifact 'model/' is fetched."""
    if not spec or spec.lower() in ("none", "scratch"):
        return None
    p = Path(spec)
    if p.is_dir():
        return p
    import mlflow

    if tracking:
        mlflow.set_tracking_uri(tracking)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=spec, artifact_path="model"))
    except Exception as e:  # noqa: BLE001 - mlflow raises many types
        raise CheckpointError(f"pretrained {spec!r} is neither a checkpoint folder nor an MLflow run with a "
                              f"'model/' artifact ({e})", field="pretrained",
                              hint="pass a run id from `scpert pretrain`, a checkpoint dir, or 'none'") from e


_RESOLVE = object()


def build_model(cfg: FinetuneConfig, genes: list[str], cells: list[str], drugs: list[str], feat_dim: int,
                src=_RESOLVE):
    """Returns (FinetuneModel, n genes transferred from the pretrained encoder, encoder ModelConfig dict).
    `src`: the pretrained checkpoint folder (or None = scratch) when the caller already resolved cfg.pretrained."""
    import dataclasses

    from ..checkpoint import load_pretrained, transfer_gene_embeddings
    from ..model.config import model_config
    from ..model.encoder import GeneTokenEncoder
    from .model import FinetuneModel

    if src is _RESOLVE:
        src = resolve_pretrained(cfg.pretrained, cfg.tracking)
    n_tr = 0
    if src is None:
        mcfg = model_config(cfg.model.preset, n_genes=len(genes))
        enc = GeneTokenEncoder(mcfg)
    else:
        pre, pcfg, info = load_pretrained(src)
        mcfg = dataclasses.replace(pcfg, n_genes=len(genes), n_cells=0, n_drugs=0)
        enc = GeneTokenEncoder(mcfg)
        sd = {k: v for k, v in pre.encoder.state_dict().items() if not k.startswith("gene_emb")}
        enc.load_state_dict(sd, strict=False)
        n_tr = transfer_gene_embeddings(pre.encoder, info["genes"], enc, genes)
        print(f"pretrained encoder from {src}: {n_tr}/{len(genes)} gene embeddings transferred, "
              f"{len(genes) - n_tr} new genes initialised fresh")
    m = FinetuneModel(enc, n_genes=len(genes), n_cells=len(cells), decoder=cfg.model.decoder,
                      gene_block=cfg.model.gene_block, drug_rep=cfg.model.drug_rep, n_drugs=len(drugs),
                      drug_feat_dim=feat_dim, cond_hidden=cfg.model.cond_hidden, shift_head=cfg.model.shift_head)
    return m, n_tr, dataclasses.asdict(mcfg)


class Prepared:
    """Arrays + vocabularies for one AnnData and split column."""

    def __init__(self, adata, split: str, drug_rep: str):
        from .drugrep import features

        obs = adata.obs
        if split not in obs:
            raise SplitError(f"split column {split!r} not in obs", field=split,
                             hint=f"columns: {[c for c in obs if c.startswith(S.SPLIT_PREFIX)]}")
        self.X = _dense(adata.X)
        self.genes = [str(g) for g in adata.var_names]
        self.ctl = obs[S.OBS_CONTROL].to_numpy(bool)
        self.split = obs[split].astype(str).to_numpy()
        self.drug = obs[S.OBS_DRUG].astype(str).to_numpy()
        self.cell = obs[S.OBS_CELL_LINE].astype(str).to_numpy()
        self.dose = obs[S.OBS_DOSE].to_numpy(np.float32)
        smi = obs[S.OBS_SMILES].astype(str).to_numpy() if S.OBS_SMILES in obs else np.array([""] * len(obs))
        self.cells = sorted(set(self.cell))
        train_drugs = sorted(set(self.drug[(~self.ctl) & (self.split == "train")]))
        self.drugs = train_drugs
        self.smiles = {d: s for d, s in zip(self.drug, smi, strict=False) if not d == S.CONTROL_NAME and s}
        self.cell_idx = np.array([self.cells.index(c) for c in self.cell], np.int64)
        dpos = {d: i for i, d in enumerate(self.drugs)}
        self.drug_idx = np.array([dpos.get(d, 0) for d in self.drug], np.int64)
        self.rep = drug_rep
        self.lincs_missing: list[str] = []
        if drug_rep == "lincs":
            self.feat, self.feat_dim = {}, 0  # filled by set_lincs_features (needs the pretrained encoder)
        elif drug_rep != "learned":
            names = sorted(set(self.drug[~self.ctl]))
            f = features(drug_rep, [self.smiles.get(n, "") for n in names])
            self.feat = {n: f[i] for i, n in enumerate(names)}
            self.feat_dim = f.shape[1]
        else:
            self.feat, self.feat_dim = {}, 0
        self.ctl_by_line = {c: np.flatnonzero(self.ctl & (self.cell == c)) for c in self.cells}
        self.train_rows = np.flatnonzero((~self.ctl) & (self.split == "train"))
        self.valid_rows = np.flatnonzero((~self.ctl) & (self.split == "valid"))
        if len(self.train_rows) == 0:
            raise SplitError(f"no treated 'train' cells in {split!r}", field=split)

    def set_lincs_features(self, pretrained_dir, shards_dir) -> None:
        from .drugrep import lincs_features

        names = sorted(set(self.drug[~self.ctl]))
        self.feat, self.lincs_missing = lincs_features(pretrained_dir, shards_dir,
                                                       {n: self.smiles.get(n, "") for n in names})
        if not self.feat:
            raise ConfigError("drug_rep='lincs': none of the data's drugs has a LINCS signature in the shards",
                              field="lincs_shards", hint="check the shard folder, or use drug_rep=morgan")
        self.feat_dim = len(next(iter(self.feat.values())))
        if self.lincs_missing:
            import warnings

            warnings.warn(f"drug_rep='lincs': {len(self.lincs_missing)} of {len(names)} drugs have no LINCS signature "
                          f"(e.g. {self.lincs_missing[:3]}) and get a zero drug vector", UserWarning, stacklevel=2)

    def drug_input(self, names, rows=None):
        import torch

        if self.rep == "learned":
            pos = {d: i for i, d in enumerate(self.drugs)}
            return torch.tensor([pos.get(n, 0) for n in names], dtype=torch.long)
        return torch.tensor(np.stack([self.feat.get(n, np.zeros(self.feat_dim, np.float32)) for n in names]))


def sample_controls(prep: Prepared, lines, rng) -> np.ndarray:
    return np.array([rng.choice(prep.ctl_by_line[c]) for c in lines])


def condition_groups(prep: Prepared, rows: np.ndarray) -> dict[tuple, np.ndarray]:
    g: dict[tuple, list] = {}
    for r in rows:
        g.setdefault((prep.drug[r], prep.cell[r], float(prep.dose[r])), []).append(r)
    return {k: np.array(v) for k, v in g.items()}


def encode_pool(model, X: np.ndarray, chunk: int = 32):
    """Encoder token states [N, G, d] of control cells X [N, G], computed once under no_grad in chunks."""
    import torch

    was = model.encoder.training
    model.encoder.eval()
    with torch.no_grad():
        h = torch.cat([model.encode(torch.from_numpy(np.ascontiguousarray(X[i:i + chunk])))
                       for i in range(0, len(X), chunk)])
    model.encoder.train(was)
    return h


class ControlPool:
    """A fixed pool of up to `size` control cells per line, with their encoder states cached (frozen encoder)."""

    def __init__(self, model, prep: Prepared, size: int, rng):
        self.rows = {c: np.sort(rng.choice(r, size=min(size, len(r)), replace=False))
                     for c, r in prep.ctl_by_line.items()}
        self.lines = list(self.rows)
        self.offset, o = {}, 0
        for c in self.lines:
            self.offset[c], o = o, o + len(self.rows[c])
        self.all_rows = np.concatenate([self.rows[c] for c in self.lines])
        self.X = prep.X[self.all_rows]
        self.h = None
        self.refresh(model)

    def refresh(self, model):
        h = encode_pool(model, self.X)
        # padded to whole gene blocks once here, not in every step
        self.h = model.decoder.pad(h) if model.decoder.sequential else h

    def sample(self, line: str, n: int, rng) -> np.ndarray:
        """Indices into the pool for n cells of `line`."""
        return self.offset[line] + rng.integers(0, len(self.rows[line]), size=n)


def logfc_pearson_groups(model, prep: Prepared, rows: np.ndarray, rng, n_cells: int = 64, pool=None,
                         chunk: int = 512) -> float:
    """Mean over conditions of Pearson(pred mean - control mean, true mean - control mean); with a ControlPool
    the predictions use its cached encoder states (fast, conditions batched), else the full model on sampled
    control cells of the line."""
    import torch

    groups = condition_groups(prep, rows)
    keys = list(groups)
    if not keys:
        return float("nan")
    drug = np.repeat([k[0] for k in keys], n_cells)
    line = np.repeat([k[1] for k in keys], n_cells)
    dose = torch.from_numpy(np.repeat(np.array([k[2] for k in keys], np.float32), n_cells))
    cidx = torch.tensor([prep.cells.index(c) for c in line])
    if pool is not None:
        pi = np.concatenate([pool.sample(k[1], n_cells, rng) for k in keys])
        Xc = pool.X[pi]
    else:
        Xc = prep.X[np.concatenate([rng.choice(prep.ctl_by_line[k[1]], size=n_cells) for k in keys])]
    preds = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(drug), chunk):
            sl = slice(i, i + chunk)
            ctrl = torch.from_numpy(Xc[sl])
            if pool is not None:
                preds.append(model.head(pool.h[torch.from_numpy(pi[sl])], ctrl, prep.drug_input(drug[sl]),
                                        cidx[sl], dose[sl]).numpy())
            else:
                preds.append(model(ctrl, prep.drug_input(drug[sl]), cidx[sl], dose[sl]).numpy())
    model.train()
    if pool is not None and not any(p.requires_grad for p in model.encoder.parameters()):
        model.encoder.eval()
    pm = np.concatenate(preds).reshape(len(keys), n_cells, -1).mean(1)
    cm = {c: prep.X[r].mean(0) for c, r in prep.ctl_by_line.items()}
    scores = []
    for j, k in enumerate(keys):
        a, b = pm[j] - cm[k[1]], prep.X[groups[k]].mean(0) - cm[k[1]]
        if a.std() > 0 and b.std() > 0:
            scores.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(scores)) if scores else float("nan")


def warm_start_shift(model, prep: Prepared, groups: dict, true_lfc, sd, cfg, vgroups: dict | None = None) -> dict:
    """Full-batch training of the drug encoder, dose gate and low-rank shift head on the training CONDITION MEANS
    (cheap: no per-cell decoder); the best state by validation-condition logFC Pearson is kept."""
    import torch

    keys = list(groups)

    def inputs(ks):
        names = sorted({k[0] for k in ks})
        pos = {n: i for i, n in enumerate(names)}
        return (prep.drug_input(names), torch.tensor([pos[k[0]] for k in ks]),
                torch.tensor([prep.cells.index(k[1]) for k in ks]), torch.tensor([k[2] for k in ks], dtype=torch.float32))

    def shift(inp):  # the drug encoder runs once per unique drug, not once per condition
        de = model.drug(inp[0])[inp[1]]
        return model.shift(de, inp[2], inp[3])

    tr = inputs(keys)
    params = [*model.drug.parameters(), *model.shift.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.cond_lr, weight_decay=cfg.weight_decay)
    if vgroups:
        vk = list(vgroups)
        va = inputs(vk)
        cm = {c: prep.X[r].mean(0) for c, r in prep.ctl_by_line.items()}
        vt = torch.from_numpy(np.stack([prep.X[vgroups[k]].mean(0) - cm[k[1]] for k in vk]))
    best, best_state, rec = -np.inf, None, {"cond_steps": 0}
    for step in range(cfg.cond_steps):
        loss = (((shift(tr) - true_lfc) / sd) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if vgroups and (step % 10 == 9 or step == cfg.cond_steps - 1):
            with torch.no_grad():
                p = shift(va)
                pc, tc = p - p.mean(1, keepdim=True), vt - vt.mean(1, keepdim=True)
                r = float(((pc * tc).sum(1) / (pc.norm(dim=1) * tc.norm(dim=1)).clamp_min(1e-12)).mean())
            if r > best:
                best, best_state = r, {k: v.detach().clone() for k, v in model.state_dict().items()}
                rec = {"cond_steps": step + 1, "cond_val_logfc_pearson": r, "cond_train_loss": float(loss.detach())}
    if best_state is not None:
        model.load_state_dict(best_state)
    return rec


def save_model(out: Path, model, meta: dict) -> Path:
    import tempfile

    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp_ft_"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run_finetune(cfg: FinetuneConfig, adata=None, *, log_mlflow: bool = True) -> FinetuneResult:
    import torch

    from .model import energy_distance

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    a = load_adata(adata if adata is not None else cfg.data)
    prep = Prepared(a, cfg.split, cfg.model.drug_rep)
    test_drugs = set(prep.drug[(~prep.ctl) & (prep.split == "test")])
    assert not (set(prep.drug[prep.valid_rows]) & test_drugs), "validation rows include a test drug"
    if cfg.model.drug_rep == "learned":
        import warnings

        unseen = sorted(set(prep.drug[~prep.ctl]) - set(prep.drugs))
        if unseen:
            warnings.warn(f"drug_rep='learned' is a lookup table: {len(unseen)} drugs not in training "
                          f"(e.g. {unseen[:3]}) get an untrained vector and cannot be predicted from their "
                          "structure; use drug_rep='morgan' for unseen drugs", UserWarning, stacklevel=2)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    src = resolve_pretrained(cfg.pretrained, cfg.tracking)  # once: an MLflow run id means a download
    if cfg.model.drug_rep == "lincs":
        if src is None or not cfg.lincs_shards:
            raise ConfigError("drug_rep='lincs' encodes each drug's LINCS signature with the pretrained encoder",
                              field="pretrained" if src is None else "lincs_shards",
                              hint="give pretrained=RUN|DIR and lincs_shards=DIR (from `scpert data lincs`)")
        prep.set_lincs_features(src, cfg.lincs_shards)
    model, n_tr, mcfg = build_model(cfg, prep.genes, prep.cells, prep.drugs, prep.feat_dim, src=src)
    frozen = cfg.model.freeze_encoder
    if frozen:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    t_pool = time.perf_counter()
    pool = ControlPool(model, prep, cfg.model.control_pool, rng)
    t_pool = time.perf_counter() - t_pool
    print(f"finetune: {len(prep.train_rows)} train cells, {len(prep.drugs)} train drugs, control pool "
          f"{len(pool.all_rows)} cells encoded in {t_pool:.1f}s, encoder {'frozen (cached states)' if frozen else 'trained'}",
          flush=True)
    if frozen:
        model.encoder.eval()
    # standardised targets: genes weighted by 1/sd of control expression (pooled over lines)
    sd = torch.from_numpy(np.maximum(prep.X[prep.ctl].std(0), 0.05).astype(np.float32))
    groups = condition_groups(prep, prep.train_rows)
    gkeys = list(groups)
    ctl_mean = {c: prep.X[r].mean(0) for c, r in prep.ctl_by_line.items()}
    true_lfc = torch.from_numpy(np.stack([prep.X[groups[k]].mean(0) - ctl_mean[k[1]] for k in gkeys]))
    t_w = time.perf_counter()
    warm = {}
    if model.shift is not None and cfg.cond_steps > 0:
        vgroups = condition_groups(prep, prep.valid_rows) if len(prep.valid_rows) else None
        warm = warm_start_shift(model, prep, groups, true_lfc, sd, cfg, vgroups)
        print(f"finetune: shift-head warm start on {len(gkeys)} condition means: {warm} "
              f"({time.perf_counter() - t_w:.1f}s)", flush=True)
    k_cells = max(1, min(cfg.cells_per_cond, cfg.batch))
    n_cond = max(1, cfg.batch // k_cells)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    run_id = None
    if log_mlflow:
        import mlflow

        from ..tracking import use_experiment

        use_experiment(cfg.experiment, cfg.tracking)
        run = mlflow.start_run()
        run_id = run.info.run_id
        mlflow.log_params({k: str(v)[:250] for k, v in flatten(to_dict(cfg)).items()})
        mlflow.log_params({"n_genes": len(prep.genes), "genes_transferred": n_tr, "n_train_drugs": len(prep.drugs)})
        mlflow.log_metric("control_pool_encode_s", t_pool)
        mlflow.log_metrics({k: float(v) for k, v in warm.items()})
    history, best, best_state, step = [], -np.inf, None, 0
    if warm and len(prep.valid_rows):  # the warm-started model is a candidate too (epoch -1)
        best = logfc_pearson_groups(model, prep, prep.valid_rows, np.random.default_rng(cfg.seed + 1),
                                    n_cells=16, pool=pool)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"finetune: after warm start val logFC r {best:.3f}", flush=True)
    try:
        for ep in range(cfg.epochs):
            t0, losses = time.perf_counter(), []
            for _ in range(cfg.steps_per_epoch):
                if cfg.max_steps and step >= cfg.max_steps:
                    break
                ks = rng.choice(len(gkeys), size=n_cond)
                rows = np.concatenate([rng.choice(groups[gkeys[k]], size=k_cells) for k in ks])
                pi = np.concatenate([pool.sample(gkeys[k][1], k_cells, rng) for k in ks])
                ctrl = torch.from_numpy(pool.X[pi])
                h = pool.h[torch.from_numpy(pi)] if frozen else model.encode(ctrl)
                pred = model.head(h, ctrl, prep.drug_input(prep.drug[rows]), torch.from_numpy(prep.cell_idx[rows]),
                                  torch.from_numpy(prep.dose[rows]))
                tgt = torch.from_numpy(prep.X[rows])
                loss = (((pred - tgt) / sd) ** 2).mean()
                if cfg.cond_weight > 0:
                    shift = (pred - ctrl).view(n_cond, k_cells, -1).mean(1)
                    loss = loss + cfg.cond_weight * (((shift - true_lfc[torch.from_numpy(ks)]) / sd) ** 2).mean()
                if cfg.mmd_weight > 0:
                    loss = loss + cfg.mmd_weight * energy_distance(pred, tgt)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
            dt = time.perf_counter() - t0
            if not frozen:
                pool.refresh(model)
            val = logfc_pearson_groups(model, prep, prep.valid_rows, np.random.default_rng(cfg.seed + 1),
                                       n_cells=16, pool=pool)
            rec = {"epoch": ep, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "val_logfc_pearson": val, "epoch_s": dt, "steps": step}
            history.append(rec)
            print(f"epoch {ep}: loss {rec['train_loss']:.4f} val logFC r {val:.3f} ({dt:.1f}s)", flush=True)
            if log_mlflow:
                mlflow.log_metrics({k: v for k, v in rec.items() if k != "epoch" and np.isfinite(v)}, step=ep)
            score = val if np.isfinite(val) else -rec["train_loss"]
            if score > best:
                best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
            if cfg.max_steps and step >= cfg.max_steps:
                break
        model.load_state_dict(best_state)
        meta = {"config": to_dict(cfg), "encoder": mcfg, "genes": prep.genes, "cells": prep.cells,
                "drugs": prep.drugs, "smiles": prep.smiles, "drug_rep": prep.rep, "feat_dim": prep.feat_dim,
                "lincs_feat": {k: [float(x) for x in v] for k, v in prep.feat.items()} if prep.rep == "lincs" else {},
                "genes_transferred": n_tr, "history": history}
        out = save_model(Path(cfg.out), model, meta)
        best_rec = max(history, key=lambda r: r["val_logfc_pearson"] if np.isfinite(r["val_logfc_pearson"]) else -r["train_loss"])
        valm = {"val_logfc_pearson": best_rec["val_logfc_pearson"], "best_epoch": best_rec["epoch"]}
        if log_mlflow:
            mlflow.log_metrics({"best_val_logfc_pearson": valm["val_logfc_pearson"]} if np.isfinite(valm["val_logfc_pearson"]) else {})
            mlflow.log_artifacts(str(out), artifact_path="model")
            _plot_history(history, out.parent / "finetune_history.png")
            mlflow.log_artifact(str(out.parent / "finetune_history.png"), artifact_path="plots")
            mlflow.end_run()
    except BaseException:
        if log_mlflow:
            mlflow.end_run(status="FAILED")
        raise
    return FinetuneResult(run_id, out, history, valm, n_tr)


def _plot_history(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].plot([h["train_loss"] for h in history])
    ax[0].set_title("train loss")
    ax[1].plot([h["val_logfc_pearson"] for h in history])
    ax[1].set_title("val logFC Pearson (valid drugs)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
