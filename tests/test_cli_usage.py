"""CLI usage errors (unknown option, missing option, bad value, unknown command) print a short usage message and
exit 2, never a traceback; `scpert runs --kind` shows the stage's own columns."""

from __future__ import annotations

import sys

import pytest

from scpert_dist.cli import main


def _run(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["scpert", *argv])
    code = 0
    try:
        main()
    except SystemExit as ex:
        code = ex.code
    cap = capsys.readouterr()
    return code, cap.out + cap.err


@pytest.mark.parametrize(("argv", "said"), [
    (["runs", "--bogus"], "No such option: --bogus"),
    (["predict", "--model", "x"], "Missing option"),
    (["runs", "--max-runs", "abc"], "Invalid value for '--max-runs'"),
    (["nocommand"], "No such command 'nocommand'"),
    (["runs", "--kind", "pretraining"], "Invalid value for '--kind'"),
])
def test_usage_errors_are_short_and_exit_2(monkeypatch, capsys, argv, said):
    code, text = _run(monkeypatch, capsys, *argv)
    assert code == 2
    assert said in text
    assert "Usage: scpert" in text and "--help" in text
    assert "Traceback" not in text and len(text.splitlines()) <= 6, text


def test_help_reaches_the_console(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, text = _run(monkeypatch, capsys, "runs", "--help")
    assert code in (None, 0) and "--kind" in text and "Options" in text
    assert not (tmp_path / "scpert_logs").exists()  # nothing of it went to a log file


def test_named_error_exits_2_without_traceback(monkeypatch, capsys, tmp_path):
    code, text = _run(monkeypatch, capsys, "sweep", "--config", str(tmp_path / "absent.yaml"))
    assert code == 2 and "error:" in text and "Traceback" not in text, text


# ------------------------------------------------------------------------------------------------ clean console

# lines as Ray 2.60 / MLflow 3.17 printed them on the demo's console (before the console filter), ANSI codes kept
LIBRARY_LINES = [
    "2026/11/30 15:59:28 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "2026-11-30 15:59:40,064\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
    "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-11-30 15:59:53,231\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard at "
    "\x1b[1m\x1b[32mhttp://127.0.0.1:36815 \x1b[39m\x1b[22m",
    "\x1b[36m(TrainController pid=14669)\x1b[0m [2026-11-30 16:00:50,827 E 14669 14763] core_worker.cc:2465: Actor "
    "with class name: 'PreemptionWatcher' and ID: '8d2b41b402be05e8e2ba1f5301000000' has constructor arguments",
    "\x1b[36m(DatasetManager pid=15449)\x1b[0m /usr/lib/python3/site-packages/ray/data/_internal/execution/interfaces/execution_options.py:436:"
    " RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
    "\x1b[36m(DatasetManager pid=15449)\x1b[0m   self.exclude_resources = exclude_resources",
    "\x1b[33m(raylet)\x1b[0m WARNING: 12 PYTHON worker processes have been started on node: 331ea99 with address: "
    "192.0.2.2, which is 6x the maximum expected startup concurrency (2).",
    "\x1b[36m(PlacementGroupCleaner pid=14919)\x1b[0m Traceback (most recent call last):",
    "\x1b[36m(pid=gcs_server)\x1b[0m [2026-11-30 16:31:02,114 E 2561 2561] gcs_actor_manager.cc:1163: KillActor RPC "
    "failed for actor 835bce9209e94775f52c0ac202000000: RpcError: RPC error: Socket closed rpc_code: 14",
    "/x/site-packages/anndata/_core/anndata.py:1758: FutureWarning: The AnnData.concatenate method is deprecated",
    "Trial status: 2 RUNNING | 1 TERMINATED",
    "\x1b[36m(MapBatches(_prepare) pid=14789)\x1b[0m Failed to convert column 'expr' into pyarrow array "
    "(ArrowConversionError); falling back to serialize as pickled python objects.",
    "🏃 View run pretrain-20261130-162602-ddd84f at: http://127.0.0.1:48683/#/experiments/2/runs/d526fa7ba8e14ef4",
]
STEP_REPEATED = ("\x1b[36m(sweep_trial pid=31)\x1b[0m epoch 1: loss 2.0579 val logFC r 0.094 (0.1s)\x1b[32m [repeated 2x "
                 "across cluster]\x1b[0m")
STEP = "\x1b[36m(RayTrainWorker pid=15211)\x1b[0m [pretrain] step 5/56 epoch 0 loss 10.9212 17.7 samples/s"


def test_console_keeps_our_lines_and_logs_the_rest(tmp_path):
    import io

    from scpert_dist.console import Console, FilteredStream

    log = tmp_path / "logs" / "libraries.log"
    con = Console(log)
    con.terminal = term = io.StringIO()
    shown = io.StringIO()
    out = FilteredStream(con, shown)
    ours = ["== 3/5 pretrain: Ray Data -> Ray Train (2 workers) -> MLflow ==", "   (14.6 s)",
            "[sweep] best: mask0.8-mask-gru-morgan-lr1.0e-03 val r=0.101", "error: ConfigError: bad"]
    for line in [ours[0], *LIBRARY_LINES, STEP, STEP, STEP_REPEATED, *ours[1:]]:
        out.write(line + "\n")
    text = shown.getvalue()
    assert text.splitlines() == [ours[0], "[pretrain] step 5/56 epoch 0 loss 10.9212 17.7 samples/s",
                                 "epoch 1: loss 2.0579 val logFC r 0.094 (0.1s)", *ours[1:]]
    logged = log.read_text()
    assert len(logged.splitlines()) == len(LIBRARY_LINES) and "\x1b[" not in logged
    assert term.getvalue() == f"(Ray, MLflow and other library output: {log})\n"  # announced once
    verbose = Console(tmp_path / "v.log", verbose=True)
    assert all(verbose.keep(line) == line for line in LIBRARY_LINES) and not (tmp_path / "v.log").exists()


def test_console_routes_python_warnings(tmp_path, monkeypatch):
    import io
    import warnings

    from scpert_dist.console import Console

    con = Console(tmp_path / "lib.log")
    con.terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    con.showwarning("deprecated thing", FutureWarning, "/x/site-packages/anndata/_core/anndata.py", 1758)
    con.showwarning("tracking failed", RuntimeWarning, "/x/scpert_dist/tracking.py", 120)
    assert sys.stderr.getvalue() == "warning: tracking failed\n"
    assert "FutureWarning: deprecated thing" in (tmp_path / "lib.log").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", con.showwarning)
        warnings.warn("from a library", DeprecationWarning, stacklevel=1)
    assert "DeprecationWarning: from a library" in (tmp_path / "lib.log").read_text()


def test_predict_logs_library_output_next_to_its_output(monkeypatch, capsys, tmp_path):
    """`scpert predict` sends library output to <out stem>.libraries.log beside the predictions, not ./scpert_logs/."""
    from scpert_dist import console

    monkeypatch.chdir(tmp_path)
    (tmp_path / "preds").mkdir()
    con = console.install("scpert-predict")  # the console main() installs (install is idempotent)
    code, text = _run(monkeypatch, capsys, "predict", "--model", str(tmp_path / "no-model"), "--drug", "D",
                      "--cell-line", "L", "--dose", "1", "--out", str(tmp_path / "preds" / "p.h5ad"))
    assert code == 2 and "error:" in text and "Traceback" not in text, text  # the absent model is a named error
    assert con.log_path == tmp_path / "preds" / "p.libraries.log"
    assert not (tmp_path / "scpert_logs").exists()


# ------------------------------------------------------------------------------------------ scpert runs --kind

@pytest.mark.slow  # creating a sqlite MLflow store runs its migrations (seconds to tens of seconds)
def test_runs_kind_shows_each_stages_columns(monkeypatch, capsys, mlflow_uri):
    """Runs as the stages write them (Tracker, stage tags, their params and metrics) in a real sqlite store."""
    from scpert_dist.runs import list_stage_runs
    from scpert_dist.tracking import Tracker

    pre = Tracker(mlflow_uri, "scpert-pretrain", "pre-a", tags={"scpert.stage": "pretrain"})
    pre.log_params({"objective": {"mask_ratio": 0.15, "tasks": "mask"}, "scaling": {"num_workers": 2}})
    pre.log_metrics({"loss": 3.5}, step=10)
    pre.log_metrics({"final_mask_rmse": 0.75, "final_samples_per_s": 120.0})
    pre.end()
    ft = Tracker(mlflow_uri, "scpert-finetune", "ft-a")  # `scpert finetune` sets no stage tag
    ft.log_params({"model": {"decoder": "lstm", "drug_rep": "morgan", "pretrained": pre.run_id}, "optim": {"epochs": 2}})
    ft.log_metrics({"train_loss": 1.25, "best_val_logfc_pearson": 0.125})
    ft.end()
    parent = Tracker(mlflow_uri, "scpert-sweep", "sweep-a", tags={"scpert.stage": "sweep"})
    trial = Tracker(mlflow_uri, "scpert-sweep", "trial-a", parent_run_id=parent.run_id,
                    tags={"scpert.stage": "sweep-trial", "scpert.stopped_early": "true"})
    trial.log_params({"swept.decoder": "gru", "swept.mask_ratio": 0.8})
    trial.log_metrics({"best_val_logfc_pearson": 0.0625})

    (p,) = list_stage_runs(mlflow_uri, "pretrain")
    assert (p["name"], p["mask_ratio"], p["workers"], p["loss"], p["mask_rmse"]) == ("pre-a", "0.15", "2", 3.5, 0.75)
    assert "decoder" not in p
    (f1, f2) = sorted(list_stage_runs(mlflow_uri, "finetune"), key=lambda r: r["name"])
    assert (f1["name"], f1["decoder"], f1["pretrained"], f1["val_logFC_r"]) == ("ft-a", "lstm", pre.run_id[:8], 0.125)
    assert f2["name"] == "trial-a"  # a sweep trial is a finetuning run too
    rows = {r["name"]: r for r in list_stage_runs(mlflow_uri, "sweep")}
    assert set(rows) == {"sweep-a", "trial-a"} and rows["trial-a"]["parent"] == parent.run_id[:8]
    assert rows["trial-a"]["stopped_early"] == "true" and rows["trial-a"]["decoder"] == "gru"
    assert list_stage_runs(mlflow_uri, "benchmark") == []

    code = None
    monkeypatch.setattr(sys, "argv", ["scpert", "runs", "--kind", "pretrain", "--tracking-uri", mlflow_uri])
    try:
        main()
    except SystemExit as e:
        code = e.code
    text = capsys.readouterr().out
    assert code in (None, 0)
    header = text.splitlines()[0].split()
    assert header[:5] == ["run_id", "name", "status", "mask_ratio", "tasks"] and "mask_rmse" in header
    assert pre.run_id in text and ft.run_id not in text
