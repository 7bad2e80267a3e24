"""Pretraining under Ray Train: Parquet shards -> Ray Data -> TorchTrainer workers (DDP on gloo/NCCL, or DeepSpeed
ZeRO on GPU) -> checkpoints + MLflow.

`run_pretraining(cfg)` is the driver (CLI, `jobs/pretrain.py` and the demo call it); `train_loop_per_worker` runs
on every worker and calls the Ray-free step in `train/step.py`.

Resume and sample accounting: every row has a stable id (data/stream.py). Each checkpoint stores, besides model,
optimizer, scheduler, step and epoch, the ids consumed so far in the current epoch by ALL workers. A restarted worker
(FailureConfig) or a re-run with `resume=True` (same name + storage) skips exactly those ids, so within an epoch no row
is lost, and only rows consumed after the last checkpoint (at most one checkpoint interval) are seen twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import from_dict, to_dict
from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DataSection:
    shards: str = ""
    """Folder of Parquet shards + manifest.json (from `scpert data lincs`)."""
    val_fraction: float = 0.05
    """Fraction of signatures held out (by id hash) for the Table-1 metrics."""
    verify: bool = True
    """Check every shard's sha256 against the manifest before training."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    """Model size preset: tiny | small | base | large (scpert_dist.model.config.PRESETS)."""
    tasks: str = "mask"
    """Pretraining task set: 'mask' or e.g. 'mask+cell+drug+dose'."""
    mask_ratio: float = 0.15
    """Fraction of gene tokens masked per signature (the paper compared 0.15 and 0.8)."""
    d_model: int = 0
    """Override of the preset's width (0 = preset)."""
    n_layers: int = 0
    """Override of the preset's depth (0 = preset)."""
    dropout: float = -1.0
    """Override of the preset's dropout (<0 = preset)."""


