"""Ray job entrypoint for finetuning (`ray job submit -- python jobs/finetune.py --data D.h5ad [--set k=v ...]`).

Thin: forwards its arguments to `scpert finetune` (the loop itself is plain PyTorch and runs without Ray)."""

import sys

from scpert_dist.cli import main

if __name__ == "__main__":
    sys.argv = ["scpert", "finetune", *sys.argv[1:]]
    main()
