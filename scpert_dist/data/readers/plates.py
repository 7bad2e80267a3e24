"""Per-compound signatures of one L1000 plate file, one per replicate plate (`replicate_signatures`), and the
compounds two such files share (`shared_compounds`): what a transfer benchmark between two cell lines on the same
plate map needs (the X1 and X2 signatures of a compound kept apart, for the replicate ceiling).

Level 3 (log2 expression): robust z-scores per plate (l1000.plate_zscores, against the plate population or its
vehicle wells), one signature per well, replicate plates NOT collapsed; level 4: the plate's z-scores (clipped to
+-10). Wells of one compound at one dose on one plate (rare) are collapsed by MODZ (cmapPy agg_wt_avg).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ... import schema as S
from ...errors import MetadataError, SmilesError
from ...paths import metadata_dir
from ..drugs import inchikey_block
from .compounds import brd_smiles
from .l1000 import read_l1000

REPLICATE = re.compile(r"_X(?P<k>\d+)(?:_|$)")


@dataclass
class PlateSignatures:
    """values[i] is the signature of meta.iloc[i] over `genes`."""

    values: np.ndarray
    """float32 [n, genes]."""
    genes: list[str]
    meta: pd.DataFrame
    """pert_id, pert_iname, smiles ('' if unknown), inchikey14 ('' if no valid SMILES), dose_um, cell_id, time_h,
    plate, replicate (1 for _X1, 2 for _X2, ...), n_wells."""
    level: int
    transform: str
    source: str
    symbols: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def replicate(self, k: int) -> PlateSignatures:
        """The signatures of replicate plate k only."""
        sel = (self.meta["replicate"] == k).to_numpy()
        return PlateSignatures(self.values[sel], self.genes, self.meta[sel].reset_index(drop=True), self.level,
                               self.transform, self.source, self.symbols, self.notes)


def _modz(x: np.ndarray) -> np.ndarray:
    from cmapPy.math.agg_wt_avg import agg_wt_avg

    if len(x) == 1:
        return x[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return np.asarray(agg_wt_avg(pd.DataFrame(x.T.astype(np.float64)))[0], dtype=np.float32)


def _ik(s: str) -> str:
    try:
        return inchikey_block(s) if s else ""
    except SmilesError:
        return ""


def replicate_signatures(path, *, inst_info=None, siginfo=None, zscore: str = "plate", metadata=None,
                         smiles: dict[str, str] | None = None) -> PlateSignatures:
    """One signature per (compound, dose, replicate plate) of a level-3 or level-4 plate file (any format
    read_l1000 reads). SMILES: `smiles` (pert_id -> SMILES), else the file's own SMILES column, else the drug
    tables of the metadata folder (default $SCPERT_METADATA)."""
    t = read_l1000(path, inst_info=inst_info, siginfo=siginfo, zscore=zscore, replicates="keep", metadata=metadata)
    if t.level not in (3, 4):
        raise MetadataError(f"level-{t.level} signatures are already collapsed over replicate plates",
                            path=str(path), field="data level",
                            hint="give the plate's level-3 (QNORM) or level-4 (ZSPC) file")
    m = t.meta
    trt = np.flatnonzero((m["pert_type"] == S.TRT_CP).to_numpy())
    if not len(trt):
        raise MetadataError("no trt_cp wells in the plate", path=str(path), field="pert_type",
                            hint="the file must hold compound-treated (trt_cp) wells")
    sm = dict(smiles or {})
    if not sm:
        sm = dict(t.smiles)
        md = metadata_dir(metadata)
        if md is not None and (Path(md) / "drugs").is_dir():
            for k, v in brd_smiles(md).items():
                sm.setdefault(k, v)
    mt = m.iloc[trt].reset_index(drop=True).copy()
    mt["replicate"] = [int(r["k"]) if (r := REPLICATE.search(str(p))) else 1 for p in mt["plate"]]
    mt["dose_key"] = mt["dose_um"].round(6).fillna(-1.0)
    groups = mt.groupby(["pert_id", "dose_key", "plate"], sort=False).indices
    rows, vals = [], []
    for (pid, _, _plate), ix in groups.items():
        r = mt.iloc[ix[0]]
        s = sm.get(str(pid), "")
        rows.append({"pert_id": pid, "pert_iname": r["pert_iname"], "smiles": s, "inchikey14": _ik(s),
                     "dose_um": r["dose_um"], "cell_id": r["cell_id"], "time_h": r["time_h"], "plate": r["plate"],
                     "replicate": int(r["replicate"]), "n_wells": len(ix)})
        vals.append(_modz(t.values[trt[ix]]))
    meta = pd.DataFrame(rows)
    n_multi = int((meta["n_wells"] > 1).sum())
    notes = [*t.notes, f"{len(meta)} signatures of {meta['pert_id'].nunique()} compounds on "
                       f"{meta['plate'].nunique()} plate(s); {n_multi} from >1 well (MODZ)",
             f"{int((meta['smiles'] == '').sum())} signatures without SMILES"]
    return PlateSignatures(np.vstack(vals).astype(np.float32), t.genes, meta, t.level, t.transform, t.source,
                           t.symbols, notes)


def shared_compounds(a: PlateSignatures, b: PlateSignatures) -> dict[str, int]:
    """How many compounds two plate files share: by BRD id (pert_id), by InChIKey connectivity block (valid
    SMILES on both sides), by either."""
    ida, idb = set(a.meta["pert_id"]), set(b.meta["pert_id"])
    ika, ikb = set(a.meta["inchikey14"]) - {""}, set(b.meta["inchikey14"]) - {""}
    by_id = ida & idb
    by_ik = ika & ikb
    ik_of = dict(zip(a.meta["pert_id"], a.meta["inchikey14"], strict=True))
    either = len(by_id) + len(by_ik - {ik_of.get(p, "") for p in by_id})
    return {"a": len(ida), "b": len(idb), "by_brd": len(by_id), "by_inchikey14": len(by_ik), "either": either}
