"""Does a run whose worker was killed end where an unkilled run ends? Held-out Table-1 metrics of tiny pretraining
runs (2 Ray Train workers, DDP, simulated LINCS-shaped shards, 2 epochs) side by side: seed 0 unkilled, seed 0 with
worker 1 killed (os._exit) at step 10 and restarted from the step-8 checkpoint, and seeds 1 and 2 unkilled for the
seed-to-seed noise. Semi-synthetic data; minutes on 2 cores.

    python benchmarks/kill_vs_clean.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "scpert_dist" / "configs" / "pretrain_tiny.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    import numpy as np
    import ray

    from scpert_dist.config import load
    from scpert_dist.data.shards.ingest import ingest_gctx
    from scpert_dist.data.simulate import simulate
    from scpert_dist.train.callbacks import KillWorker
    from scpert_dist.train.pretrain import PretrainConfig, run_pretraining

    root = args.workdir or Path(tempfile.mkdtemp(prefix="scpert-kill-vs-clean-"))
    root.mkdir(parents=True, exist_ok=True)
    shards = root / "shards"
    if not (shards / "manifest.json").exists():
        simulate(root / "sim", preset="tiny", seed=0, progress=False)
        bulk = root / "sim" / "bulk"
        ingest_gctx(bulk / "lincs_level5.gctx", shards, siginfo=bulk / "siginfo.txt", geneinfo=bulk / "geneinfo.txt",
                    compounds=bulk / "compounds.txt", rows_per_shard=250, progress=False)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    runs = {"seed0 unkilled": ["seed=0"],
            "seed0 worker killed at step 10": ["seed=0"],
            "seed1 unkilled": ["seed=1"], "seed2 unkilled": ["seed=2"]}
    keys = ("mask_rmse", "cell_acc", "drug_acc", "dose_rmse")
    out = {}
    for i, (name, extra) in enumerate(runs.items()):
        t = time.time()
        cfg = load(PretrainConfig, TINY, [f"data.shards={shards}", f"tracking.uri=sqlite:///{root}/mlflow.db",
                                          f"checkpoint.storage={root / 'ray' / str(i)}", "optim.max_steps=0",
                                          "optim.epochs=2", "optim.batch_size=16", "checkpoint.every_n_steps=4",
                                          "data.val_fraction=0.2", "optim.lr=5e-3", *extra])
        res = run_pretraining(cfg, progress=False, callbacks=[KillWorker(at_step=10, rank=1)] if "killed" in name else [])
        out[name] = {k: float(res.metrics[k]) for k in keys}
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[name].items()) + f" ({time.time() - t:.0f}s)",
              flush=True)
    clean = [v for k, v in out.items() if "unkilled" in k]
    print("\n| metric | seed0 unkilled | seed0 killed | killed - unkilled | unkilled seeds: min .. max |")
    print("|---|---|---|---|---|")
    for k in keys:
        a, b = out["seed0 unkilled"][k], out["seed0 worker killed at step 10"][k]
        vals = np.array([c[k] for c in clean])
        print(f"| {k} | {a:.4f} | {b:.4f} | {b - a:+.4f} | {vals.min():.4f} .. {vals.max():.4f} |")
    (root / "kill_vs_clean.json").write_text(json.dumps(out, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
