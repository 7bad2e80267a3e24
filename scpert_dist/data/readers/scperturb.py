"""scPerturb's sci-Plex3 drug x drug tables (sanderlab/scPerturb, `pairwise_edist_*.csv` and
`pseudobulk_correlations_*_tables.csv`) -> labelled square matrices.

Each is a CSV with a header row of the 189 perturbation names (188 compounds + 'control') and the same names as
row labels, in the same or another order. Checked on reading: square, the same labels on both axes (each once),
finite, symmetric, the diagonal (0 for an E-distance, 1 for a correlation), a control row; the compound names are
mapped to the sci-Plex3 compound table (design table `name`, exact after trimming, else the normalised name keys
of compounds.name_keys when they point to one compound).

How scPerturb computed them (its repository, revision/snakemake/Snakefile and scperturb/edistance.py; what we
assume of the website tables): cells filtered (>= 1,000 UMIs), normalised per cell, log1p, every perturbation
sub-sampled to the same number of cells (groups under 50 cells dropped), 2,000 highly variable genes (Seurat v3),
PCA (50 components); E-distance = 2 mean d(x, y) - mean d(x, x') - mean d(y, y') with d the squared Euclidean
distance in PCA space; pseudobulk correlation = Pearson r between the PCA coordinates of the perturbations'
pseudobulk profiles (normalised, log1p, PCA). The cells of a compound are pooled over the three cell lines, the
four doses and both time points (scPerturb's `perturbation` = sci-Plex3 `product_name`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputFileError, MetadataError, ValueRangeError
from .compounds import name_keys, sciplex_compounds

EDISTANCE = "edistance"
CORRELATION = "pseudobulk_correlation"
CONTROL_NAMES = ("control", "vehicle", "dmso")


@dataclass
class DrugTable:
    """values[i, j] between perturbations names[i] and names[j]."""

    values: np.ndarray
    """float64 [n, n], symmetric."""
    names: list[str]
    """perturbation names as in the file (trimmed)."""
    kind: str
    """'edistance' or 'pseudobulk_correlation'."""
    control: str
    """the name of the control row."""
    compound: list[str] = field(default_factory=list)
    """per name: the sci-Plex3 compound table's name ('' for the control or an unmatched name)."""
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def drugs(self) -> list[str]:
        return [n for n in self.names if n != self.control]

    def to_control(self) -> pd.Series:
        """The control row without the control itself (e.g. each compound's E-distance to control)."""
        i = self.names.index(self.control)
        keep = [j for j in range(len(self.names)) if j != i]
        return pd.Series(self.values[i, keep], index=[self.names[j] for j in keep])

    def among_drugs(self) -> np.ndarray:
        """The values of the distinct compound pairs (upper triangle, control left out)."""
        i = self.names.index(self.control)
        keep = [j for j in range(len(self.names)) if j != i]
        sub = self.values[np.ix_(keep, keep)]
        return sub[np.triu_indices(len(keep), 1)]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.values, index=self.names, columns=self.names)


def _kind_of(path: Path, values: np.ndarray) -> str:
    name = path.name.lower()
    if "edist" in name:
        return EDISTANCE
    if "corr" in name:
        return CORRELATION
    return CORRELATION if np.allclose(np.diag(values), 1.0) else EDISTANCE


