"""What every Ray Train worker runs: a Trainer whose parts are named attributes, in phases.

    setup -> resume -> fit: for each epoch, for each batch: step (+ checkpoint) -> validate -> final checkpoint

The step itself is Ray-free (`train/step.py`); the resume state's files are `checkpoint/resume.py`'s (the trainer
has DeepSpeed write and restore its partitions and reports each checkpoint to Ray Train); the batches come from
`train/loader.py`, which starts each epoch's Ray Data stream ahead of use.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import schema as S
from ..checkpoint import resume as resume_state
from ..checkpoint import save_pretrained
from ..config import to_dict
from ..data.shards.stream import Cursor, ShardStream
from ..model.heads import PretrainModel, table1_metrics
from ..tracking import Tracker
from .callbacks import Callback, LoopState
from .distributed import ds_load, ds_save, full_fp32_state, gather_cursor, is_deepspeed, resolve_backend, wrap
from .loader import EpochLoader, quiet_ray_data
from .settings import PretrainConfig
from .step import make_optimizer, train_step


@dataclass
class WorkerPlan:
    """What every Ray Train worker is given (as it is: Ray pickles it into `train_loop_config`): the typed config
    and what the driver learnt before the workers start."""

    cfg: PretrainConfig
    info: dict
    """What the workers need of the shard manifest: n_genes, genes, gene_symbols, cells, drugs, semi_synthetic."""
    total_steps: int
    """Length of the LR schedule (and of the run, unless the data runs out first)."""
    run_dir: str
    """The Ray Train run folder (its checkpoint index)."""
    run_id: str | None = None
    """The MLflow run rank 0 logs into."""
    tracking_uri: str = ""
    callbacks: list[Callback] = field(default_factory=list)
    shards: str = ""
    """The shard folder every worker streams its own row groups of (data/shards/stream.py ShardStream)."""


def batch_to(batch: dict, device) -> dict:
    """A stream batch as the model's inputs, on `device`."""
    return {"expr": batch[S.EXPR].to(device, non_blocking=True).float(),
            "cell_idx": batch[S.CELL_IDX].to(device), "drug_idx": batch[S.DRUG_IDX].to(device),
            "log_dose": batch["log_dose"].to(device).float()}


def padding_batch(n_genes: int) -> dict:
    """One label-free row, for the zero-weight step of a worker whose partition ran out before it had any batch."""
    return {"uid": torch.zeros(1, dtype=torch.int64), S.EXPR: torch.zeros(1, n_genes),
            S.CELL_IDX: torch.full((1,), -1), S.DRUG_IDX: torch.full((1,), -1),
            "log_dose": torch.full((1,), float("nan"))}


@dataclass
class Clock:
    """Throughput bookkeeping of one worker."""

    t_start: float = 0.0
    setup_s: float = 0.0
    t_step: float = 0.0
    n_seen: int = 0


