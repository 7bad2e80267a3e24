"""Small readers shared by the LINCS modules: delimited/Parquet tables, HDF5 strings, Entrez ids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputFileError

TRUE_FLAGS = {"1", "1.0", "true", "y", "yes", "landmark", "lm"}


def decode(a) -> np.ndarray:
    """HDF5 byte strings -> str (LINCS files hold latin-1 'µ'); numbers unchanged."""
    a = np.asarray(a)
    if a.dtype.kind == "S":
        try:
            return np.char.decode(a, "utf-8").astype(object)  # vectorised; a 1.3M-id column in a second
        except UnicodeDecodeError:
            pass
    if a.dtype.kind in "SO":
        out = []
        for v in a.tolist():
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    v = v.decode("latin-1")
            out.append(v)
        return np.array(out, dtype=object)
    return a


def read_table(path: str | os.PathLike, what: str) -> pd.DataFrame:
    """A tab-separated (.txt/.tsv), .csv (optionally gzipped) or .parquet table, every text column as str."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{what} file not found", path=str(p), hint=f"pass an existing {what} file")
    try:
        name = p.name.lower()
        if name.endswith(".parquet"):
            return pd.read_parquet(p)
        sep = "," if (name.endswith(".csv") or name.endswith(".csv.gz")) else "\t"
        return pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, low_memory=False)
    except Exception as e:  # pandas/pyarrow parse errors
        raise InputFileError(f"cannot read {what} table ({type(e).__name__}: {e})", path=str(p),
                             hint="give a tab-separated (.txt/.tsv), .csv or .parquet table with a header") from None


def entrez(v) -> str:
    """5720, 5720.0, '5720.0', ' 5720' -> '5720'."""
    s = str(v).strip()
    if s.endswith(".0") and s[:-2].isdigit():
        s = s[:-2]
    return s


def first(cols, *names):
    """The first of `names` that is in `cols`, else None."""
    for n in names:
        if n in cols:
            return n
    return None


def is_flag_true(v) -> bool:
    return str(v).strip().lower() in TRUE_FLAGS
