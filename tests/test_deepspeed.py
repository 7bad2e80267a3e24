"""DeepSpeed ZeRO on DeepSpeed's CPU path (DS_ACCELERATOR=cpu, gloo), 2 real processes, no Ray: the sharded
checkpoint holds every rank's partition, so a restore continues exactly as the uninterrupted run; the weights
exported from the shards are the fp32 master weights. (The same code runs under Ray Train in
tests/test_pretrain.py::test_worker_killed_resumes_with_exact_sample_accounting;
on GPU it is the default backend.)"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

STEPS_BEFORE, STEPS_AFTER, B, G = 3, 3, 8, 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(rank: int, n: int, n_cells: int, n_drugs: int) -> list[dict]:
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(n):
        out.append({"expr": torch.randn(B, G, generator=g),
                    "cell_idx": torch.randint(0, n_cells, (B,), generator=g),
                    "drug_idx": torch.randint(0, n_drugs, (B,), generator=g),
                    "log_dose": torch.rand(B, generator=g) * 2 - 1})
    return out


def _engine(stage: int, bf16: bool, total: int):
    from scpert_dist.model.config import model_config
    from scpert_dist.model.heads import PretrainModel
    from scpert_dist.train.distributed import wrap
    from scpert_dist.train.settings import Objective, OptimSection, ScalingSection
    from scpert_dist.train.step import make_optimizer

    torch.manual_seed(0)
    mcfg = model_config("tiny", n_genes=G, n_cells=5, n_drugs=4, dropout=0.0)
    model = PretrainModel(mcfg)
    scfg = (OptimSection(lr=3e-3, warmup_steps=2), Objective(mask_ratio=0.3))
    opt, sched = make_optimizer(model, scfg[0], total_steps=total)
    scaling = ScalingSection(backend="deepspeed", zero_stage=stage, bf16=bf16)
    engine, opt, sched, _, backend = wrap(model, opt, sched, scaling, batch_size=B, grad_clip=1.0)
    assert backend == "deepspeed"
    return engine, opt, sched, scfg, mcfg


def _run(engine, opt, sched, scfg, batches, step0: int, rank: int) -> None:
    from scpert_dist.train.step import train_step

    for i, b in enumerate(batches):
        g = torch.Generator().manual_seed(7 + (step0 + i) * 101 + rank)
        train_step(engine, b, opt, sched, *scfg, generator=g)


def _worker(rank: int, world: int, port: int, stage: int, bf16: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from scpert_dist.model.heads import PretrainModel
    from scpert_dist.train.distributed import ds_load, ds_save, full_fp32_state

    dist.init_process_group("gloo", rank=rank, world_size=world)
    total = STEPS_BEFORE + STEPS_AFTER
    engine, opt, sched, scfg, mcfg = _engine(stage, bf16, total)
    data = _batches(rank, total, mcfg.n_cells, mcfg.n_drugs)
    own = Path(out) / f"rank{rank}"  # each rank writes into its own folder, as each Ray Train worker does
    _run(engine, opt, sched, scfg, data[:STEPS_BEFORE], 0, rank)
    ds_save(engine, own)
    _run(engine, opt, sched, scfg, data[STEPS_BEFORE:], STEPS_BEFORE, rank)
    uninterrupted = full_fp32_state(engine)
    lr_a = opt.param_groups[0]["lr"]
    dist.barrier()
    if rank == 0:  # what Ray Train does on the storage: the rank folders become one checkpoint folder
        merged = Path(out) / "merged"
        for r in range(world):
            for f in (Path(out) / f"rank{r}").rglob("*"):
                if f.is_file():
                    dst = merged / f.relative_to(Path(out) / f"rank{r}")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(f.read_bytes())
    dist.barrier()
    # a fresh start from a different initialisation, restored from the merged checkpoint
    torch.manual_seed(123)
    engine2, opt2, sched2, scfg2, _ = _engine(stage, bf16, total)
    ds_load(engine2, Path(out) / "merged")
    _run(engine2, opt2, sched2, scfg2, data[STEPS_BEFORE:], STEPS_BEFORE, rank)
    resumed = full_fp32_state(engine2)
    if rank == 0:
        plain = PretrainModel(mcfg)
        plain.load_state_dict(resumed)  # the exported weights fit a plain (non-DeepSpeed) model
        torch.save({"a": uninterrupted, "b": resumed, "lr_a": lr_a, "lr_b": opt2.param_groups[0]["lr"],
                    "files": sorted(str(p.relative_to(Path(out) / "merged"))
                                    for p in (Path(out) / "merged").rglob("*.pt"))},
                   Path(out) / "result.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("stage,bf16", [(2, True), (3, True)])
def test_zero_sharded_checkpoint_restores_every_partition(tmp_path, stage, bf16):
    """Train 3 steps, save (each rank its own folder), train 3 more; then fresh engines from another
    initialisation load the merged checkpoint and train the same 3 steps: the fp32 master weights and the LR are
    identical to the uninterrupted run's. With only rank 0's optimizer shard restored, rank 1's half of the Adam
    moments would be missing (DeepSpeed refuses) or wrong, and the weights would differ."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_worker, args=(world, _free_port(), stage, bf16, str(tmp_path)), nprocs=world, join=True)
    res = torch.load(tmp_path / "result.pt", weights_only=True)
    files = res["files"]
    # one optimizer-state shard per rank (ZeRO-3: also one parameter shard per rank)
    assert sum("optim_states" in f for f in files) == world, files
    if stage == 3:
        assert sum("model_states" in f and "zero_pp_rank_" in f for f in files) == world, files
    assert res["a"].keys() == res["b"].keys()
    for k in res["a"]:
        assert res["a"][k].dtype == torch.float32
        assert torch.equal(res["a"][k], res["b"][k]), f"{k} differs after restore"
    assert res["lr_a"] == res["lr_b"]
    # the run trained: weights moved from the seed-0 initialisation
    torch.manual_seed(0)
    from scpert_dist.model.config import model_config
    from scpert_dist.model.heads import PretrainModel

    init = PretrainModel(model_config("tiny", n_genes=G, n_cells=5, n_drugs=4, dropout=0.0)).state_dict()
    assert any(not torch.allclose(init[k], res["a"][k]) for k in res["a"]), "no weight changed"


def test_restore_refuses_a_checkpoint_with_foreign_pickles(tmp_path):
    """A .pt in a DeepSpeed checkpoint that needs an arbitrary global is refused before DeepSpeed's loader (which
    unpickles without weights_only) sees it; the error names the file."""
    from scpert_dist.errors import CheckpointError
    from scpert_dist.train.distributed import check_pickles

    d = tmp_path / "deepspeed" / "zero"
    d.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, d / "mp_rank_00_model_states.pt")
    check_pickles(tmp_path / "deepspeed")  # tensors only: fine
    torch.save({"w": torch.zeros(2), "evil": socket.socket}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="weights_only") as e:
        check_pickles(tmp_path / "deepspeed")
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in str(e.value)
