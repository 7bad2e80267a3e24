"""Sweeps (`scpert sweep`, `jobs/sweep.py`): Ray Tune over pretraining mask ratio x pretraining task set x decoder
x drug representation x learning rate, with ASHA on the VALIDATION-drug metric and MLflow parent/nested runs.

Flow of `run_sweep(cfg)` (the driver):
1. data: the given shards + h5ad, or (``data.simulate = "tiny"``) the semi-synthetic pipeline of `demo.py` run once
   into ``<out>/data``.
2. pretraining cache: every distinct pretraining config (mask ratio x task set) is looked up in MLflow by its tag
   ``scpert.pretraining_hash`` (= `PretrainConfig.pretraining_hash()`); only misses are pretrained (Ray Train), once.
3. Tune: a FUNCTION trainable per trial builds its typed configs from the sweep's typed base configs
   (`trial_pretraining` / `trial_finetuning`: `dataclasses.replace` of the fields its point sets, AXES), finds the
   run of its pretraining by that config's hash, calls plain-torch `run_finetune` and reports every epoch's
   validation logFC Pearson (valid drugs only) to Tune; ASHA stops weak trials early. The base configs reach the
   trials as they are (`tune.with_parameters`); the trial passes a `TuneReporter` as `run_finetune(on_epoch=...)`;
   each trial's MLflow run is nested under the sweep's parent run, named by its swept values, logs the typed config
   it ran as params and the swept values as params `swept.*`.
4. selection: the best COMPLETED trial by best validation logFC Pearson. Only then, once, its test-drug metric is
   computed (never seen by ASHA), logged, and its model registered in the MLflow model registry.
5. a markdown results table is printed, written to ``<out>/sweep_results.md`` and logged on the parent run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .config import (
    from_dict,
    merge,
    packaged_or_file,
    params,
    read_file,
    replace_at,
    set_path,
    split_overrides,
)
from .data.readers.sciplex import prepare_sciplex
from .data.shards.ingest import ingest_gctx
from .data.simulate import PRESETS as SIMULATED
from .data.simulate import simulate
from .errors import ConfigError, InputFileError, SweepError
from .finetune.config import FinetuneConfig
from .finetune.data import Prepared, condition_groups, load_adata
from .paths import ensure_writable_dir, metadata_dir
from .registry import DECODERS, DRUG_REPS
from .tracking import Tracker, resolve_uri
from .train.settings import PretrainConfig

METRIC = "val_logfc_pearson"
"""The metric ASHA and model selection use: mean logFC Pearson over VALIDATION-drug conditions."""
HASH_TAG = "scpert.pretraining_hash"
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class SweepData:
    """Inputs of the sweep: pretraining shards and the finetuning AnnData, or a simulated tiny set."""

    MOVED: ClassVar[dict[str, str]] = {"split": "finetune.data.split"}

    shards: str = ""
    """Parquet shards + manifest.json (from `scpert data lincs`)."""
    adata: str = ""
    """Finetuning h5ad (from `scpert data sciplex`), with the split column `finetune.data.split`."""
    simulate: str = ""
    """If set (a simulated data set: data/simulate PRESETS, e.g. 'tiny') and shards/adata are empty: simulate that
    preset and ingest it under <out>/data."""
    metadata: str = ""
    """Metadata folder for the simulation (default $SCPERT_METADATA; see paths.metadata_dir)."""

    def __post_init__(self) -> None:
        if self.simulate:
            SIMULATED.check(self.simulate, field="data.simulate")


AXES = {"mask_ratio": "pretrain.objective.mask_ratio", "tasks": "pretrain.objective.tasks",
        "decoder": "finetune.model.decoder", "drug_rep": "finetune.model.drug_rep", "lr": "finetune.optim.lr"}
"""Each swept value and the config field it sets (the pretraining's objective, the finetuning's model and optim)."""


@dataclass
class SweepSpace:
    """The search space (the fields the axes set: AXES). Lists are grid axes (every combination is a trial); lr is
    sampled log-uniformly. Each value is checked by the section that owns its field."""

    mask_ratio: list[float] = field(default_factory=lambda: [0.15, 0.5, 0.8])
    """Pretraining mask ratios (pretrain.objective.mask_ratio)."""
    tasks: list[str] = field(default_factory=lambda: ["mask", "mask+cell+drug+dose"])
    """Pretraining task sets (pretrain.objective.tasks)."""
    decoder: list[str] = field(default_factory=lambda: ["lstm", "gru", "mlp", "transformer"])
    """Finetuning decoders (finetune.model.decoder; registry.DECODERS)."""
    drug_rep: list[str] = field(default_factory=lambda: ["morgan"])
    """Drug representations (finetune.model.drug_rep; registry.DRUG_REPS; lincs: each drug's LINCS signature through
    the trial's pretrained encoder, from the sweep's shards)."""
    lr_min: float = 1e-3
    """Lower bound of the finetuning learning rate (log-uniform; finetune.optim.lr)."""
    lr_max: float = 1e-3
    """Upper bound (= lr_min: fixed)."""
    num_samples: int = 1
    """Repeats of the grid (each draws its own lr)."""

    def __post_init__(self) -> None:
        for name in ("mask_ratio", "tasks", "decoder", "drug_rep"):
            if not getattr(self, name):
                raise ConfigError(f"space.{name} is empty", field=f"space.{name}", hint="give at least one value")
        for d in self.decoder:
            DECODERS.check(d, field="space.decoder")
        for r in self.drug_rep:
            DRUG_REPS.check(r, field="space.drug_rep")
        if not 0 < self.lr_min <= self.lr_max:
            raise ConfigError("need 0 < lr_min <= lr_max", field="space.lr_min")
        if self.num_samples < 1:
            raise ConfigError("space.num_samples must be >= 1", field="space.num_samples")

    def grid(self) -> list[dict]:
        """Every combination of the grid axes (lr apart: sampled per trial), as {axis: value}."""
        axes = ("mask_ratio", "tasks", "decoder", "drug_rep")
        return [dict(zip(axes, v, strict=True)) for v in itertools.product(*(getattr(self, a) for a in axes))]


@dataclass
class SweepASHA:
    """ASHA early stopping on the validation metric, per finetuning epoch."""

    grace_period: int = 1
    """Epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    """Keep 1/reduction_factor of the trials at each rung."""


