"""Ray job entrypoint for the benchmark (`ray job submit -- python jobs/benchmark.py --data D.h5ad --out DIR ...`).

Thin: forwards its arguments to `scpert benchmark`."""

import sys

from scpert_dist.cli import main

if __name__ == "__main__":
    sys.argv = ["scpert", "benchmark", *sys.argv[1:]]
    main()
