"""Where the real public metadata lives (a folder the user downloaded, or none), and small file helpers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import InputFileError, OutputError

ENV_METADATA = "SCPERT_METADATA"


def metadata_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The metadata folder: the explicit argument, else $SCPERT_METADATA, else None (synthetic fallback).

    The folder has the layout of the public files: lincs/l1000_landmark_genes.csv,
    lincs/l1000_transigen_basal_modz_x1_n165x978.parquet, sciplex/sciplex3_hash_design_SupplTable3.tsv.gz, ...
    """
    value = explicit if explicit is not None else os.environ.get(ENV_METADATA)
    if not value:
        return None
    p = Path(value).expanduser()
    if not p.is_dir():
        raise InputFileError(
            "metadata folder does not exist",
            path=str(p),
            hint=f"pass --metadata with a folder of the public LINCS/sci-Plex3 metadata files, or unset {ENV_METADATA}",
        )
    return p


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically: temp file in the same folder + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) or raise OutputError naming it."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder ({e.strerror})", path=str(p),
                          hint="choose a folder you can write to") from None
    if not os.access(p, os.W_OK):
        raise OutputError("output folder is not writable", path=str(p), hint="choose a folder you can write to")
    return p