@dataclass
class SweepConfig:
    """One sweep. `pretrain` and `finetune` are the typed base configs the search space changes (AXES); in a sweep
    file `pretrain` holds changes to the base pretraining file `pretrain_config` (`load_sweep` layers them)."""

    name: str = "scpert-sweep"
    """Sweep name (Tune run folder, MLflow parent run name)."""
    data: SweepData = field(default_factory=SweepData)
    space: SweepSpace = field(default_factory=SweepSpace)
    asha: SweepASHA = field(default_factory=SweepASHA)
    pretrain_config: str = "pretrain_tiny.toml"
    """Base pretraining config: a file, or a name in scpert_dist/configs."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """The base pretraining config (PretrainConfig sections; in a file: changes to `pretrain_config`)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """The base finetuning config (FinetuneConfig sections); each trial sets its decoder, drug rep, lr, the
    pretraining it starts from, tracking and output folder."""
    cpus_per_trial: float = 0.5
    """Logical CPUs each trial reserves (small: the finetune loop runs on 1 thread)."""
    max_concurrent: int = 2
    """Trials running at once."""
    tracking_uri: str = ""
    """MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."""
    experiment: str = "scpert-sweep"
    """MLflow experiment of the parent and nested (trial) runs."""
    register_as: str = "scpert-drug-response"
    """Registered model name of the best trial ('' = do not register)."""
    out: str = "sweep_out"
    """Local folder: data (simulated), Tune results, trial models, results table."""
    seed: int = 0
    """Seed of lr sampling and finetuning."""

    def __post_init__(self):
        if self.asha.grace_period < 1 or self.asha.reduction_factor < 2:
            raise ConfigError("asha.grace_period >= 1 and asha.reduction_factor >= 2", field="asha")
        if self.cpus_per_trial <= 0 or self.max_concurrent < 1:
            raise ConfigError("cpus_per_trial > 0 and max_concurrent >= 1", field="cpus_per_trial")
        for axis in ("mask_ratio", "tasks", "decoder", "drug_rep"):  # each value, by the section that owns it
            for value in getattr(self.space, axis):
                _check_point(self, axis, value)
        _check_point(self, "lr", self.space.lr_min)


