"""Ray job entrypoint for a sweep:

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/sweep.py --config sweeps/tiny.yaml [--set key=value ...]

Runs on the cluster's driver: connects to the cluster (RAY_ADDRESS is set by the job supervisor), pretrains the
missing pretraining configs, runs the Tune sweep and registers the best model (scpert_dist.tune.run_sweep).
MLflow: $MLFLOW_TRACKING_URI (passed through by runtime_env.yaml) unless the config sets tracking_uri."""

import argparse
import sys

from scpert_dist.errors import ScpertError
from scpert_dist.tune import load_sweep, run_sweep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="sweep YAML (sweeps/tiny.yaml, sweeps/paper.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override key=value")
    args = ap.parse_args(argv)
    try:
        res = run_sweep(load_sweep(args.config, args.overrides))
    except ScpertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"SWEEP_DONE parent={res.parent_run_id} best={res.best['run_id']} version={res.model_version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
