"""A matrix source: profiles x genes read in row blocks, with its raw column metadata (shared by the L1000 readers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .genes import FileGenes


@dataclass
class MatrixSource:
    """A matrix (profiles x genes, read in row blocks) with its raw column metadata, aligned with the rows."""

    name: str
    sig_ids: np.ndarray
    meta: pd.DataFrame
    genes: FileGenes
    read_block: Callable[[int, int], np.ndarray]  # rows [start, stop) -> float array (n, n_genes)
    files: list[Path] = field(default_factory=list)
    meta_desc: str = ""
    close: Callable[[], None] = lambda: None


def gene_columns(read_block: Callable[[int, int], np.ndarray], genes: FileGenes
                 ) -> Callable[[int, int], np.ndarray]:
    """read_block restricted to the matrix columns that are genes (`genes.columns`; all when None): rows that are
    no gene (calibration analytes) or a probe that maps to no gene never reach a caller."""
    cols = genes.columns
    if cols is None:
        return read_block
    return lambda a, b: np.asarray(read_block(a, b))[:, cols]