@dataclass
class SweepResult:
    parent_run_id: str
    """MLflow run of the sweep; every trial run is nested under it."""
    best: dict
    """Row of the best completed trial (config, run_id, val and test metrics)."""
    rows: list[dict]
    """One row per trial (see results_table)."""
    pretrain_runs: dict
    """pretraining_hash -> MLflow run id of the (cached or new) pretraining."""
    pretrained_now: list[str]
    """Hashes pretrained in THIS sweep (cache misses)."""
    table: str
    """Markdown results table."""
    model_version: str | None = None
    """Registered model version of the best trial."""


# ---------------------------------------------------------------------------------------------------- config

def _point_changes(point: dict, stage: str) -> dict:
    return {AXES[a].split(".", 1)[1]: v for a, v in point.items() if AXES[a].startswith(stage + ".")}


def trial_pretraining(cfg: SweepConfig, point: dict) -> PretrainConfig:
    """The pretraining of a point of the search space ({axis: value}, AXES): the sweep's typed base pretraining with
    the point's objective replaced (`config.replace_at`: validated by the objective section)."""
    return replace_at(cfg.pretrain, _point_changes(point, "pretrain"))


def trial_finetuning(cfg: SweepConfig, point: dict, *, pretrained: str, shards: str, **more) -> FinetuneConfig:
    """The finetuning of a point: the sweep's typed base finetuning with the point's decoder, drug representation
    and lr, starting from `pretrained` (the run of its pretraining); a drug representation read through the encoder
    gets the sweep's `shards`; `more`: further dotted changes (tracking, output folder)."""
    changes = {**_point_changes(point, "finetune"), "model.pretrained": pretrained, **more}
    if DRUG_REPS[changes.get("model.drug_rep", cfg.finetune.model.drug_rep)].needs_pretrained:
        changes["data.lincs_shards"] = shards
    return replace_at(cfg.finetune, changes)


def _check_point(cfg: SweepConfig, axis: str, value) -> None:
    """One value of an axis, built into its config (the trial's pretraining and shards named by placeholders)."""
    point = {axis: value}
    try:
        trial_pretraining(cfg, point)
        trial_finetuning(cfg, point, pretrained="<the trial's pretraining run>", shards="<the sweep's shards>")
    except ConfigError as e:
        raise ConfigError(f"space.{axis} value {value!r}: {str(e).splitlines()[0]}", field=f"space.{axis}",
                          hint=e.hint) from None


def load_sweep(path: str | Path | None, overrides: list[str] | None = None) -> SweepConfig:
    """The sweep file (+ `key=value` overrides), its `pretrain` table layered over the base pretraining file it names
    (`pretrain_config`); every section checked here, before any data is made (ConfigError naming the file)."""
    data = read_file(path) if path is not None else {}
    for k, v in split_overrides(overrides).items():
        set_path(data, k, v)
    base = read_file(_pretrain_file(data.get("pretrain_config", SweepConfig.pretrain_config)))
    data["pretrain"] = merge(base, data.get("pretrain") or {})
    try:
        return from_dict(SweepConfig, data)
    except ConfigError as e:
        raise ConfigError(str(e).splitlines()[0], path=str(path) if path else None, field=e.field,
                          hint=e.hint) from None


def _pretrain_file(name: str) -> Path:
    return packaged_or_file(name, field="pretrain_config", pattern="pretrain_*.toml")


def pretrain_configs(cfg: SweepConfig) -> dict[str, PretrainConfig]:
    """pretraining hash -> PretrainConfig, one per distinct pretraining of the grid."""
    res = {}
    for m, t in itertools.product(cfg.space.mask_ratio, cfg.space.tasks):
        pc = trial_pretraining(cfg, {"mask_ratio": m, "tasks": t})
        res.setdefault(pc.pretraining_hash(), pc)
    return res


