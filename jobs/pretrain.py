"""Ray job entrypoint for pretraining:

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py --config scpert_dist/configs/pretrain_base.toml --set data.shards=/shared/shards

Inside a Ray job, RAY_ADDRESS is set, so `run_pretraining` joins the cluster instead of starting a local Ray.
Thin: checks the tracking URI (jobs/entry.py), then forwards its arguments to `scpert pretrain`."""

import sys

from entry import run_cli

if __name__ == "__main__":
    run_cli(["pretrain"], sys.argv[1:])
