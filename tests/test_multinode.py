"""Pretraining across two Ray nodes on one machine (`ray.cluster_utils.Cluster`), workers spread one per node.

Runs in a subprocess: a Cluster needs its own Ray, and the rest of the suite shares one session-scoped local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import ray
    from ray.cluster_utils import Cluster
    from scpert_dist.config import load
    from scpert_dist.train.callbacks import RecordRows
    from scpert_dist.train.pretrain import PretrainConfig, run_pretraining
    from shards_fixture import simulated_shards

    root = Path({root!r})
    shards = simulated_shards(root, metadata=None)
    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    cfg = load(PretrainConfig, None, [f"data.shards={{shards}}", "model.preset=tiny", "objective.tasks=mask",
        "optim.batch_size=8", "optim.max_steps=6", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        "scaling.placement_strategy=SPREAD", "checkpoint.every_n_steps=3", f"checkpoint.storage={{root / 'ray'}}",
        f"tracking.uri=sqlite:///{{root / 'mlflow.db'}}"])
    res = run_pretraining(cfg, progress=False, callbacks=[RecordRows(str(root / 'acc'))])
    nodes = sorted({{(root / 'acc' / f'node{{r}}.txt').read_text() for r in (0, 1)}})
    print("RESULT" + json.dumps({{"nodes": nodes, "alive": len([n for n in ray.nodes() if n["Alive"]]),
                                 "step": res.metrics["step"], "mask_rmse": res.metrics["mask_rmse"]}}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_two_node_cluster_spreads_workers(tmp_path):
    tests = str(__import__("pathlib").Path(__file__).parent)
    env = {**__import__("os").environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests, root=str(tmp_path))],
                          capture_output=True, text=True, timeout=600, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT"):])
    assert out["alive"] == 2
    assert len(out["nodes"]) == 2, "workers were not placed on two nodes"
    assert out["step"] == 6 and out["mask_rmse"] == out["mask_rmse"]