def with_run_settings(cfg: SweepConfig, shards: str, tracking_uri: str, out: Path) -> SweepConfig:
    """The sweep with its base pretraining set to run on the sweep's shards, tracked and checkpointed where the sweep
    is (what every trial's pretraining config, and so its hash, shares)."""
    pre = replace_at(cfg.pretrain, {"data.shards": str(Path(shards).resolve()), "tracking.uri": tracking_uri,
                                    "checkpoint.storage": str((out / "ray_pretrain").resolve())})
    return dataclasses.replace(cfg, pretrain=pre)


# ------------------------------------------------------------------------------------------------- pretraining

def find_pretraining(tracking_uri: str, phash: str) -> str | None:
    """Id of a FINISHED pretraining run (tag scpert.stage=pretrain) tagged with this pretraining hash (any
    experiment) that holds its 'model/' weights, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return None
    runs = client.search_runs(exps, filter_string=f"tags.`{HASH_TAG}` = '{phash}' and tags.`scpert.stage` = 'pretrain' "
                                                  "and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5)
    for r in runs:  # a run without its weights (e.g. artifacts lost) is no cache hit
        if any(a.path == "model" for a in client.list_artifacts(r.info.run_id)):
            return r.info.run_id
    return None


def ensure_pretrained(configs: dict[str, PretrainConfig], tracking_uri: str, log=print) -> tuple[dict, list[str]]:
    """Pretrain each distinct config (hash -> config) once; return ({hash: run_id}, [hashes pretrained now])."""
    from .train.pretrain import run_pretraining

    runs, new = {}, []
    for h, pc in configs.items():
        m, t = pc.objective.mask_ratio, pc.objective.tasks
        hit = find_pretraining(tracking_uri, h)
        if hit:
            log(f"[sweep] pretraining mask_ratio={m} tasks={t}: cache hit {h} -> MLflow run {hit}")
            runs[h] = hit
            continue
        log(f"[sweep] pretraining mask_ratio={m} tasks={t}: cache miss {h}, pretraining ...")
        t0 = time.perf_counter()
        res = run_pretraining(pc, progress=False)
        log(f"[sweep]   done in {time.perf_counter() - t0:.0f} s -> MLflow run {res.run_id}")
        runs[h] = res.run_id
        new.append(h)
    return runs, new


# ------------------------------------------------------------------------------------------------------ trial

class TuneReporter:
    """`run_finetune`'s `on_epoch` callback inside a trial: each epoch's validation metric goes to `ray.tune.report`.

    The LAST epoch is held back and reported by `flush()` after `run_finetune` returned: ASHA stops every trial at
    max_t, and a stop at that report would cut the trial before its model is saved and its run ended."""

    def __init__(self, last_epoch: int):
        self.last, self.run_id, self.held = last_epoch, None, None

    def _report(self, rec: dict) -> None:
        import ray.tune

        ray.tune.report({**rec, "mlflow_run_id": self.run_id or ""})

    def __call__(self, epoch_rec: dict, run_id: str | None) -> None:
        self.run_id = run_id
        val = epoch_rec.get(METRIC, float("nan"))
        rec = {METRIC: val if math.isfinite(val) else -1.0, "val_finite": int(math.isfinite(val)),
               "train_loss": epoch_rec["train_loss"], "epoch": int(epoch_rec["epoch"]), "done": 0}
        if self.held is not None:
            self._report(self.held)
            self.held = None
        if rec["epoch"] >= self.last:
            self.held = rec
        else:
            self._report(rec)

    def flush(self) -> None:
        """After run_finetune returned (model saved, run FINISHED): the held-back last epoch, marked done."""
        if self.held is not None:
            self._report({**self.held, "done": 1})
            self.held = None


SWEPT = ("mask_ratio", "tasks", "decoder", "drug_rep", "lr")
"""The hyperparameters a sweep varies: each trial logs them as params `swept.<name>` (MLflow's compare view)."""


def trial_name(config: dict) -> str:
    """Readable trial/run name from the swept values, e.g. 'mask0.15-mask+cell-lstm-morgan-lr1.0e-03'."""
    return (f"mask{config['mask_ratio']}-{config['tasks']}-{config['decoder']}-{config['drug_rep']}"
            f"-lr{float(config['lr']):.1e}")


def _unique_trial_name(trial) -> str:
    return f"{trial_name(trial.config)}-{trial.trial_id.split('_')[-1]}"


@dataclass
class TrialSetup:
    """What every trial is given besides its point of the search space, as it is (`tune.with_parameters` puts it in
    Ray's object store): the sweep with its base configs set to run on the sweep's data, and the pretraining run of
    each pretraining hash."""

    sweep: SweepConfig
    adata: str
    shards: str
    pretrain_runs: dict[str, str]
    """pretraining hash -> MLflow run id."""
    tracking_uri: str
    parent_run_id: str
    out: str


def sweep_trial(config: dict, setup: TrialSetup) -> None:
    """Tune function trainable: one finetuning run (`config`: its point, SWEPT) from the pretraining of its mask ratio
    and task set, found by that pretraining config's hash. The trial's MLflow run holds the typed config it ran."""
    import ray.tune

    from .finetune.train import run_finetune

    ctx = ray.tune.get_context()
    point = {k: config[k] for k in SWEPT}
    phash = trial_pretraining(setup.sweep, point).pretraining_hash()
    fc = trial_finetuning(setup.sweep, point, pretrained=setup.pretrain_runs[phash], shards=setup.shards,
                          **{"tracking.uri": setup.tracking_uri, "tracking.experiment": setup.sweep.experiment,
                             "out": str(Path(setup.out) / "trials" / ctx.get_trial_name() / "model")})
    tags = {"scpert.stage": "sweep-trial", "scpert.trial_id": ctx.get_trial_id(),
            "scpert.pretrained_from_hash": phash, **{f"scpert.{k}": str(config[k]) for k in SWEPT}}
    reporter = TuneReporter(last_epoch=fc.optim.epochs - 1)
    run_finetune(fc, adata=setup.adata, on_epoch=reporter, run_name=ctx.get_trial_name(), tags=tags,
                 parent_run_id=setup.parent_run_id, extra_params={f"swept.{k}": config[k] for k in SWEPT})
    reporter.flush()


# ------------------------------------------------------------------------------------------------------ driver

def _check_data(cfg: SweepConfig) -> None:
    """Named errors for missing inputs, before anything is written."""
    if cfg.data.shards and cfg.data.adata:
        if not (Path(cfg.data.shards) / "manifest.json").is_file():
            raise InputFileError("shards folder without manifest.json", path=cfg.data.shards, field="data.shards",
                                 hint="make it with `scpert data lincs`")
        if not Path(cfg.data.adata).is_file():
            raise InputFileError("finetuning h5ad not found", path=cfg.data.adata, field="data.adata",
                                 hint="make it with `scpert data sciplex`")
    elif not cfg.data.simulate:
        raise ConfigError("no data: set data.shards and data.adata, or data.simulate (e.g. 'tiny')", field="data",
                          hint="--set data.shards=DIR --set data.adata=FILE.h5ad")


def _prepare_data(cfg: SweepConfig, out: Path, log=print) -> tuple[str, str]:
    _check_data(cfg)
    if cfg.data.shards and cfg.data.adata:
        return str(Path(cfg.data.shards).resolve()), str(Path(cfg.data.adata).resolve())
    d = out / "data"
    shards, adata = d / "shards", d / "sciplex.h5ad"
    if (shards / "manifest.json").is_file() and adata.is_file():
        log(f"[sweep] data: re-using {d}")
        return str(shards.resolve()), str(adata.resolve())
    meta = metadata_dir(cfg.data.metadata or None)
    t0 = time.perf_counter()
    simulate(d / "sim", preset=cfg.data.simulate, metadata=meta, seed=cfg.seed, progress=False)
    b = d / "sim" / "bulk"
    ingest_gctx(b / "lincs_level5.gctx", shards, siginfo=b / "siginfo.txt", geneinfo=b / "geneinfo.txt",
                compounds=b / "compounds.txt", metadata=meta, rows_per_shard=250, progress=False)
    prepare_sciplex(d / "sim" / "sciplex" / "sciplex3_sim.h5ad", adata, split="chemcpa_ood", seed=cfg.seed,
                    metadata=meta, manifest=shards / "manifest.json", landmarks_only=True)
    log(f"[sweep] data: simulated preset {cfg.data.simulate!r} (SEMI-SYNTHETIC) into {d} "
        f"({time.perf_counter() - t0:.0f} s)")
    return str(shards.resolve()), str(adata.resolve())


def test_metrics(model_dir: str | Path, adata: str, split: str, seed: int = 0) -> dict:
    """Test-drug metrics of a finetuned model: mean logFC Pearson over test conditions (drug x line x dose), and
    the number of test conditions. Called ONCE, for the selected trial; never fed to ASHA."""
    import numpy as np

    from .finetune.build import load_finetuned
    from .finetune.validate import logfc_pearson_groups

    model, meta = load_finetuned(model_dir)
    prep = Prepared(load_adata(adata), split, meta["drug_rep"])
    prep.use_saved_features(meta)
    rows = np.flatnonzero((~prep.ctl) & (prep.split == "test"))
    if not len(rows):
        return {}
    r = logfc_pearson_groups(model, prep, rows, np.random.default_rng(seed + 2), n_cells=16)
    return {"test_logfc_pearson": r, "test_conditions": float(len(condition_groups(prep, rows))),
            "test_drugs": float(len(set(prep.drug[rows])))}


def results_table(rows: list[dict]) -> str:
    """Markdown: one line per trial, best validation first."""
    cols = ["trial", "mask_ratio", "tasks", "decoder", "drug_rep", "lr", "epochs", "best_val_logfc_pearson",
            "status", "test_logfc_pearson", "run_id"]
    key = lambda r: -r["best_val_logfc_pearson"] if math.isfinite(r["best_val_logfc_pearson"]) else 9  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=key):
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pretrain_run_params(configs: dict[str, PretrainConfig], pre_runs: dict[str, str]) -> dict[str, str]:
    """Parent-run params naming the pretraining run of each (mask ratio, task set): 'pretrain_run.0.15_mask-cell-
    drug-dose' -> run id. MLflow keys allow only alphanumerics, _ - . space : /, so '+' is replaced."""
    import re

    return {"pretrain_run." + re.sub(r"[^A-Za-z0-9_\-. :/]", "-", f"{pc.objective.mask_ratio}_{pc.objective.tasks}"):
            pre_runs[h] for h, pc in configs.items()}


