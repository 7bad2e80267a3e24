"""The resume state of a pretraining run (DDP or DeepSpeed ZeRO): what a checkpoint folder holds, reading and
writing it, and the run folder's index of persisted checkpoints. Files only: the trainer (train/trainer.py) owns the
engines (DeepSpeed writes and restores its partitions there) and reports the folders to Ray Train.

A checkpoint folder holds
  state.pt          step, epoch, seed, backend and `data`: the stream's cursor (data/shards/stream.py: per rank of the
                    epoch's plan its window, the rows taken from it and the rows consumed in the epoch, gathered
                    from ALL workers; its size depends on the world size, not on the rows); under DDP also the
                    model, optimizer and scheduler states (the same on every rank)
  history.json      the logged step metrics and the per-epoch row counts of finished epochs
  deepspeed/        under DeepSpeed: every rank's ZeRO partition, written by the engine (train/distributed.py:
                    ds_save, called by the trainer)
  scpert_ckpt.json  step + a unique token, so the run folder's index can name the persisted folder
A restore continues every worker's stream at its cursor (the same rows in the same order as without the
interruption), so within an epoch no row is lost and only rows consumed after the last checkpoint (at most one
checkpoint interval) are seen twice.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.shards.stream import Cursor
from ..errors import CheckpointError

STATE, HISTORY = "state.pt", "history.json"
CKPT_TOKEN = "scpert_ckpt.json"
CKPT_INDEX = "scpert_checkpoints.jsonl"


@dataclass
class Progress:
    """Where training stands; the part of the resume state every rank keeps."""

    step: int = 0
    epoch: int = 0
    cursor: Cursor | None = None
    """Where the current epoch's stream stands (this worker's plan ranks; after a restore, every worker's); None
    before the epoch's first batch."""
    stream_key: str | None = None
    """What the restored cursor was written for (ShardStream.key)."""
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


def newest_folder(restored: Path | None, run_dir: str) -> Path | None:
    """The checkpoint folder Ray Train restored (None: none), or a newer complete one from the run folder's index
    (see `index_checkpoint`)."""
    best, best_step = restored, (_step_of(Path(restored)) if restored is not None else -1)
    index = Path(run_dir) / CKPT_INDEX
    if index.is_file():
        for line in index.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            d = Path(run_dir) / rec["dir"]
            if rec["step"] > best_step and (d / STATE).is_file() and _step_of(d) == rec["step"]:
                best, best_step = d, rec["step"]
    return None if best is None else Path(best)


def read_state(folder: Path, backend: str) -> Restored:
    """The progress and (DDP) states of a checkpoint folder; CheckpointError when another backend wrote it. Each
    file is loaded with weights_only=True."""
    import torch

    st = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)
    saved = st.get("backend", "ddp")  # checkpoints from before DeepSpeed support are DDP's
    if saved != backend:
        raise CheckpointError(f"the checkpoint was written by backend '{saved}', this run uses '{backend}'",
                              path=str(folder), field="scaling.backend", hint=f"resume with scaling.backend={saved}")
    if len(st.get("consumed", ())):
        raise CheckpointError("the checkpoint records the row ids consumed mid-epoch (written by an earlier "
                              "version), not a stream cursor", path=str(folder), field="consumed",
                              hint="finish that run with the version that wrote it, or start a new run")
    data = st.get("data") or None
    prog = Progress(step=int(st["step"]), epoch=int(st["epoch"]),
                    cursor=Cursor.from_state(data) if data else None, stream_key=data["key"] if data else None)
    hist_file = Path(folder) / HISTORY
    if hist_file.exists():
        h = json.loads(hist_file.read_text())
        prog.history, prog.samples_per_epoch = h["history"], h["samples_per_epoch"]
    return Restored(progress=prog, backend=saved, folder=Path(folder), state=st)


# --------------------------------------------------------------------------------------------------------- save

def write_state(folder: Path, prog: Progress, cursor: Cursor | None, *, backend: str, seed: int,
                stream_key: str = "", states: dict | None = None) -> None:
    """state.pt (step, epoch, seed, backend, `data`: every worker's stream cursor, O(world); under DDP also `states`:
    the model, optimizer and scheduler states) and history.json. Written by rank 0."""
    import torch

    st = {"step": prog.step, "epoch": prog.epoch, "seed": seed, "backend": backend,
          "data": data_state(cursor, stream_key), **(states or {})}
    torch.save(st, folder / STATE)
    (folder / HISTORY).write_text(json.dumps({"history": prog.history, "samples_per_epoch": prog.samples_per_epoch}))


def data_state(cursor: Cursor | None, stream_key: str) -> dict:
    """The stream part of state.pt ({} at an epoch boundary)."""
    return cursor.to_state(stream_key) if cursor is not None and cursor.pos else {}


def write_token(folder: Path, step: int) -> str:
    """The token file that lets the run folder's index name this checkpoint once it is persisted; the token."""
    token = f"{step}-{os.getpid()}-{time.time_ns()}"
    (folder / CKPT_TOKEN).write_text(json.dumps({"step": step, "token": token}))
    return token