def _read_square(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputFileError("scPerturb table not found", path=str(path), hint="pass an existing CSV")
    try:
        df = pd.read_csv(path, index_col=0)
    except Exception as e:  # parser errors, bad encodings, empty files
        raise InputFileError(f"cannot read the CSV ({type(e).__name__}: {str(e)[:160]})", path=str(path),
                             hint="a scPerturb table: a header of perturbation names, then one row per name") from None
    df.index = [str(i).strip() for i in df.index]
    df.columns = [str(c).strip() for c in df.columns]
    if df.shape[0] < 3 or df.shape[0] != df.shape[1]:
        raise InputFileError(f"the table is {df.shape[0]} x {df.shape[1]}, not square", path=str(path),
                             field="shape", hint="the file is truncated or not a scPerturb drug x drug table")
    for axis, labels in (("row labels", df.index), ("column names", df.columns)):
        dup = pd.Index(labels)[pd.Index(labels).duplicated()]
        if len(dup):
            raise MetadataError(f"{axis}: {dup[0]!r} occurs twice", path=str(path), field=axis,
                                hint="each perturbation must occur once on each axis")
    if set(df.index) != set(df.columns):
        extra = sorted(set(df.index) ^ set(df.columns))
        raise MetadataError(f"row labels and column names differ ({len(extra)} names, e.g. {extra[:3]})",
                            path=str(path), field="row labels / column names",
                            hint="both axes must list the same perturbations")
    df = df.loc[:, list(df.index)]
    try:
        return df.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ValueRangeError(f"non-numeric values in the table ({e})", path=str(path), field="values",
                              hint="every cell must be a number") from None


def _check_values(v: np.ndarray, kind: str, names: list[str], path: Path) -> None:
    bad = ~np.isfinite(v)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueRangeError(f"{int(bad.sum())} NaN/Inf values (first: {names[i]!r} x {names[j]!r})",
                              path=str(path), field="values", hint="the file is damaged; download it again")
    scale = max(float(np.abs(v).max()), 1e-12)
    asym = np.abs(v - v.T)
    if asym.max() > 1e-6 * scale:
        i, j = np.unravel_index(int(asym.argmax()), asym.shape)
        raise ValueRangeError(f"not symmetric: {names[i]!r} x {names[j]!r} = {v[i, j]:.6g} but the transposed "
                              f"cell = {v[j, i]:.6g}", path=str(path), field="values",
                              hint="a drug x drug distance/correlation table is symmetric; the file is damaged")
    want = 0.0 if kind == EDISTANCE else 1.0
    dev = np.abs(np.diag(v) - want)
    if dev.max() > 1e-6 * max(scale, 1.0):
        i = int(dev.argmax())
        raise ValueRangeError(f"diagonal of {names[i]!r} is {v[i, i]:.6g}, not {want:g} ({kind})", path=str(path),
                              field="diagonal", hint="the file is damaged, or not the kind of table its name says")
    if kind == CORRELATION and (v.max() > 1 + 1e-6 or v.min() < -1 - 1e-6):
        raise ValueRangeError(f"correlations outside [-1, 1] ({v.min():.3g}..{v.max():.3g})", path=str(path),
                              field="values", hint="the file is damaged, or not a correlation table")


def map_compounds(names: list[str], table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Per name the sci-Plex3 table's `name` (exact after trimming, else the one compound its name keys point to);
    -> (mapped names, '' where none; the unmatched names)."""
    exact = {str(n).strip(): str(n).strip() for n in table["name"]}
    keys: dict[str, set[str]] = {}
    for n in table["name"]:
        for k in name_keys(str(n)):
            keys.setdefault(k, set()).add(str(n).strip())
    out, unmatched = [], []
    for n in names:
        hit = exact.get(n)
        if hit is None:
            cand = set().union(*[keys.get(k, set()) for k in name_keys(n.replace("?", " "))])
            hit = next(iter(cand)) if len(cand) == 1 else None
        out.append(hit or "")
        if hit is None:
            unmatched.append(n)
    return out, unmatched


def read_scperturb_table(path, *, metadata=None, kind: str | None = None) -> DrugTable:
    """A scPerturb sci-Plex3 table as a labelled square matrix (see the module docstring for the checks).
    `metadata`: the public metadata folder; when given, compound names are mapped to the sci-Plex3 compound table
    and a name that maps to none is a MetadataError."""
    p = Path(path)
    df = _read_square(p)
    names = list(df.index)
    v = df.to_numpy()
    k = kind or _kind_of(p, v)
    if k not in (EDISTANCE, CORRELATION):
        raise MetadataError(f"unknown table kind {k!r}", field="kind", hint=f"{EDISTANCE} or {CORRELATION}")
    _check_values(v, k, names, p)
    ctl = [n for n in names if n.lower() in CONTROL_NAMES]
    if len(ctl) != 1:
        raise MetadataError(f"{'no' if not ctl else len(ctl)} control row(s) ({', '.join(CONTROL_NAMES)})",
                            path=str(p), field="row labels", hint="scPerturb names the vehicle cells 'control'")
    notes = [f"{k}: {len(names) - 1} compounds + {ctl[0]!r}"]
    compound: list[str] = []
    if metadata is not None:
        compound, unmatched = map_compounds(names, sciplex_compounds(metadata))
        unmatched = [n for n in unmatched if n != ctl[0]]
        if unmatched:
            raise MetadataError(f"{len(unmatched)} names are not sci-Plex3 compounds (e.g. {unmatched[:3]})",
                                path=str(p), field="row labels",
                                hint="names must be sci-Plex3 product names (sciplex3_hash_design_SupplTable3)")
        notes.append(f"{len(names) - 1} of {len(names) - 1} names mapped to the sci-Plex3 compound table")
        compound[names.index(ctl[0])] = ""
    return DrugTable(v, names, k, ctl[0], compound, str(p), notes)