def _tuner(cfg: SweepConfig, setup: TrialSetup, epochs: int, out: Path, pid: str, verbose: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if not verbose:  # Ray's new output engine prints its experiment table whatever the verbosity; the legacy one
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # is silent at verbose=0
    sp = cfg.space
    lr = tune.loguniform(sp.lr_min, sp.lr_max) if sp.lr_max > sp.lr_min else sp.lr_min
    space = {"mask_ratio": tune.grid_search(sp.mask_ratio), "tasks": tune.grid_search(sp.tasks),
             "decoder": tune.grid_search(sp.decoder), "drug_rep": tune.grid_search(sp.drug_rep), "lr": lr}
    sched = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=min(cfg.asha.grace_period, epochs),
                          reduction_factor=cfg.asha.reduction_factor)
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(sweep_trial, setup=setup), {"cpu": cfg.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=sched, num_samples=sp.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent, trial_name_creator=_unique_trial_name),
        run_config=tune.RunConfig(name=f"{cfg.name}-{pid[:8]}", storage_path=str(out / "ray_tune"),
                                  verbose=2 if verbose else 0,
                                  failure_config=tune.FailureConfig(max_failures=0)))


def _trial_row(r, client) -> dict:
    """One trial's results row; a trial ASHA stopped early ends FINISHED, tagged `scpert.stopped_early`."""
    c, m = r.config or {}, r.metrics or {}
    df = r.metrics_dataframe
    hist = [] if df is None or METRIC not in df else [
        float(v) for v, ok in zip(df[METRIC], df.get("val_finite", [1] * len(df)), strict=False) if ok]
    run_id = m.get("mlflow_run_id", "")
    run_status = client.get_run(run_id).info.status if run_id else ""
    if r.error:
        status = "error"
    elif m.get("done") == 1 and run_status == "FINISHED":
        status = "completed"
    else:  # stopped by ASHA: Tune ended the trial's thread inside run_finetune (no model saved)
        status = "stopped"
    if run_id and status == "stopped":
        client.set_tag(run_id, "scpert.stopped_early", "true")
        if run_status != "FINISHED":  # RUNNING, or FAILED by the trial's own handler when Tune stopped it
            client.set_terminated(run_id, "FINISHED")
    return {"trial": trial_name(c) if c else "", "run_id": run_id, **{k: c.get(k) for k in SWEPT[:-1]},
            "lr": float(c.get("lr", float("nan"))), "epochs": len(df) if df is not None else 0,
            "best_val_logfc_pearson": max(hist) if hist else float("nan"), "val_history": hist,
            "status": status, "error": str(r.error)[:300] if r.error else ""}