class Trainer:
    """One Ray Train worker's pretraining. Parts: `loader` (batches), `model`/`opt`/`sched` (wrapped for DDP or
    DeepSpeed), `progress` (the resume state), `tracker` (MLflow, rank 0), `callbacks`, `clock`."""

    def __init__(self, plan: WorkerPlan):
        self.plan, self.cfg, self.info = plan, plan.cfg, plan.info
        self.callbacks: list[Callback] = list(plan.callbacks)
        self.run_dir: str = plan.run_dir
        self.clock = Clock()
        self.tracker = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        """Runtime -> the newest checkpoint's progress -> the stream (started before the model is built, so its
        start-up overlaps the rest of the setup) -> model, optimizer and schedule, wrapped -> resume -> MLflow."""
        import ray.train


        t0 = time.perf_counter()
        self._runtime()
        with self._restored(ray.train.get_checkpoint()) as point:
            self.progress = point.progress if point else resume_state.Progress()
            self.loader = self._make_loader()
            self._build()
            if point:
                self.resume(point)
        if self.rank == 0 and self.plan.run_id:
            self.tracker = Tracker.attach(self.plan.tracking_uri, self.plan.run_id)
        self._emit("on_setup")
        self.clock.setup_s = time.perf_counter() - t0
        return self

    def _runtime(self) -> None:
        import ray.train


        quiet_ray_data()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        cores = os.cpu_count() or 2
        torch.set_num_threads(self.cfg.scaling.torch_threads or max(1, cores // max(1, min(self.world, cores))))
        torch.manual_seed(self.cfg.seed)
        self.mcfg = self.cfg.model.build(self.info["n_genes"], len(self.info["cells"]), len(self.info["drugs"]))

    def _build(self) -> None:
        model = PretrainModel(self.mcfg, self.cfg.objective.heads)
        opt, sched = make_optimizer(model, self.cfg.optim, self.plan.total_steps)
        self.model, self.opt, self.sched, self.device, self.backend = wrap(
            model, opt, sched, self.cfg.scaling, batch_size=self.cfg.optim.batch_size,
            grad_clip=self.cfg.optim.grad_clip)

    # ----------------------------------------------------------------------------------------------- resume
    @contextmanager
    def _restored(self, ray_ckpt) -> Iterator[resume_state.Restored | None]:
        """The newest checkpoint of the run, opened (None for a fresh start): the one Ray Train restored, or a newer
        complete one from the run folder's index. The weights are restored by `resume` inside the `with` block."""
        with ray_ckpt.as_directory() if ray_ckpt is not None else nullcontext(None) as d:
            folder = resume_state.newest_folder(Path(d) if d else None, self.run_dir)
            yield None if folder is None else resume_state.read_state(folder, resolve_backend(self.cfg.scaling))

    def resume(self, point: resume_state.Restored) -> None:
        """Weights, optimizer and schedule from the checkpoint (every rank its own ZeRO partition under DeepSpeed);
        the progress (step, epoch, stream cursor) was taken before the stream started, which continues there."""
        if self.ds:
            ds_load(self.model, point.folder)
        else:
            getattr(self.model, "module", self.model).load_state_dict(point.state["model"])
            self.opt.load_state_dict(point.state["optim"])
            self.sched.load_state_dict(point.state["sched"])
        p = self.progress
        if self.rank == 0:
            done = p.cursor.rows() if p.cursor and p.cursor.epoch == p.epoch else 0
            print(f"[pretrain] resumed at step {p.step}, epoch {p.epoch}, {done} rows of this epoch done")

    def _make_loader(self):
        """This worker's share of the shards (ShardStream), continued from the restored cursor."""
        c, p = self.cfg, self.progress
        self.stream = ShardStream(self.plan.shards, seed=c.seed, val_fraction=c.data.val_fraction,
                                  shuffle_buffer=c.data.shuffle_buffer,
                                  readers=max(1, math.ceil(c.scaling.cpus_per_worker)))
        self.stream.check(p.cursor, p.stream_key)
        return EpochLoader(self.stream, batch_size=c.optim.batch_size, rank=self.rank, world=self.world,
                           first=p.epoch, epochs=c.optim.epochs, start=p.cursor, overlap=c.data.overlap,
                           steps_left=max(1, c.optim.max_steps - self.progress.step) if c.optim.max_steps else 0)

    @property
    def ds(self) -> bool:
        return is_deepspeed(self.model)

    def _state(self) -> LoopState:
        return LoopState(rank=self.rank, world=self.world, step=self.progress.step, epoch=self.progress.epoch,
                         run_dir=self.run_dir)

    def _emit(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self._state(), *args)

    # -------------------------------------------------------------------------------------------------- fit
    def fit(self) -> None:
        """The epoch loop, then validation and the final checkpoint."""
        p, optim = self.progress, self.cfg.optim
        self.clock.t_start = time.perf_counter()
        done = False
        while p.epoch < optim.epochs and not done:
            done = self.run_epoch()
            if not done:
                self.end_epoch()
        self.loader.close()
        self._emit("on_end")
        metrics = self.throughput()
        plain = self.full_model()  # collective under DeepSpeed
        if self.rank == 0:
            metrics.update(self.validate(plain))
            if self.tracker:
                self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=self.progress.step)
                metrics["tracking_failed"] = float(self.tracker.failed)
        self.checkpoint(metrics, final=True, plain=plain)

    def run_epoch(self) -> bool:
        """Steps over this epoch's batches; True when max_steps ended the run. Every rank takes a step while any
        rank still has a batch: a rank whose partition ran out takes a zero-weight step, so collectives match."""
        import torch.distributed as dist

        p, c = self.progress, self.cfg
        it, last = self.loader.epoch(p.epoch), None
        if p.cursor is None or p.cursor.epoch != p.epoch:
            p.cursor = Cursor(p.epoch, self.world)
        while True:
            batch = next(it, None)
            have = torch.tensor([0 if batch is None else 1])
            if self.world > 1:
                dist.all_reduce(have)
            if int(have) == 0:
                return False
            self._emit("on_step")
            last = batch if batch is not None else (last or padding_batch(self.info["n_genes"]))
            logs = self.step(last, real=batch is not None)
            if batch is not None:
                uids = batch["uid"].tolist()
                p.cursor.update(batch["cursor"])
                self.clock.n_seen += len(uids)
                self._emit("on_batch", uids)
            self.log_step(logs)
            if p.step % c.checkpoint.every_n_steps == 0:
                self.checkpoint({"step": p.step, "epoch": p.epoch, "loss": float(logs.get("loss", 0.0))})
            if c.optim.max_steps and p.step >= c.optim.max_steps:
                return True

    def step(self, batch: dict, *, real: bool) -> dict:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.progress.step * 101 + self.rank)
        logs = train_step(self.model, batch_to(batch, self.device), self.opt, self.sched, self.cfg.optim,
                          self.cfg.objective, generator=g, loss_scale=1.0 if real else 0.0)
        self.clock.t_step += time.perf_counter() - t0
        self.progress.step += 1
        return logs

    def end_epoch(self) -> None:
        """Count the epoch's rows: every plan rank's count is served by one worker, so the sum over the workers
        counts each row once (after a restore the cursor holds every worker's counts)."""
        import torch.distributed as dist

        p = self.progress
        n = torch.tensor([p.cursor.rows(self.rank, self.world) if p.cursor else 0])
        if self.world > 1:
            dist.all_reduce(n)
        p.samples_per_epoch[str(p.epoch)] = int(n)
        p.epoch += 1
        p.cursor = None

    def log_step(self, logs: dict) -> None:
        p, total = self.progress, self.plan.total_steps
        if self.rank != 0:
            return
        if p.step % self.cfg.tracking.log_every == 0 or p.step == 1:
            rec = {"step": p.step, "epoch": p.epoch, **{k: float(v) for k, v in logs.items()}}
            p.history.append(rec)
            if self.tracker:
                self.tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=p.step)
        if p.step % max(1, total // 10) == 0:
            el = time.perf_counter() - self.clock.t_start
            print(f"[pretrain] step {p.step}/{total} epoch {p.epoch} loss {logs.get('loss', 0):.4f} "
                  f"{self.clock.n_seen * self.world / max(el, 1e-9):.1f} samples/s", flush=True)

    # ------------------------------------------------------------------------------------------- checkpoint
    def checkpoint(self, metrics: dict, *, final: bool = False, plain=None) -> None:
        """Collective: every worker's stream cursor goes into the checkpoint (resume_state.write_state; under DeepSpeed
        every rank's ZeRO partition too), which Ray Train persists; the final one also holds the exported weights."""
        cursor = gather_cursor(self.progress.cursor, self.rank, self.world)
        folder = Path(tempfile.mkdtemp(prefix="scpert-ckpt-")) if (self.rank == 0 or self.ds) else None
        if self.ds:
            ds_save(self.model, folder)  # collective: each rank its partition
        if self.rank == 0:
            states = None if self.ds else {"model": getattr(self.model, "module", self.model).state_dict(),
                                           "optim": self.opt.state_dict(), "sched": self.sched.state_dict()}
            resume_state.write_state(folder, self.progress, cursor, backend=self.backend, seed=self.cfg.seed,
                                     stream_key=self.stream.key, states=states)
        if final and self.rank == 0:
            info = self.info
            save_pretrained(folder / "pretrained", plain, self.mcfg, genes=info["genes"],
                            gene_symbols=info.get("gene_symbols"), cells=info["cells"], drugs=info["drugs"],
                            extra={"pretrain_config": to_dict(self.cfg), "metrics": metrics,
                                   "semi_synthetic": info.get("semi_synthetic", False)})
        self.report(folder, metrics)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def report(self, folder: Path | None, metrics: dict) -> None:
        """Hand the checkpoint folder (None on ranks without one) to Ray Train, then index it in the run folder."""
        import ray.train

        step = self.progress.step
        token = resume_state.write_token(folder, step) if self.rank == 0 else None
        if folder is not None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        else:
            ray.train.report(metrics)
        if self.ds and self.world > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank's partition is uploaded (report() is synchronous) before the index names it
        if self.rank == 0:
            resume_state.index_checkpoint(self.run_dir, step, token)

    # --------------------------------------------------------------------------------------------- validate
    def full_model(self):
        """The trained weights as a plain PretrainModel on rank 0 (None elsewhere). Collective under DeepSpeed: the
        fp32 master weights are gathered from every rank's ZeRO partition."""
        if not self.ds:
            return getattr(self.model, "module", self.model) if self.rank == 0 else None
        sd = full_fp32_state(self.model)
        if self.rank != 0:
            return None
        plain = PretrainModel(self.mcfg, self.cfg.objective.heads)
        plain.load_state_dict(sd)
        return plain.to(self.device)

    def validate(self, plain) -> dict:
        """Rank 0: Table-1 metrics on the held-out rows."""
        import ray.train


        val = ray.train.get_dataset_shard("val")
        batches = (batch_to(b, self.device) for b in val.iter_torch_batches(batch_size=128, dtypes=None))
        return {k: float(v) for k, v in table1_metrics(plain, batches, self.cfg.objective.mask_ratio,
                                                       seed=self.cfg.seed).items()}

    def throughput(self) -> dict:
        """Collective: samples/s, tokens/s, the fraction of step time spent waiting for data and the rows decoded, over
        all workers;
        `stream_startup_s` is what the step waited for each epoch's first batch (mean per worker),
        `stream_startup_raw_s` how long the streams took to start (overlap hides the difference); setup and the
        throughput figures before it are means per worker."""
        import torch.distributed as dist

        el = time.perf_counter() - self.clock.t_start
        t = self.loader.times
        tot = torch.tensor([float(self.clock.n_seen), t.wait, self.clock.t_step, t.first_wait, t.startup,
                            self.clock.setup_s, float(self.stream.stats.rows)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(tot)
        n, wait, step, first, raw, setup, decoded = (float(x) for x in tot)
        startup = first / self.world
        return {"step": self.progress.step, "epoch": self.progress.epoch,
                "samples_per_s": n / max(el, 1e-9),
                "tokens_per_s": n * (self.info["n_genes"] + 1) / max(el, 1e-9),
                "data_wait_fraction": wait / max(wait + step, 1e-9),
                # the same without each epoch's first batch: does the stream keep up with the step?
                "data_wait_fraction_steady": (wait - first) / max(wait - first + step, 1e-9),
                "stream_startup_s": startup, "stream_startup_raw_s": raw / self.world,
                # worker setup (model, wrapping, resume, MLflow) before the first step, and setup + training: a
                # stream start-up hidden by overlap must not come back as a longer setup
                "setup_s": setup / self.world, "worker_wall_s": setup / self.world + el,
                "samples_per_s_steady": n / max(el - startup, 1e-9),
                # rows the workers' streams decoded (validation rows in their row groups included), all epochs this
                # process ran: each row group is decoded by one worker, so one epoch is the corpus
                "rows_decoded": decoded}


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: `config` is the driver's {"plan": WorkerPlan}."""
    Trainer(config["plan"]).setup().fit()
