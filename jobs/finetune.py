"""Ray job entrypoint for finetuning (`ray job submit -- python jobs/finetune.py --data D.h5ad [--set k=v ...]`).

Thin: checks the tracking URI (jobs/entry.py), then forwards its arguments to `scpert finetune` (the loop itself
is plain PyTorch and runs without Ray)."""

import sys

from entry import run_cli

if __name__ == "__main__":
    run_cli(["finetune"], sys.argv[1:], tracking_flag="--tracking")