def _select(rows: list[dict]) -> dict:
    done = [r for r in rows if r["status"] == "completed" and math.isfinite(r["best_val_logfc_pearson"])]
    if not done:
        errs = [r["error"] for r in rows if r["error"]]
        raise SweepError(f"no sweep trial completed ({len(rows)} trials); first errors: {errs[:2]}",
                         hint="see the trial errors above and the Ray Tune log under <out>/ray_tune")
    return max(done, key=lambda r: r["best_val_logfc_pearson"])


def _test_and_register(cfg: SweepConfig, best: dict, uri: str, adata: str, split: str, parent) -> str | None:
    """Test metrics of the selected trial only (once), logged; its model registered with the `champion` alias."""
    import mlflow


    model_dir = Path(mlflow.artifacts.download_artifacts(run_id=best["run_id"], artifact_path="model",
                                                         tracking_uri=uri))
    tm = test_metrics(model_dir, adata, split, seed=cfg.seed)
    best.update(tm)
    trial = Tracker.attach(uri, best["run_id"])
    trial.log_metrics(tm)
    trial.set_tags({"scpert.best": "true"})
    parent.log_metrics({f"best_{k}": v for k, v in tm.items()} | {f"best_{METRIC}": best["best_val_logfc_pearson"]})
    parent.set_tags({"scpert.best_run_id": best["run_id"]})
    if not cfg.register_as:
        return None
    desc = (f"Best trial of sweep {cfg.name!r} (parent run {parent.run_id}) by {METRIC} on validation drugs: "
            + ", ".join(f"{k}={best[k]}" for k in SWEPT) + f"; test logFC r {tm.get('test_logfc_pearson', float('nan')):.3f}")
    version = trial.register_model(cfg.register_as, metrics={f"best_{METRIC}": best["best_val_logfc_pearson"], **tm},
                                   tags={"scpert.sweep_parent": parent.run_id, **{k: str(best[k]) for k in SWEPT}},
                                   description=desc, alias="champion")
    parent.set_tags({"scpert.registered_model": f"{cfg.register_as}/{version}"})
    return version


