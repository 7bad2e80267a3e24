"""Ray job entrypoint for a sweep:

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/sweep.py --config sweeps/tiny.yaml [--set key=value ...] [--verbose]

Runs on the cluster's driver: connects to the cluster (RAY_ADDRESS is set by the job supervisor), pretrains the
missing pretraining configs, runs the Tune sweep and registers the best model (scpert_dist.tune.run_sweep).
MLflow: $MLFLOW_TRACKING_URI (passed through by runtime_env.yaml) unless the config sets tracking_uri; a relative
sqlite file is refused on a cluster (jobs/entry.py). The job log holds our progress and results; library messages
go to <out>/logs/ (one line says where)."""

import argparse
import sys
import traceback
from pathlib import Path

from entry import require_shared_tracking

from scpert_dist import console
from scpert_dist.cli.sweep_cmd import parent_url, predict_command
from scpert_dist.errors import ScpertError
from scpert_dist.tune import load_sweep, run_sweep


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="sweep YAML (sweeps/tiny.yaml, sweeps/paper.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override key=value")
    ap.add_argument("--verbose", action="store_true", help="keep library messages and Tune's tables in the log")
    args = ap.parse_args(argv)
    con = console.install("sweep", verbose=args.verbose or None)
    try:
        require_shared_tracking(argv)
        cfg = load_sweep(args.config, args.overrides)
        con.set_log_path(Path(cfg.out) / "logs" / "libraries.log")
        res = run_sweep(cfg, verbose=args.verbose)
    except ScpertError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the job log gets one readable error, the traceback goes to the log file
        con.log(traceback.format_exc())
        first = console.ANSI.sub("", str(e)).strip().splitlines() or [""]
        print(f"error: {type(e).__name__}: {first[0][:500]} (traceback: {con.log_path})", file=sys.stderr)
        return 1
    url = parent_url(cfg, res)
    if url:
        print(f"MLflow: {url}")
    print(f"predict with it:\n  {predict_command(cfg, res)}")
    print(f"SWEEP_DONE parent={res.parent_run_id} best={res.best['run_id']} version={res.model_version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
