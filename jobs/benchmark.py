"""Ray job entrypoint for the benchmark (`ray job submit -- python jobs/benchmark.py --data D.h5ad --out DIR ...`).

Thin: checks the tracking URI (jobs/entry.py), then forwards its arguments to `scpert benchmark`."""

import sys

from entry import run_cli

if __name__ == "__main__":
    run_cli(["benchmark"], sys.argv[1:], tracking_flag="--tracking")