def _write_results(cfg: SweepConfig, out: Path, parent, rows, best, pre_runs, new, version) -> str:
    table = results_table(rows)
    (out / "sweep_results.md").write_text(f"# {cfg.name}\n\nparent run {parent.run_id}; selection by {METRIC} "
                                          f"(validation drugs); test metric of the selected trial only.\n\n{table}\n")
    (out / "sweep_results.json").write_text(json.dumps({"parent_run_id": parent.run_id, "best": best, "rows": rows,
                                                        "pretrain_runs": pre_runs, "pretrained_now": new,
                                                        "model_version": version}, indent=1, default=str))
    parent.log_artifact(out / "sweep_results.md")
    parent.log_artifact(out / "sweep_results.json")
    parent.log_artifact(parallel_coordinates_png(rows, out / "sweep_parallel_coordinates.png"), "plots")
    return table


def run_sweep(cfg: SweepConfig, *, log=print, verbose: bool = False) -> SweepResult:
    """Pretrain what is missing, run the Tune sweep, select, test once, register. See the module docstring.
    `verbose`: Tune's trial tables too."""
    from .train.pretrain import ensure_ray

    t_all = time.perf_counter()
    _check_data(cfg)
    out = ensure_writable_dir(Path(cfg.out)).resolve()
    uri = resolve_uri(cfg.tracking_uri or None)
    shards, adata = _prepare_data(cfg, out, log)
    cfg = with_run_settings(cfg, shards, uri, out)
    pcs = pretrain_configs(cfg)
    parent = Tracker(uri, experiment=cfg.experiment, run_name=cfg.name, tags={"scpert.stage": "sweep"})
    log(f"[sweep] {cfg.name}: MLflow parent run {parent.run_id} ({uri}), experiment {cfg.experiment!r}")
    try:
        pre_runs, new = ensure_pretrained(pcs, uri, log)
        parent.log_params({**{f"sweep.{k}": str(v)[:250] for k, v in params(cfg).items()},
                           **pretrain_run_params(pcs, pre_runs)})
        parent.set_tags({"scpert.pretrained_now": ",".join(new) or "none"})
        ensure_ray(1, cfg.cpus_per_trial)
        epochs = cfg.finetune.optim.epochs
        setup = TrialSetup(sweep=cfg, adata=adata, shards=str(shards), pretrain_runs=pre_runs, tracking_uri=uri,
                           parent_run_id=parent.run_id, out=str(out))
        sp = cfg.space
        n_trials = math.prod(len(x) for x in (sp.mask_ratio, sp.tasks, sp.decoder, sp.drug_rep)) * sp.num_samples
        log(f"[sweep] Tune: {n_trials} trials, ASHA on {METRIC} (validation drugs) over {epochs} epochs, "
            f"{cfg.max_concurrent} at once x {cfg.cpus_per_trial} CPU")
        grid = _tuner(cfg, setup, epochs, out, parent.run_id, verbose).fit()
        rows = [_trial_row(r, parent.client) for r in grid]
        best = _select(rows)
        version = _test_and_register(cfg, best, uri, adata, cfg.finetune.data.split, parent)
        table = _write_results(cfg, out, parent, rows, best, pre_runs, new, version)
        parent.log_metrics({"sweep_s": time.perf_counter() - t_all})
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    log(table)
    log(f"[sweep] best: {trial_name(best)} val r={best['best_val_logfc_pearson']:.3f} "
        f"test r={best.get('test_logfc_pearson', float('nan')):.3f} run {best['run_id']}"
        + (f", registered {cfg.register_as} v{version} (alias champion: models:/{cfg.register_as}@champion)"
           if version else "") + f" ({time.perf_counter() - t_all:.0f} s)")
    return SweepResult(parent.run_id, best, rows, pre_runs, new, table, version)