@dataclass
class OptimSection:
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warmup then cosine)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Warmup steps."""
    batch_size: int = 32
    """Signatures per worker per step."""
    epochs: int = 1
    """Passes over the training rows."""
    max_steps: int = 0
    """Stop after this many steps (0 = run all epochs)."""
    grad_clip: float = 1.0
    """Max gradient norm (<=0: off)."""


@dataclass
class ScalingSection:
    num_workers: int = 2
    """Ray Train workers (one process each; one GPU each with use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs (DeepSpeed by default there)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs each worker reserves; < 1 leaves room for Ray Data's read tasks on small machines."""
    backend: str = "auto"
    """'ddp' (torch DDP: gloo on CPU, NCCL on GPU), 'deepspeed' (ZeRO), or 'auto' (deepspeed on GPU, ddp on CPU)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 1, 2 or 3."""
    bf16: bool = True
    """bf16 mixed precision (GPU / DeepSpeed only)."""
    torch_threads: int = 0
    """Intra-op threads per worker (0 = cores / workers)."""
    placement_strategy: str = "PACK"
    """Ray placement of the workers: PACK (fill a node first) or SPREAD (one per node where possible)."""


@dataclass
class CheckpointSection:
    every_n_steps: int = 50
    """Checkpoint (and report) interval in steps."""
    num_to_keep: int = 2
    """Checkpoints kept by Ray Train."""
    storage: str = ""
    """Ray Train storage path (default ./scpert_runs/ray; a shared filesystem or s3:// on a multi-node cluster)."""
    name: str = ""
    """Run folder name under storage (default: a fresh name). Re-use it with --resume."""
    max_failures: int = 2
    """Worker failures survived by restarting from the last checkpoint."""


@dataclass
class TrackingSection:
    uri: str = ""
    """MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."""
    experiment: str = "scpert-pretrain"
    """MLflow experiment."""
    run_name: str = ""
    """MLflow run name (default: the Ray run name)."""
    log_every: int = 5
    """Log step metrics every N steps."""


@dataclass
class FaultSection:
    """Fault injection, for tests of fault tolerance: one worker dies once at a chosen step."""

    fail_at_step: int = -1
    """Step at which the worker of rank `fail_rank` exits (-1 = never). Happens once per run folder."""
    fail_rank: int = 0
    """Rank of the worker that dies."""


@dataclass
class PretrainConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    fault: FaultSection = field(default_factory=FaultSection)
    accounting_dir: str = ""
    """If set, each worker appends the ids it trained on ('epoch uid' lines) to rank<r>.txt there (tests)."""
    seed: int = 0
    """Seed of model init, masking and shuffling."""

    def __post_init__(self):
        if self.scaling.backend not in ("auto", "ddp", "deepspeed"):
            raise ConfigError(f"scaling.backend must be auto, ddp or deepspeed, not '{self.scaling.backend}'",
                              field="scaling.backend")
        if self.scaling.zero_stage not in (1, 2, 3):
            raise ConfigError("scaling.zero_stage must be 1, 2 or 3", field="scaling.zero_stage")
        if not 0 < self.model.mask_ratio < 1:
            raise ConfigError("model.mask_ratio must be in (0, 1)", field="model.mask_ratio")
        if not 0 <= self.data.val_fraction < 0.5:
            raise ConfigError("data.val_fraction must be in [0, 0.5)", field="data.val_fraction")
        if self.scaling.num_workers < 1:
            raise ConfigError("scaling.num_workers must be >= 1", field="scaling.num_workers")

    def pretraining_hash(self) -> str:
        """Hash of what defines the pretrained weights (data, model, optimisation, seed): the sweep cache key."""
        d = {"data": to_dict(self.data), "model": to_dict(self.model), "optim": to_dict(self.optim), "seed": self.seed,
             "workers": self.scaling.num_workers}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PretrainResult:
    run_id: str
    """MLflow run id."""
    checkpoint_dir: str
    """Exported pretrained weights (model.safetensors + scpert_model.json), loadable with checkpoint.load_pretrained."""
    metrics: dict
    """Table-1 metrics on held-out signatures + throughput."""
    samples_per_epoch: dict
    """Training rows consumed per epoch (all workers), for accounting."""
    run_dir: str = ""
    """Ray Train run folder (checkpoints)."""


# ----------------------------------------------------------------------------------------------------------- worker

def _model_config(cfg: PretrainConfig, info: dict):
    from ..model.config import model_config

    over = {"n_genes": info["n_genes"], "n_cells": len(info["cells"]), "n_drugs": len(info["drugs"]),
            "tasks": cfg.model.tasks, "mask_ratio": cfg.model.mask_ratio}
    if cfg.model.d_model:
        over["d_model"] = cfg.model.d_model
    if cfg.model.n_layers:
        over["n_layers"] = cfg.model.n_layers
    if cfg.model.dropout >= 0:
        over["dropout"] = cfg.model.dropout
    return model_config(cfg.model.preset, **over)


def _batch_to(batch: dict, device) -> dict:
    from .. import schema as S

    return {"expr": batch[S.EXPR].to(device, non_blocking=True).float(),
            "cell_idx": batch[S.CELL_IDX].to(device), "drug_idx": batch[S.DRUG_IDX].to(device),
            "log_dose": batch["log_dose"].to(device).float()}


CKPT_TOKEN = "scpert_ckpt.json"
CKPT_INDEX = "scpert_checkpoints.jsonl"


def _index_checkpoint(run_dir: str, step: int, token: str) -> None:
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


def _newest_checkpoint(ray_ckpt, run_dir: str):
    """Ray's restored checkpoint, or a newer complete one from the run folder's index (see `_index_checkpoint`)."""
    import ray.train

    def step_of(d: Path) -> int:
        try:
            return int(json.loads((d / CKPT_TOKEN).read_text())["step"])
        except (OSError, ValueError, KeyError):
            return -1

    best, best_step = ray_ckpt, -1
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            best_step = step_of(Path(d))
    index = Path(run_dir) / CKPT_INDEX
    if index.is_file():
        for line in index.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            d = Path(run_dir) / rec["dir"]
            if rec["step"] > best_step and (d / "state.pt").is_file() and step_of(d) == rec["step"]:
                best, best_step = ray.train.Checkpoint.from_directory(str(d)), rec["step"]
    return best


def _maybe_fail(cfg: PretrainConfig, rank: int, step: int, run_dir: str) -> None:
    if cfg.fault.fail_at_step < 0 or rank != cfg.fault.fail_rank or step != cfg.fault.fail_at_step:
        return
    marker = Path(run_dir) / f".fault_injected_step{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("worker killed here by fault injection\n")
    os._exit(17)  # a hard worker death, not an exception


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from ..data.stream import iter_partition
    from ..model.heads import PretrainModel, table1_metrics
    from .distributed import ds_load, ds_save, full_fp32_state, is_deepspeed, wrap
    from .step import StepConfig, make_optimizer, train_step

    cfg = from_dict(PretrainConfig, config["cfg"])
    info = config["info"]
    quiet_ray_data()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.scaling.torch_threads or max(1, (os.cpu_count() or 2) // max(1, min(world, os.cpu_count() or 1)))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    mcfg = _model_config(cfg, info)
    model = PretrainModel(mcfg)
    scfg = StepConfig(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps,
                      total_steps=config["total_steps"], grad_clip=cfg.optim.grad_clip, mask_ratio=cfg.model.mask_ratio)
    opt, sched = make_optimizer(model, scfg)
    model, opt, sched, device, backend = wrap(model, opt, sched, cfg.scaling, batch_size=cfg.optim.batch_size,
                                              grad_clip=cfg.optim.grad_clip)
    ds = is_deepspeed(model)

    step, epoch, consumed = 0, 0, set()
    history: list[dict] = []
    samples_per_epoch: dict[str, int] = {}
    ckpt = _newest_checkpoint(ray.train.get_checkpoint(), config["run_dir"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
            saved = st.get("backend", "ddp")  # checkpoints from before DeepSpeed support are DDP's
            if saved != backend:
                from ..errors import CheckpointError

                raise CheckpointError(f"the checkpoint was written by backend '{saved}', this run uses '{backend}'",
                                      path=str(d), field="scaling.backend", hint=f"resume with scaling.backend={saved}")
            if ds:  # every rank restores its own ZeRO partition (+ optimizer and scheduler)
                ds_load(model, d)
            else:
                getattr(model, "module", model).load_state_dict(st["model"])
                opt.load_state_dict(st["optim"])
                sched.load_state_dict(st["sched"])
            step, epoch = int(st["step"]), int(st["epoch"])
            consumed = set(st["consumed"].tolist())
            hist_file = Path(d) / "history.json"
            if hist_file.exists():
                saved = json.loads(hist_file.read_text())
                history, samples_per_epoch = saved["history"], saved["samples_per_epoch"]
        if rank == 0:
            print(f"[pretrain] resumed at step {step}, epoch {epoch}, {len(consumed)} rows of this epoch done")

    tracker = None
    if rank == 0 and config.get("run_id"):
        from ..tracking import Tracker

        tracker = Tracker.attach(config["tracking_uri"], config["run_id"])
    acc_file = None
    if cfg.accounting_dir:
        Path(cfg.accounting_dir).mkdir(parents=True, exist_ok=True)
        acc_file = open(Path(cfg.accounting_dir) / f"rank{rank}.txt", "a")
        (Path(cfg.accounting_dir) / f"node{rank}.txt").write_text(ray.get_runtime_context().get_node_id())

    def full_model():
        """The trained weights as a plain PretrainModel on rank 0 (None elsewhere). Collective under DeepSpeed: the
        fp32 master weights are gathered from every rank's ZeRO partition."""
        if not ds:
            return getattr(model, "module", model) if rank == 0 else None
        sd = full_fp32_state(model)
        if rank != 0:
            return None
        plain = PretrainModel(mcfg)
        plain.load_state_dict(sd)
        return plain.to(device)

    def save_checkpoint(final: bool, metrics: dict, plain=None) -> None:
        # union of every worker's consumed ids -> state.pt written by rank 0. DDP: rank 0 also writes the model,
        # optimizer and scheduler states (the same on every rank). DeepSpeed: every rank writes its ZeRO partition
        # and reports its folder; Ray Train puts the rank folders together into one checkpoint.
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, sorted(consumed))
            union = set().union(*map(set, parts))
        else:
            union = set(consumed)
        tmp = Path(tempfile.mkdtemp(prefix="scpert-ckpt-")) if (rank == 0 or ds) else None
        if ds:
            ds_save(model, tmp)
        if rank == 0:
            st = {"step": step, "epoch": epoch, "seed": cfg.seed, "backend": backend,
                  "consumed": torch.tensor(sorted(union), dtype=torch.int64)}
            if not ds:
                core = getattr(model, "module", model)
                st.update(model=core.state_dict(), optim=opt.state_dict(), sched=sched.state_dict())
            torch.save(st, tmp / "state.pt")
            (tmp / "history.json").write_text(json.dumps({"history": history,
                                                          "samples_per_epoch": samples_per_epoch}))
            if final:
                from ..checkpoint import save_pretrained

                save_pretrained(tmp / "pretrained", plain, mcfg, genes=info["genes"],
                                gene_symbols=info.get("gene_symbols"), cells=info["cells"], drugs=info["drugs"],
                                extra={"pretrain_config": config["cfg"], "metrics": metrics,
                                       "semi_synthetic": info.get("semi_synthetic", False)})
            token = f"{step}-{os.getpid()}-{time.time_ns()}"
            (tmp / CKPT_TOKEN).write_text(json.dumps({"step": step, "token": token}))
        if tmp is not None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            ray.train.report(metrics)
        if ds and world > 1:
            dist.barrier()  # every rank's partition is uploaded (report() is synchronous) before the index names it
        if rank == 0:
            _index_checkpoint(config["run_dir"], step, token)

    shard = ray.train.get_dataset_shard("train")
    t_start = time.perf_counter()
    t_wait = t_step = t_first = 0.0
    n_seen = 0
    done = False
    while epoch < cfg.optim.epochs and not done:
        it = iter_partition(shard, batch_size=cfg.optim.batch_size, rank=rank, world=world,
                            skip_uids=consumed, seed=cfg.seed * 100_003 + epoch)
        last = None
        first = True
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            t_wait += t1 - t0
            if first:  # Ray Data starts a streaming execution per epoch: startup latency, not starvation
                t_first += t1 - t0
                first = False
            have = torch.tensor([0 if batch is None else 1])
            if world > 1:
                dist.all_reduce(have)
            if int(have) == 0:
                break
            _maybe_fail(cfg, rank, step, config["run_dir"])
            real = batch is not None
            if real:
                last = batch
            elif last is None:
                last = {"uid": torch.zeros(1, dtype=torch.int64), "expr": torch.zeros(1, info["n_genes"]),
                        "cell_idx": torch.full((1,), -1), "drug_idx": torch.full((1,), -1),
                        "log_dose": torch.full((1,), float("nan"))}
            b = _batch_to(batch if real else last, device)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + rank)
            # a worker whose partition ran out takes a zero-weight step so DDP collectives stay matched
            logs = train_step(model, b, opt, sched, scfg, generator=g, loss_scale=1.0 if real else 0.0)
            t_step += time.perf_counter() - t1
            step += 1
            if real:
                uids = batch["uid"].tolist()
                consumed.update(uids)
                n_seen += len(uids)
                if acc_file:
                    acc_file.write("".join(f"{epoch} {u}\n" for u in uids))
                    acc_file.flush()
            if rank == 0 and (step % cfg.tracking.log_every == 0 or step == 1):
                rec = {"step": step, "epoch": epoch, **{k: float(v) for k, v in logs.items()}}
                history.append(rec)
                if tracker:
                    tracker.log_metrics({k: v for k, v in rec.items() if k not in ("step",)}, step=step)
            if rank == 0 and step % max(1, config["total_steps"] // 10) == 0:
                el = time.perf_counter() - t_start
                print(f"[pretrain] step {step}/{config['total_steps']} epoch {epoch} loss {logs.get('loss', 0):.4f} "
                      f"{n_seen * world / max(el, 1e-9):.1f} samples/s", flush=True)
            if step % cfg.checkpoint.every_n_steps == 0:
                save_checkpoint(False, {"step": step, "epoch": epoch, "loss": float(logs.get("loss", 0.0))})
            if cfg.optim.max_steps and step >= cfg.optim.max_steps:
                done = True
                break
        if not done:
            # count the ids this worker owns (after a restore `consumed` holds every worker's ids); each id has
            # exactly one owner, so the sum over workers is the epoch's row count
            n_epoch = torch.tensor([sum(1 for u in consumed if u % world == rank)])
            if world > 1:
                dist.all_reduce(n_epoch)
            samples_per_epoch[str(epoch)] = int(n_epoch)
            epoch += 1
            consumed = set()
    if acc_file:
        acc_file.close()

    elapsed = time.perf_counter() - t_start
    tot = torch.tensor([float(n_seen), t_wait, t_step, t_first])
    if world > 1:
        dist.all_reduce(tot)
    startup = float(tot[3]) / world  # mean per worker
    metrics = {"step": step, "epoch": epoch,
               "samples_per_s": float(tot[0]) / max(elapsed, 1e-9),
               "tokens_per_s": float(tot[0]) * (info["n_genes"] + 1) / max(elapsed, 1e-9),
               "data_wait_fraction": float(tot[1]) / max(float(tot[1] + tot[2]), 1e-9),
               # the same without each epoch's first batch (stream start-up): does the stream keep up with the step?
               "data_wait_fraction_steady": float(tot[1] - tot[3]) / max(float(tot[1] - tot[3] + tot[2]), 1e-9),
               "stream_startup_s": startup,
               "samples_per_s_steady": float(tot[0]) / max(elapsed - startup, 1e-9)}
    plain = full_model()
    if rank == 0:
        val = ray.train.get_dataset_shard("val")
        batches = (_batch_to(b, device) for b in val.iter_torch_batches(batch_size=128, dtypes=None))
        metrics.update({k: float(v) for k, v in table1_metrics(plain, batches, cfg.model.mask_ratio,
                                                                seed=cfg.seed).items()})
        if tracker:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
            metrics["tracking_failed"] = float(tracker.failed)
    save_checkpoint(True, metrics, plain)


# ----------------------------------------------------------------------------------------------------------- driver

def quiet_ray_data() -> None:
    """Ray Data's per-operator progress bars flood a terminal; our own progress lines say what matters."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _free_port() -> int:
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


def _ensure_ray(num_workers: int, cpus_per_worker: float) -> None:
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    # Enough logical CPUs for the workers plus Ray Data's read tasks on a small machine (STACK: 2-core hang).
    n = max(os.cpu_count() or 2, int(num_workers * cpus_per_worker) + 2, 4)
    # The dashboard (loopback only) serves the state API: without it Ray Train's placement-group cleaner cannot
    # query its controller and prints a warning every few seconds for the whole run.
    try:
        ray.init(num_cpus=n, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                 log_to_driver=True, _node_ip_address="127.0.0.1")
    except Exception as exc:  # no dashboard packages / port race: run without it, the warnings are cosmetic
        log.warning("Ray dashboard unavailable (%s); starting Ray without it", exc)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    # Ray's helper processes find this cluster even when other Ray instances run on the machine
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def _storage(cfg: PretrainConfig) -> Path:
    return Path(cfg.checkpoint.storage or Path("scpert_runs") / "ray").expanduser().resolve()


def latest_run_name(storage: Path) -> str | None:
    runs = sorted((p for p in storage.glob("*/scpert_run.json")), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent.name if runs else None


def run_pretraining(cfg: PretrainConfig, *, resume: bool = False, progress: bool = True) -> PretrainResult:
    """Build the Ray Data datasets and the TorchTrainer, fit, export the weights, log to MLflow."""
    import math

    import ray.train
    from ray.train.torch import TorchTrainer

    from ..data.lincs import read_manifest, verify_shards
    from ..data.stream import build_dataset
    from ..errors import ConfigError as _CE
    from ..tracking import Tracker, loss_curve_png, resolve_uri

    if not cfg.data.shards:
        raise _CE("data.shards is not set", field="data.shards", hint="pass --shards DIR (from `scpert data lincs`)")
    shards = str(Path(cfg.data.shards).resolve())
    # every check that can fail runs before anything is written (run folder, MLflow run, Ray)
    manifest = read_manifest(shards)
    if cfg.data.verify:
        verify_shards(shards)  # ShardError naming a missing / truncated / corrupt shard
    info = {"n_genes": manifest["n_genes"], "genes": manifest["genes"], "gene_symbols": manifest.get("gene_symbols"),
            "cells": manifest["cells"], "drugs": manifest["drugs"],
            "semi_synthetic": bool(manifest.get("semi_synthetic", False))}
    _model_config(cfg, info)  # ConfigError for an unknown preset / task set, here rather than in the workers
    storage = _storage(cfg)
    name = cfg.checkpoint.name
    if resume and not name:
        name = latest_run_name(storage)
        if name is None:
            raise _CE("--resume: no earlier run found", path=str(storage), hint="give the run name with --name")
    if not name:
        name = f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.pretraining_hash()[:6]}"
    run_dir = storage / name
    meta_file = run_dir / "scpert_run.json"
    if resume and not meta_file.exists():
        raise _CE(f"--resume: run '{name}' not found", path=str(run_dir))
    if not resume and meta_file.exists():
        raise _CE(f"run '{name}' already exists", path=str(run_dir),
                  hint="use --resume to continue it, or choose another name")
    storage.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, name=name, storage=str(storage)))

    n_train = int(manifest["n_rows"] * (1 - cfg.data.val_fraction))
    steps_per_epoch = math.ceil(n_train / cfg.scaling.num_workers / cfg.optim.batch_size)
    total = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)

    uri = resolve_uri(cfg.tracking.uri or None)
    if resume:
        run_id = json.loads(meta_file.read_text())["mlflow_run_id"]
        tracker = Tracker.attach(uri, run_id)
    else:
        tracker = Tracker(uri, experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name or name,
                          tags={"scpert.stage": "pretrain", "scpert.pretraining_hash": cfg.pretraining_hash(),
                                "scpert.semi_synthetic": str(info["semi_synthetic"]).lower(),
                                "scpert.data": manifest.get("metadata", "")})
        tracker.log_params({**to_dict(cfg), "n_genes": info["n_genes"], "n_cells": len(info["cells"]),
                            "n_drugs": len(info["drugs"]), "n_rows": manifest["n_rows"]})
        run_dir.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id, "tracking_uri": uri,
                                         "config": to_dict(cfg)}, indent=1))

    _ensure_ray(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker)
    ds_train = build_dataset(shards, val_fraction=cfg.data.val_fraction, validation=False, verify=False)
    ds_val = build_dataset(shards, val_fraction=cfg.data.val_fraction, validation=True, verify=False)
    use_gpu = cfg.scaling.use_gpu
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "info": info, "total_steps": total, "run_id": tracker.run_id,
                           "tracking_uri": uri, "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                               placement_strategy=cfg.scaling.placement_strategy,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                                     **({"GPU": 1} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep)),
        datasets={"train": ds_train, "val": ds_val},
        # every worker sees the whole stream and keeps its own id partition (no rows dropped to balance workers)
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    if progress:
        print(f"[pretrain] {name}: {manifest['n_rows']} signatures x {info['n_genes']} genes, "
              f"{cfg.scaling.num_workers} workers, ~{total} steps; MLflow run {tracker.run_id} ({uri})")
    try:
        result = trainer.fit()
    except Exception:
        tracker.end("FAILED")
        raise
    with result.checkpoint.as_directory() as d:
        export = run_dir / "pretrained"
        if export.exists():
            shutil.rmtree(export)
        shutil.copytree(Path(d) / "pretrained", export)
        hist = json.loads((Path(d) / "history.json").read_text())
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    tracker.log_artifact(export, "model")
    if hist["history"]:
        png = loss_curve_png(hist["history"], run_dir / "loss_curve.png",
                             keys=tuple(k for k in ("loss", "loss_mask", "loss_cell", "loss_drug", "loss_dose")
                                        if k in hist["history"][-1]))
        tracker.log_artifact(png)
    tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()}, step=int(metrics.get("step", 0)))
    if metrics.get("tracking_failed") or tracker.failed:
        # the record in MLflow is incomplete: say so where it survives (the run folder) and, if reachable, in MLflow
        meta = json.loads(meta_file.read_text())
        meta["tracking_failed"] = True
        meta_file.write_text(json.dumps(meta, indent=1))
        tracker.failed = True
    tracker.end("FINISHED")
    if progress:
        print("[pretrain] done: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return PretrainResult(run_id=tracker.run_id, checkpoint_dir=str(export), metrics=metrics,
                          samples_per_epoch=hist["samples_per_epoch"], run_dir=str(run_dir))
