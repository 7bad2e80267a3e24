"""The documented cluster recipe, run AS WRITTEN: the bash block of cluster/README.md ("Local use", the same block as
README.md's "Cluster" section) is extracted and run line by line in a fresh shell (no MLFLOW_TRACKING_URI, no
RAY_ADDRESS), only with free ports and a short state dir substituted for 5000/8265/.scpert-local. Then: the parent
sweep run, its nested trial runs and the registered model are on the MLflow server; the `scpert predict` command the
job printed works on models:/scpert-tiny@champion; the job log holds no library warnings; stop.sh leaves no process."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """One command per entry: continuation lines joined, trailing `  # comments` dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [re.split(r"\s{2,}#", line)[0].strip() for line in joined.splitlines() if line.strip()]


def documented_recipe() -> list[str]:
    cluster = bash_blocks((REPO / "cluster" / "README.md").read_text())
    readme = bash_blocks((REPO / "README.md").read_text())
    recipe = next(b for b in cluster if "cluster/local/start.sh" in b)
    assert recipe in readme, "README.md's Cluster section must show cluster/README.md's recipe block"
    return commands(recipe)


def test_recipe_block_parses():
    cmds = documented_recipe()
    assert cmds[0].startswith("cluster/local/start.sh") and cmds[-1].startswith("cluster/local/stop.sh")
    assert any(c.startswith("export ") and "MLFLOW_TRACKING_URI=" in c for c in cmds)
    assert any(c.startswith("ray job submit") and "jobs/sweep.py" in c for c in cmds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _substitute(cmd: str, ports: dict, state: Path) -> str:
    cmd = cmd.replace("127.0.0.1:5000", f"127.0.0.1:{ports['MLFLOW_PORT']}")
    cmd = cmd.replace("127.0.0.1:8265", f"127.0.0.1:{ports['DASHBOARD_PORT']}")
    return cmd.replace(".scpert-local", str(state))


def _job_log(output: str) -> list[str]:
    """The lines the job itself wrote: after Ray's 'Running entrypoint' line, up to the submitting CLI's next own
    log record ('... SUCC cli.py ... Job ... succeeded')."""
    lines = output.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("Running entrypoint for job"))
    cli = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t")
    end = next((i for i in range(start + 1, len(lines)) if cli.match(lines[i])), len(lines))
    return lines[start + 1:end]


def _group_alive(pgids: list[int]) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pgid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.split(None, 1)[0].isdigit()
            and int(line.split(None, 1)[0]) in pgids]


def test_documented_cluster_recipe_runs_as_written(shared_data, tmp_path):
    from mlflow.tracking import MlflowClient

    cmds = documented_recipe()
    state = Path(tempfile.mkdtemp(prefix="scpd-"))  # short: Ray's socket paths under it must stay < 108 bytes
    ports = {"RAY_PORT": _free_port(), "DASHBOARD_PORT": _free_port(), "AGENT_PORT": _free_port(),
             "MLFLOW_PORT": _free_port()}
    bindir = str(Path(sys.executable).parent)  # an activated venv: the job runs with the python on PATH at ray start
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update({k: str(v) for k, v in ports.items()})
    env.update(PATH=f"{bindir}:{env['PATH']}", SCPERT_METADATA=str(shared_data), NUM_CPUS="4")
    script = [_substitute(c, ports, state) for c in cmds]
    stop = script.pop()
    exports = [c for c in script if c.startswith("export ")]
    uri = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
    t0 = time.time()
    try:
        run = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(script)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=1200)
        out = run.stdout + run.stderr
        (tmp_path / "recipe_output.txt").write_text(out)  # kept by pytest for a look after a failure
        assert run.returncode == 0, out[-5000:]
        t_job = time.time() - t0
        assert "ready: Ray head" in out  # start.sh returned only once both answered
        assert "Usage stats collection is disabled" in (state / "ray.log").read_text()
        done = re.search(r"SWEEP_DONE parent=(\w+) best=(\w+) version=(\d+)", out)
        assert done, out[-5000:]
        parent_id, best_id, version = done.groups()

        client = MlflowClient(uri)
        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED" and parent.data.tags["scpert.best_run_id"] == best_id
        kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
        assert len(kids) == 4  # sweeps/tiny.yaml: 2 mask ratios x 2 decoders
        assert {r.data.params["swept.decoder"] for r in kids} == {"mlp", "gru"}
        assert all(r.info.status == "FINISHED" for r in kids)  # early-stopped ones too (tagged scpert.stopped_early)
        mv = client.get_model_version_by_alias("scpert-tiny", "champion")
        assert mv.version == version and mv.run_id == best_id
        assert "sweep" in run.stdout and parent_id in run.stdout  # `scpert runs --kind sweep`

        predict = re.search(r"predict with it:\n\s*(scpert predict .*)", out)
        assert predict and "models:/scpert-tiny@champion" in predict.group(1), out[-3000:]
        pred = state / "pred.h5ad"
        cmd = predict.group(1).replace("--out pred.h5ad", f"--out {pred}")
        p = subprocess.run(["bash", "-c", "\n".join([*exports, cmd])], cwd=state, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        import anndata as ad

        a = ad.read_h5ad(pred)
        assert a.n_obs > 0 and a.n_vars > 0
        print(f"recipe + sweep job {t_job:.0f} s, total {time.time() - t0:.0f} s")
        job_log = _job_log(out)
        noise = r"warn|\(raylet\)|pid=|Traceback|\x1b\[|View run|Downloading artifacts"
        noisy = [x for x in job_log if re.search(noise, x, re.I)]
        assert not noisy, "\n".join(repr(x[:300]) for x in noisy[:40])
        assert any(x.startswith("[sweep]") for x in job_log)
    finally:
        pgids = [int((state / f"{n}.pid").read_text()) for n in ("ray", "mlflow") if (state / f"{n}.pid").exists()]
        s = subprocess.run(["bash", "-c", stop], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        end = time.time() + 30
        while time.time() < end and _group_alive(pgids):
            time.sleep(1)
        left = _group_alive(pgids)
        shutil.rmtree(state, ignore_errors=True)
    assert s.returncode == 0, s.stderr
    assert not left, left