def parallel_coordinates_png(rows: list[dict], path: Path) -> Path:
    """Swept hyperparameters (categorical axes) vs the selection metric, one line per trial coloured by it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    axes = [k for k in SWEPT if len({str(r.get(k)) for r in rows}) > 1] or ["decoder"]
    cats = {k: sorted({str(r.get(k)) for r in rows}) for k in axes}
    vals = np.array([r["best_val_logfc_pearson"] for r in rows], float)
    lo, hi = np.nanmin(vals) if np.isfinite(vals).any() else 0, np.nanmax(vals) if np.isfinite(vals).any() else 1
    fig, ax = plt.subplots(figsize=(1.8 * (len(axes) + 1) + 2, 3.6))
    cmap = plt.get_cmap("viridis")
    for r, v in zip(rows, vals, strict=True):
        ys = [(cats[k].index(str(r.get(k))) + 0.5) / len(cats[k]) for k in axes]
        ys.append(0.0 if not np.isfinite(v) else (v - lo) / (hi - lo or 1))
        ax.plot(range(len(ys)), ys, color=cmap(ys[-1]) if np.isfinite(v) else "lightgrey",
                ls="-" if r["status"] == "completed" else "--", lw=2, alpha=0.85)
    for i, k in enumerate(axes):
        ax.axvline(i, color="k", lw=0.6)
        for j, c in enumerate(cats[k]):
            ax.text(i, (j + 0.5) / len(cats[k]), f" {c}", fontsize=8, va="center")
    ax.axvline(len(axes), color="k", lw=0.6)
    ax.text(len(axes), 1.0, f" {hi:.3f}", fontsize=8, va="center")
    ax.text(len(axes), 0.0, f" {lo:.3f}", fontsize=8, va="center")
    ax.set_xticks(range(len(axes) + 1), [*axes, f"best {METRIC}"])
    ax.set_yticks([])
    ax.set_title("sweep: swept hyperparameters vs validation logFC r (dashed: stopped early)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
