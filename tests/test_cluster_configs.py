"""cluster/ files, each checked by the tool that reads it (where one is installable here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_up_config_validates_against_rays_own_schema():
    import jsonschema

    cfg = yaml.safe_load((CLUSTER / "ray-up-gpu.yaml").read_text())
    jsonschema.validate(cfg, _ray_schema())
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert sum(w["max_workers"] for w in workers) <= cfg["max_workers"]
    # a broken copy must fail the same validation (the check is not vacuous)
    bad = dict(cfg, provider={"region": "us-west-2"})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


def _check_pod_template(tpl: dict, where: str) -> list[dict]:
    containers = tpl["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert c["name"] and c["image"].startswith("rayproject/ray:2.60.0"), (where, c)
    return containers


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _check_pod_template(head["template"], where + ".head")
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g
        for c in _check_pod_template(g["template"], where + "." + g["groupName"]):
            assert int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1


def test_kuberay_manifests_have_the_crd_fields():
    """No kubeconform / KubeRay CRD schema is installable here (PyPI/apt): the ray.io/v1 fields are checked by hand."""
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"], "RayCluster")
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python jobs/")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "RayJob")


def test_mlflow_recipe_binds_loopback_and_holds_no_secrets():
    text = (CLUSTER / "mlflow" / "docker-compose.yaml").read_text()
    compose = yaml.safe_load(text)
    assert set(compose["services"]) == {"postgres", "minio", "mlflow"}
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    cmd = compose["services"]["mlflow"]["command"]
    assert "postgresql://" in cmd and "s3://" in cmd
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        for m in re.finditer(rf"^\s*{key}:\s*(\S+)", text, re.M):
            assert m.group(1).startswith("${"), f"{key} must be an env reference, got {m.group(1)}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_local_scripts_pass_shellcheck():
    scripts = sorted((CLUSTER / "local").glob("*.sh"))
    assert len(scripts) == 2
    subprocess.run(["shellcheck", *map(str, scripts)], check=True)


def test_local_recipe_says_what_is_missing(tmp_path):
    """Without ray/mlflow on PATH start.sh stops at once with a message, exit 2, and starts nothing."""
    env = dict(os.environ, PATH="/usr/bin:/bin")
    r = subprocess.run(["bash", str(CLUSTER / "local" / "start.sh"), str(tmp_path / "st")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "is not on PATH" in r.stderr and "activate the venv" in r.stderr
    assert not list((tmp_path / "st").glob("*.pid"))
