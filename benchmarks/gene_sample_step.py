"""CPU time of one pretraining step (plain torch, no Ray) with every gene token vs 256 sampled gene tokens per step
(objective.gene_sample), measured side by side: interleaved, 3 repeats, the minimum of each.
Run: python benchmarks/gene_sample_step.py"""

import time

import torch

from scpert_dist.model.config import model_config
from scpert_dist.model.heads import PretrainModel
from scpert_dist.train.settings import Objective, OptimSection
from scpert_dist.train.step import make_optimizer, train_step


def cpu_s_per_step(gene_sample: int, x: torch.Tensor, steps: int = 4) -> float:
    torch.manual_seed(0)
    m = PretrainModel(model_config("tiny", n_genes=x.shape[1]))
    optim, objective = OptimSection(), Objective(tasks="mask", gene_sample=gene_sample)
    opt, sched = make_optimizer(m, optim, total_steps=10)
    g = torch.Generator().manual_seed(0)
    train_step(m, {"expr": x}, opt, sched, optim, objective, g)  # warm-up
    t = time.process_time()
    for _ in range(steps):
        train_step(m, {"expr": x}, opt, sched, optim, objective, g)
    return (time.process_time() - t) / steps


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(64, 978)
    res: dict[int, list[float]] = {0: [], 256: []}
    for _ in range(3):
        for gs in res:
            res[gs].append(cpu_s_per_step(gs, x))
    for gs, v in res.items():
        print(f"gene_sample={gs}: {min(v):.3f} CPU-s/step (min of 3), batch 64, tiny, 978-gene panel, 1 thread")
    print(f"ratio all genes / 256 sampled: {min(res[0]) / min(res[256]):.1f}x")


if __name__ == "__main__":
    main()
