"""`scpert baselines setup cpa`: a separate Python 3.10 venv with cpa-tools (every cpa-tools release needs
Python < 3.11, so it cannot share the project environment); `scpert bench gpu`: the one-shot GPU check; `scpert bench
stream`: the training stream across 1, 2 and 4 workers on a 2-node cluster."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer

from ..bench.gpu import run_gpu_bench
from ..errors import ConfigError, OutputError
from ..evaluate.baselines.cpa_baseline import CPA_RELEASED, CPA_VERSION, RESOLVE_BEFORE, cpa_env_dir
from . import baselines_app, bench_app

setup_app = typer.Typer(help="Set up external environments for baselines.", no_args_is_help=True)
baselines_app.add_typer(setup_app, name="setup")

def _version(exe: str) -> list[str] | None:
    """[major, minor] of an interpreter, or None if it does not run."""
    try:
        return subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                              text=True, timeout=60, check=True).stdout.split()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        return None


@setup_app.command("cpa")
def setup_cpa(env: str = typer.Option(None, help="venv folder (default $SCPERT_CPA_ENV or ~/.cache/scpert/cpa-env)"),
              python: str = typer.Option("python3.10", help="a Python < 3.11 interpreter"),
              timeout: int = typer.Option(1800, help="seconds allowed for pip")) -> None:
    """Create the CPA venv and install cpa-tools into it (a failed install removes the half-built venv)."""
    exe = shutil.which(python)
    ver = _version(exe) if exe else None
    if ver is None and python == "python3.10":
        # the default name may be a pyenv shim with 3.10 not selected here: look for an installed 3.10 directly
        pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
        found = sorted(pyenv.glob("versions/3.10*/bin/python3.10"))
        for cand in found + [Path("/usr/bin/python3.10"), Path("/usr/local/bin/python3.10")]:
            cand_ver = _version(str(cand)) if cand.exists() else None
            if cand_ver is not None:
                exe, ver = str(cand), cand_ver
                typer.echo(f"using {exe}")
                break
    if exe is None:
        raise ConfigError(f"{python} not found", field="--python",
                          hint="install Python 3.10 (cpa-tools requires < 3.11) or pass --python PATH")
    if ver is None:
        raise ConfigError(f"{exe} does not run (a pyenv shim without that version selected?)", field="--python",
                          hint="pass the interpreter's real path, e.g. from `pyenv prefix 3.10`")
    if tuple(map(int, ver)) >= (3, 11):
        raise ConfigError(f"{exe} is Python {'.'.join(ver)}; cpa-tools needs < 3.11", field="--python",
                          hint="pass a Python 3.10 interpreter")
    d = cpa_env_dir(env)
    if (d / "bin" / "python").exists():
        typer.echo(f"CPA env already at {d}")
        return
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        typer.echo(f"creating venv with {exe} ...")
        subprocess.run([exe, "-m", "venv", str(tmp)], check=True, timeout=300)
        py = str(tmp / "bin" / "python")
        # pip's resolver backtracks for an hour over cpa-tools' ~200 loosely pinned dependencies (seen); uv resolves
        # them against releases before RESOLVE_BEFORE (the era of the jax/torch/numpy pins cpa-tools sets) in seconds
        typer.echo("pip install uv ...")
        subprocess.run([py, "-m", "pip", "install", "-q", "uv"], check=True, timeout=timeout)
        typer.echo(f"uv pip install cpa-tools=={CPA_VERSION} (dependencies released before {RESOLVE_BEFORE}; "
                   "downloads about 3 GB: torch 2.0 with its CUDA libraries, jax, ray) ...")
        subprocess.run([str(tmp / "bin" / "uv"), "pip", "install", "--python", py, "--exclude-newer", RESOLVE_BEFORE,
                        "--exclude-newer-package", f"cpa-tools={CPA_RELEASED}", f"cpa-tools=={CPA_VERSION}"],
                       check=True, timeout=timeout, stdout=sys.stdout, stderr=sys.stderr)
        subprocess.run([str(tmp / "bin" / "python"), "-c", "import cpa; print('cpa', cpa.__version__)"],
                       check=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"CPA env setup failed: {e}", path=d,
                          hint="check network access to PyPI and rerun `scpert baselines setup cpa`") from e
    tmp.rename(d)
    typer.echo(f"CPA env ready at {d}")


@bench_app.command("gpu")
def bench_gpu(out: Path = typer.Option(None, help="JSON file for the results (default: print only)."),
              budget_s: float = typer.Option(420.0, help="Seconds for all sections; a section that no longer fits is "
                                                         "recorded as skipped.")) -> None:
    """One GPU check without Ray: bf16 matmul peak, base-model MFU with flash attention on/off, DeepSpeed ZeRO 1/2/3
    (bf16, one GPU), the largest model per ZeRO stage vs DDP. Without CUDA: a SKIPPED line, exit code 0."""
    run_gpu_bench(out, budget_s)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(float(x)) for x in text.split(",") if x.strip())
    except ValueError:
        vals = ()
    if not vals or min(vals) < 1:
        raise ConfigError(f"{what} must be positive integers separated by commas, not {text!r}", field=what,
                          hint="e.g. 10000,100000,1000000")
    return vals


@bench_app.command("stream")
def bench_stream(rows: str = typer.Option("10000,100000,1000000", help="Corpus sizes (rows of 978 genes)."),
                 workers: str = typer.Option("1,2,4", help="Ray Train worker counts."),
                 batch: int = typer.Option(256, help="Rows per batch."),
                 genes: int = typer.Option(978, help="Genes per row (12328: all LINCS genes)."),
                 shuffle_buffer: int = typer.Option(16_384, help="data.shuffle_buffer of the stream (rows; 1024 = "
                                                                 "8 row groups at 12,328 genes)."),
                 workdir: Path = typer.Option(None, help="Scratch folder; corpora there are reused by a rerun "
                                                         "(1e6 rows: ~3.3 GB)."),
                 out: Path = typer.Option(None, help="JSON file for the results.")) -> None:
    """The training stream, W = 1, 2, 4 workers on a 2-node ray.cluster_utils.Cluster, side by side in one run: rows
    and bytes decoded per worker and in total / corpus; rows per CPU-second vs a plain pyarrow read + decode; peak
    RSS per worker by corpus size; the checkpoint's data-state bytes by corpus size; shuffle quality."""
    from ..bench.stream import run_stream_bench

    run_stream_bench(rows=_ints(rows, "--rows"), workers=_ints(workers, "--workers"), batch=batch, genes=genes,
                     shuffle_buffer=shuffle_buffer, workdir=workdir, out=out)
