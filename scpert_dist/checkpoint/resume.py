"""The resume state of a pretraining run under Ray Train (DDP or DeepSpeed ZeRO): what a checkpoint holds, how a
restarted worker or a `--resume` run restores it, and the run folder's index of persisted checkpoints.

A checkpoint folder holds
  state.pt          step, epoch, seed, backend and the ids of every row consumed so far in the current epoch by ALL
                    workers; under DDP also the model, optimizer and scheduler states (the same on every rank)
  history.json      the logged step metrics and the per-epoch row counts of finished epochs
  deepspeed/        under DeepSpeed: every rank's ZeRO partition, written by the engine (train/distributed.py)
  scpert_ckpt.json  step + a unique token, so the run folder's index can name the persisted folder
A restore skips exactly the consumed ids, so within an epoch no row is lost and only rows consumed after the last
checkpoint (at most one checkpoint interval) are seen twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..train.distributed import ds_load, ds_save, is_deepspeed

STATE, HISTORY = "state.pt", "history.json"
CKPT_TOKEN = "scpert_ckpt.json"
CKPT_INDEX = "scpert_checkpoints.jsonl"


@dataclass
class Progress:
    """Where training stands; the part of the resume state every rank keeps."""

    step: int = 0
    epoch: int = 0
    consumed: set[int] = field(default_factory=set)
    """Row ids consumed in the current epoch (this worker's; after a restore, every worker's)."""
    history: list[dict] = field(default_factory=list)
    """Logged step metrics (rank 0)."""
    samples_per_epoch: dict[str, int] = field(default_factory=dict)
    """Training rows consumed in each finished epoch, all workers."""


@dataclass
class Restored:
    """An opened checkpoint: the progress to continue from and what restores the weights."""

    progress: Progress
    backend: str
    folder: Path
    state: dict


# ------------------------------------------------------------------------------------------------------ restore

def index_checkpoint(run_dir: str, step: int, token: str) -> None:
    """Record where Ray persisted the checkpoint just reported (report() uploads synchronously, so it is complete).

    Ray Train registers a reported checkpoint only when its controller next polls the workers; a worker that dies
    right after a report can take that registration with it, and the restart then restores an older checkpoint
    (seen in CI: restored at step 4 although step 8 was persisted, 192 rows repeated instead of <= 128). This index,
    in the run folder on the shared storage, lets the restarted workers find the newest complete checkpoint."""
    rd = Path(run_dir)
    if not rd.is_dir():
        return  # remote storage (URI): Ray's own registration only
    for f in rd.glob(f"checkpoint_*/{CKPT_TOKEN}"):
        try:
            if json.loads(f.read_text()).get("token") == token:
                with open(rd / CKPT_INDEX, "a") as fh:
                    fh.write(json.dumps({"step": step, "dir": f.parent.name}) + "\n")
                return
        except (OSError, ValueError):
            continue


def _step_of(d: Path) -> int:
    try:
        return int(json.loads((d / CKPT_TOKEN).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def newest_checkpoint(ray_ckpt, run_dir: str):
    """Ray's restored checkpoint, or a newer complete one from the run folder's index (see `index_checkpoint`)."""
    import ray.train

    best, best_step = ray_ckpt, -1
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            best_step = _step_of(Path(d))
    index = Path(run_dir) / CKPT_INDEX
    if index.is_file():
        for line in index.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            d = Path(run_dir) / rec["dir"]
            if rec["step"] > best_step and (d / STATE).is_file() and _step_of(d) == rec["step"]:
                best, best_step = ray.train.Checkpoint.from_directory(str(d)), rec["step"]
    return best


@contextmanager
def opened(ray_ckpt, run_dir: str, backend: str) -> Iterator[Restored | None]:
    """The newest checkpoint of the run, opened (None for a fresh start). CheckpointError when another backend wrote
    it. The weights are restored by `restore_weights` inside the `with` block."""
    import torch


    ckpt = newest_checkpoint(ray_ckpt, run_dir)
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        st = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
        saved = st.get("backend", "ddp")  # checkpoints from before DeepSpeed support are DDP's
        if saved != backend:
            raise CheckpointError(f"the checkpoint was written by backend '{saved}', this run uses '{backend}'",
                                  path=str(d), field="scaling.backend", hint=f"resume with scaling.backend={saved}")
        prog = Progress(step=int(st["step"]), epoch=int(st["epoch"]), consumed=set(st["consumed"].tolist()))
        hist_file = Path(d) / HISTORY
        if hist_file.exists():
            h = json.loads(hist_file.read_text())
            prog.history, prog.samples_per_epoch = h["history"], h["samples_per_epoch"]
        yield Restored(progress=prog, backend=saved, folder=Path(d), state=st)


def restore_weights(point: Restored, model, opt, sched) -> None:
    """DeepSpeed: every rank restores its own ZeRO partition (+ optimizer and scheduler); DDP: the full states."""
    if is_deepspeed(model):
        ds_load(model, point.folder)
        return
    getattr(model, "module", model).load_state_dict(point.state["model"])
    opt.load_state_dict(point.state["optim"])
    sched.load_state_dict(point.state["sched"])


# --------------------------------------------------------------------------------------------------------- save

def all_consumed(consumed: set[int], world: int) -> set[int]:
    """Collective: the union of every worker's consumed ids."""
    if world == 1:
        return set(consumed)
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, sorted(consumed))
    return set().union(*map(set, parts))


def write_state(folder: Path, prog: Progress, union: set[int], *, model, opt, sched, backend: str, seed: int,
                rank: int) -> None:
    """Collective under DeepSpeed (every rank writes its partition into `folder`); rank 0 writes state.pt,
    history.json and the token file."""
    import torch


    ds = is_deepspeed(model)
    if ds:
        ds_save(model, folder)
    if rank != 0:
        return
    st = {"step": prog.step, "epoch": prog.epoch, "seed": seed, "backend": backend,
          "consumed": torch.tensor(sorted(union), dtype=torch.int64)}
    if not ds:
        st.update(model=getattr(model, "module", model).state_dict(), optim=opt.state_dict(),
                  sched=sched.state_dict())
    torch.save(st, folder / STATE)
    (folder / HISTORY).write_text(json.dumps({"history": prog.history, "samples_per_epoch": prog.samples_per_epoch}))


def report(folder: Path | None, metrics: dict, *, step: int, run_dir: str, rank: int, world: int, ds: bool) -> None:
    """Hand the checkpoint folder (None on ranks without one) to Ray Train, then index it in the run folder."""
    import ray.train

    token = f"{step}-{os.getpid()}-{time.time_ns()}"
    if rank == 0:
        (folder / CKPT_TOKEN).write_text(json.dumps({"step": step, "token": token}))
    if folder is not None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    else:
        ray.train.report(metrics)
    if ds and world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's partition is uploaded (report() is synchronous) before the index names it
    if rank == 0:
        index_checkpoint(run_dir, step, token)
