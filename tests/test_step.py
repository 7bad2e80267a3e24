"""Plain-torch pretraining step: loss goes down on real L1000 rows, determinism given seed, mask-only grads."""
import numpy as np
import pytest
import torch

from scpert_dist.model.config import model_config
from scpert_dist.model.heads import PretrainModel
from scpert_dist.model.masking import random_mask
from scpert_dist.train.settings import Objective, OptimSection
from scpert_dist.train.step import make_optimizer, train_step


def _expr(shared_data=None, n=128, g=64) -> torch.Tensor:
    """Real level-5 L1000 rows (numeric gene columns) when available, else a seeded low-rank synthetic matrix."""
    if shared_data is not None:
        import pyarrow.parquet as pq
        t = pq.read_table(shared_data / "lincs" / "l1000_cmapR_modz_level5_n272x978.parquet").to_pandas()
        num = t.select_dtypes("number").iloc[:, -978:].to_numpy(np.float32)
        x = num[:n, :g]
    else:
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(n, 4)) @ rng.normal(size=(4, g))).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))


def _model(g: int, seed: int = 0):
    torch.manual_seed(seed)
    return PretrainModel(model_config("tiny", n_genes=g, dropout=0.0))


def _full_panel_loss_before_after(x, optim: OptimSection, objective: Objective, steps: int = 80,
                                  on_step=None) -> tuple[float, float]:
    """Masked-value loss on all of x (a fixed mask), before and after `steps` training steps on batches of 32."""
    m = _model(x.shape[1])
    opt, sched = make_optimizer(m, optim, total_steps=steps)
    fixed = random_mask(x.shape[0], x.shape[1], 0.3, generator=torch.Generator().manual_seed(99))

    def eval_loss():
        m.eval()
        with torch.no_grad():
            return m.loss(m(x, fixed), {"expr": x, "mask": fixed})[1]["loss"]

    before = eval_loss()
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        train_step(m, {"expr": x[i % 4 * 32:(i % 4 + 1) * 32]}, opt, sched, optim, objective, gen)
    return before, eval_loss()


@pytest.mark.shared_data
def test_loss_decreases_on_real_rows(shared_data):
    torch.set_num_threads(1)
    x = _expr(shared_data)
    before, after = _full_panel_loss_before_after(x, OptimSection(lr=3e-3, warmup_steps=5), Objective(mask_ratio=0.3))
    assert after < 0.9 * before, (before, after)


def test_deterministic_given_seed():
    x = _expr(None)

    def run():
        m = _model(x.shape[1], seed=1)
        optim, objective = OptimSection(), Objective()
        opt, sched = make_optimizer(m, optim, total_steps=5)
        gen = torch.Generator().manual_seed(7)
        return [train_step(m, {"expr": x[:32]}, opt, sched, optim, objective, gen)["loss"] for _ in range(5)]

    assert run() == run()


def test_grads_only_from_masked_positions():
    x = _expr(None, n=8).requires_grad_(False)
    m = _model(x.shape[1])
    m.eval()
    mask = random_mask(8, x.shape[1], 0.2, generator=torch.Generator().manual_seed(3))
    vals = x.clone().requires_grad_(True)
    out = m(vals, mask)
    loss, _ = m.loss(out, {"expr": x, "mask": mask})
    loss.backward()
    # masked inputs are replaced by the learned [MASK] vector, so their values get no gradient
    assert torch.all(vals.grad[mask] == 0)
    # changing targets at unmasked positions leaves the loss unchanged
    x2 = x.clone()
    x2[~mask] += 5.0
    loss2, _ = m.loss(out, {"expr": x2, "mask": mask})
    assert torch.allclose(loss, loss2)
    x3 = x.clone()
    x3[mask] += 5.0
    loss3, _ = m.loss(out, {"expr": x3, "mask": mask})
    assert not torch.allclose(loss, loss3)


def test_step_takes_the_optim_and_objective_sections():
    """One definition of each step setting: the step reads the pretraining config's optim section (lr, schedule,
    clipping) and objective section (mask ratio, gene sampling) as they are; an old-layout key names its new place."""
    from scpert_dist.config import load
    from scpert_dist.errors import ConfigError
    from scpert_dist.train.settings import PretrainConfig

    cfg = load(PretrainConfig, None, ["optim.lr=0.02", "optim.warmup_steps=3", "optim.grad_clip=0",
                                      "objective.mask_ratio=0.3"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.objective.mask_ratio) == (0.02, 3, 0.0, 0.3)
    for old, new in (("model.mask_ratio=0.3", "objective.mask_ratio"), ("model.tasks=mask", "objective.tasks"),
                     ("optim.gene_sample=64", "objective.gene_sample")):
        with pytest.raises(ConfigError, match=f"is now {new}"):
            load(PretrainConfig, None, [old])
    m = _model(16)
    opt, sched = make_optimizer(m, cfg.optim, total_steps=7)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        train_step(m, {"expr": _expr(None, n=8, g=16)}, opt, sched, cfg.optim, cfg.objective,
                   torch.Generator().manual_seed(0))
    # linear warmup over 3 steps, the peak, then cosine decay
    assert lrs[:4] == pytest.approx([0.02 / 3, 0.02 * 2 / 3, 0.02, 0.02]) and lrs[4] < 0.02


@pytest.mark.shared_data
def test_gene_sampled_steps_learn_the_full_panel(shared_data):
    """objective.gene_sample: each step reads a random quarter of the genes; the masked-value loss over ALL genes (what
    the finetuning encoder reads) still falls, and the draws cover the whole panel."""
    torch.set_num_threads(1)
    x = _expr(shared_data, g=256)
    optim, objective = OptimSection(lr=3e-3, warmup_steps=5), Objective(mask_ratio=0.3, gene_sample=64)
    seen = torch.zeros(x.shape[1], dtype=torch.bool)
    g2 = torch.Generator().manual_seed(0)

    def replay(_i):  # the step's own draws, from a generator in the same state
        seen[torch.randperm(x.shape[1], generator=g2)[:64]] = True
        random_mask(32, 64, 0.3, generator=g2)

    before, after = _full_panel_loss_before_after(x, optim, objective, on_step=replay)
    assert after < 0.95 * before, (before, after)  # measured 1.418 -> 1.322 (a quarter of the targets per step)
    assert seen.all()  # 80 steps of 64 of 256 genes cover the panel
