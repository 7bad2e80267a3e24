"""What every job entry point shares: the tracking URI a job will use, checked before anything runs.

A Ray job runs in a temporary copy of the working dir on the cluster. A relative `sqlite:///mlflow.db` there is a
different file for the driver, for every worker and every trial, and is deleted with the job: a sweep's trials then
fail with "Run ... not found". So a job that would track into a relative sqlite file on a Ray cluster stops at once
and says what to set."""

from __future__ import annotations

import os

from scpert_dist.errors import ConfigError

FLAGS = ("--tracking", "--tracking-uri")
"""Options that name the tracking URI on the command line (finetune/benchmark/predict; runs/sweep)."""
SET_KEYS = ("tracking.uri=", "tracking_uri=")
"""`--set` overrides that name it (pretrain and finetune: tracking.uri, sweep: tracking_uri)."""


def explicit_uri(argv: list[str]) -> str | None:
    """The tracking URI given on the command line, if any (the last one wins)."""
    found = None
    for i, a in enumerate(argv):
        if a in FLAGS and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(tuple(f"{f}=" for f in FLAGS)):
            found = a.split("=", 1)[1]
        elif i > 0 and argv[i - 1] == "--set" and a.startswith(SET_KEYS):
            found = a.split("=", 1)[1]
    return found


def is_relative_sqlite(uri: str) -> bool:
    """sqlite:///mlflow.db (relative to the working dir) -> True; sqlite:////abs/path.db, http://... -> False."""
    return uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/")


def effective_uri(argv: list[str]) -> str:
    """The URI the job will track into: the command line's, else $MLFLOW_TRACKING_URI, else the default."""
    return explicit_uri(argv) or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def require_shared_tracking(argv: list[str], on_cluster: bool | None = None) -> str:
    """The effective tracking URI; a ConfigError when it is a relative sqlite file on a Ray cluster."""
    uri = effective_uri(argv)
    if on_cluster is None:
        on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if on_cluster and is_relative_sqlite(uri) and "--help" not in argv:
        raise ConfigError(
            f"this job would track into {uri!r}, a file in the job's temporary working dir that the workers and "
            "trials do not share", field="MLFLOW_TRACKING_URI",
            hint="start the cluster with MLFLOW_TRACKING_URI set (cluster/local/start.sh does it), or pass the "
                 "server to the job: --set tracking_uri=http://HOST:5000 (sweep), --set tracking.uri=... "
                 "(pretrain, finetune), --tracking ... (finetune, benchmark)")
    return uri


def with_tracking_flag(argv: list[str], flag: str = "--tracking") -> list[str]:
    """argv plus `flag $MLFLOW_TRACKING_URI` when the command line names no URI and the environment does (commands
    whose option does not read the environment itself)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and explicit_uri(argv) is None:
        return [*argv, flag, env]
    return list(argv)


def run_cli(command: list[str], argv: list[str], tracking_flag: str | None = None) -> None:
    """`scpert <command> <argv>` after the tracking check (named error, exit 2, when it fails)."""
    import sys

    from scpert_dist.cli import main

    try:
        require_shared_tracking(argv)
    except ConfigError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.argv = ["scpert", *command, *(with_tracking_flag(argv, tracking_flag) if tracking_flag else argv)]
    main()
