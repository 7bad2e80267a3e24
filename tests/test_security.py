"""Security checks: no unpickling of untrusted files, services on loopback by default, no secrets in the repo or in
what a run logs."""

from __future__ import annotations

import ast
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def _py_files():
    for top in ("scpert_dist", "jobs", "cluster", "benchmarks"):
        yield from sorted((REPO / top).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def test_no_unsafe_deserialisation_in_source():
    """torch.load only with weights_only=True; no pickle/dill/joblib/cloudpickle loads; np.load never allows pickles."""
    bad = []
    files = list(_py_files())
    assert any(f.parent.name == "checkpoint" and f.name == "pretrained.py" for f in files)  # the scan sees the package
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            where = f"{f.relative_to(REPO)}:{node.lineno} {name}"
            if name.endswith("torch.load"):
                if _kw(node, "weights_only") is not True:
                    bad.append(where + " without weights_only=True")
            elif name in {"pickle.load", "pickle.loads", "cPickle.load", "dill.load", "dill.loads", "joblib.load",
                          "cloudpickle.load", "cloudpickle.loads", "pd.read_pickle", "pandas.read_pickle",
                          "shelve.open", "marshal.loads", "yaml.load", "yaml.unsafe_load"}:
                if not (name == "yaml.load" and _kw(node, "Loader") == "<expr>"
                        and "SafeLoader" in ast.unparse(node)):
                    bad.append(where)
            elif name.endswith("np.load") or name.endswith("numpy.load"):
                if _kw(node, "allow_pickle") not in (None, False):
                    bad.append(where + " allow_pickle")
    assert not bad, bad


class _Boom:
    """Unpickling this writes a marker file: proof of code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


@pytest.fixture(scope="module")
def ft_model(tmp_path_factory):
    from ft_fixture import ft_config, make_adata

    from scpert_dist.finetune.config import FinetuneModelConfig
    from scpert_dist.finetune.train import run_finetune

    d = tmp_path_factory.mktemp("sec")
    a, _ = make_adata(n_drugs=5, cells_per=6, n_genes=16)
    cfg = ft_config(split="split_test", epochs=1, steps_per_epoch=1, batch_size=8, out=str(d / "model"),
                         model=FinetuneModelConfig(decoder="mlp", drug_rep="morgan"))
    return Path(run_finetune(cfg, a, log_mlflow=False).model_dir)


@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_tampered_finetuned_model_is_rejected_not_executed(ft_model, tmp_path, how):
    import shutil

    import torch

    from scpert_dist.errors import CheckpointError
    from scpert_dist.finetune.build import load_finetuned

    m = tmp_path / "model"
    shutil.copytree(ft_model, m)
    load_finetuned(m)  # the untampered copy loads
    marker = tmp_path / "PWNED"
    payload = {"decoder.weight": _Boom(marker)}
    w = m / "model.safetensors"
    if how == "pickle":
        w.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, w)
    with pytest.raises(CheckpointError):
        load_finetuned(m)
    assert not marker.exists()


def test_tampered_pretrained_checkpoint_via_torch_save_is_rejected(tmp_path):
    """A torch.save()d (zip + pickle) file in place of the pretraining weights: CheckpointError, nothing executed
    (test_checkpoint.py covers a raw pickle; this is the format a naive torch.load would accept)."""
    import torch

    from scpert_dist.checkpoint import load_pretrained, save_pretrained
    from scpert_dist.errors import CheckpointError
    from scpert_dist.model.config import model_config
    from scpert_dist.paths import sha256_file

    try:
        from scpert_dist.model import PretrainModel
    except ImportError:
        from scpert_dist.model.heads import PretrainModel
    genes = [str(1000 + i) for i in range(12)]
    cfg = model_config("tiny", n_genes=len(genes))
    d = tmp_path / "ckpt"
    save_pretrained(d, PretrainModel(cfg), cfg, genes=genes, gene_symbols=None, cells=[], drugs=[])
    weights = next(p for p in d.iterdir() if p.suffix == ".safetensors")
    marker = tmp_path / "PWNED"
    torch.save({"x": _Boom(marker)}, weights)
    meta_file = next(p for p in d.iterdir() if p.suffix == ".json")
    meta = json.loads(meta_file.read_text())
    for k in list(meta):
        if k.endswith("sha256"):
            meta[k] = sha256_file(weights)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_pretrained(d)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- services on loopback
def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / p for p in out.stdout.split()]


def _service_files() -> list[Path]:
    found = set(_tracked("cluster", "jobs", "scripts", "*.sh", "*.yaml", "*.yml", "*.toml", "*.md"))
    for top in ("cluster", "jobs"):  # also files not committed yet by their owners
        found |= {p for p in (REPO / top).rglob("*") if p.is_file()} if (REPO / top).is_dir() else set()
    return sorted(p for p in found if p.is_file() and p.suffix in {".sh", ".yaml", ".yml", ".toml", ".md", ".py"})


def test_ray_and_mlflow_bind_loopback_by_default():
    """Every `ray start` names --dashboard-host 127.0.0.1, every `mlflow server/ui` --host 127.0.0.1, every
    ray.init in the package disables the dashboard or binds it to loopback. Inside Kubernetes pods 0.0.0.0 is
    allowed only when no Service exposes it outside the cluster (no NodePort/LoadBalancer)."""
    problems, seen = [], {"ray start": 0, "mlflow": 0, "ray.init": 0}
    for f in _service_files():
        text = f.read_text(errors="replace")
        rel = str(f.relative_to(REPO))
        joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
        in_k8s = "kuberay" in rel or "apiVersion: ray.io" in text
        for m in re.finditer(r"ray start\b[^\n]*", joined):
            seen["ray start"] += 1
            if "--head" in m.group(0) and not re.search(r"--dashboard-host[ =]\"?127\.0\.0\.1", m.group(0)):
                problems.append(f"{rel}: {m.group(0)[:120]}")
        for m in re.finditer(r"mlflow (server|ui)\b[^\n]*", joined):
            seen["mlflow"] += 1
            line = m.group(0)
            if f.name.startswith("docker-compose"):
                continue  # inside the container; the published ports are checked below
            if not re.search(r"--host[ =]\"?127\.0\.0\.1", line) and "--host" in line:
                problems.append(f"{rel}: {line[:120]}")
            if "--host" not in line and f.suffix in {".sh", ".yaml", ".yml"}:
                problems.append(f"{rel}: mlflow without --host: {line[:120]}")
        if f.name.startswith("docker-compose"):
            import yaml

            for name, svc in (yaml.safe_load(text).get("services") or {}).items():
                for port in svc.get("ports", []) or []:
                    if not str(port).startswith("127.0.0.1:"):
                        problems.append(f"{rel}: service {name} publishes {port} beyond loopback")
        if in_k8s:
            if re.search(r"(serviceType|type):\s*\"?(NodePort|LoadBalancer)", text):
                problems.append(f"{rel}: exposes a Service outside the cluster")
        elif "0.0.0.0" in text and f.suffix in {".sh", ".py", ".toml"}:
            problems.append(f"{rel}: binds 0.0.0.0")
    for f in _py_files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and _call_name(node) in {"ray.init", "init"} and "ray" in f.read_text():
                if _call_name(node) == "init" and not any(
                        isinstance(n, ast.ImportFrom) and n.module == "ray" for n in ast.walk(ast.parse(f.read_text()))):
                    continue
                seen["ray.init"] += 1
                # Ray's own default dashboard host is 127.0.0.1; only an explicit other host is a problem.
                for kw in ("dashboard_host", "_node_ip_address"):
                    if _kw(node, kw) not in (None, "127.0.0.1", "localhost"):
                        problems.append(f"{f.relative_to(REPO)}:{node.lineno} ray.init({kw}={_kw(node, kw)!r})")
    assert seen["ray start"] >= 1 and seen["mlflow"] >= 1, seen  # the scan found the service definitions
    assert not problems, problems


# ---------------------------------------------------------------------------------------------------- secrets
_SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                                      # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE " + r"KEY-----"),              # PEM private keys
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"),                          # GitHub tokens
    re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),                          # Slack tokens
    re.compile(r"\bsk-[A-Za-z0-9]{32,}"),                                  # API keys of the sk- form
    re.compile(r"(?i)\b(password|passwd|secret|api[_-]?key|access[_-]?key|token)\b[\"']?\s*[:=]\s*[\"']"
               r"(?!\$\{)(?!<)[^\"'\s$]{6,}[\"']"),                        # key = "literal"
    re.compile(r"(?i)[a-z][a-z0-9+]*://[^/\s:@\"']+:(?!\$\{)[^@\s\"'/$]{4,}@"),  # credentials inside a URL
]


def _scan(text: str) -> list[str]:
    return [m.group(0)[:60] for p in _SECRET_PATTERNS for m in p.finditer(text)]


def test_secret_scanner_catches_planted_secrets():
    """The patterns catch what they are meant to (so the clean scan below means something) and pass env refs."""
    planted = ['aws = "AKIA' + "ABCDEFGHIJKLMNOP" + '"', 'password: "hunter2hunter2"',
               "uri = postgresql://mlflow:s3cretpw@db:5432/x", "tok = ghp_" + "a" * 36]
    for p in planted:
        assert _scan(p), p
    for ok in ["POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}",
               "postgresql://mlflow:${POSTGRES_PASSWORD}@postgres:5432/mlflow", "token auth is on by default"]:
        assert not _scan(ok), ok


def test_no_secrets_in_tracked_or_config_files():
    files = _tracked()
    files += [p for p in (REPO / "scpert_dist" / "configs").glob("*") if p.is_file()]
    files += [p for top in ("cluster", "jobs") for p in (REPO / top).rglob("*") if p.is_file()]
    hits = {}
    n = 0
    for f in sorted(set(files)):
        if not f.is_file() or f.name == Path(__file__).name or f.stat().st_size > 2_000_000:
            continue
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        n += 1
        if h := _scan(text):
            hits[str(f.relative_to(REPO))] = h
    assert n > 20
    assert not hits, hits


@pytest.mark.slow
def test_mlflow_run_logs_no_environment_secrets(tmp_path, monkeypatch):
    """A real finetune run tracked in MLflow: a secret in the environment appears in no param, tag, metric name or
    text artifact."""
    import mlflow
    from ft_fixture import ft_config, make_adata

    from scpert_dist.finetune.config import FinetuneModelConfig
    from scpert_dist.finetune.train import run_finetune

    sentinel = "sentinel-Secret-9f3a1c77"
    for var in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"):
        monkeypatch.setenv(var, sentinel)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    a, _ = make_adata(n_drugs=5, cells_per=6, n_genes=16)
    cfg = ft_config(split="split_test", epochs=1, steps_per_epoch=1, batch_size=8, out=str(tmp_path / "model"),
                         uri=uri, model=FinetuneModelConfig(decoder="mlp", drug_rep="morgan"))
    monkeypatch.chdir(tmp_path)
    r = run_finetune(cfg, a)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(r.run_id)
    blob = json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": list(run.data.metrics)})
    assert run.data.params  # the run did log its config
    assert sentinel not in blob
    art = Path(mlflow.artifacts.download_artifacts(run_id=r.run_id, artifact_path="", tracking_uri=uri,
                                                   dst_path=str(tmp_path / "art")))
    texts = [p for p in art.rglob("*") if p.is_file() and p.suffix in {".json", ".txt", ".toml", ".yaml", ".md",
                                                                        ".log", ".csv", ""}]
    for p in texts:
        assert sentinel not in p.read_text(errors="replace"), p
