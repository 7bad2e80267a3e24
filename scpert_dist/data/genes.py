"""Map single-cell gene ids (Ensembl, symbols, Entrez) onto the LINCS L1000 landmark panel.

Order of keys tried per gene: Entrez id, Ensembl id (version suffix stripped), symbol (LINCS2020 symbol or the
GSE92742 symbol, case-insensitive). The panel is `lincs/l1000_landmark_genes.csv` in the metadata folder, or the
`genes` + `gene_symbols` of a pretraining manifest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import GeneMappingError, InputFileError, MetadataError

LANDMARK_CSV = "lincs/l1000_landmark_genes.csv"


def landmark_table(metadata: str | Path | None = None, manifest: str | Path | None = None) -> pd.DataFrame:
    """Panel table with columns gene_id (Entrez str), gene_symbol, ensembl_id, gene_symbol_gse92742.

    From `<metadata>/lincs/l1000_landmark_genes.csv`, else from a pretraining manifest.json (genes, gene_symbols).
    """
    if metadata is not None:
        p = Path(metadata) / LANDMARK_CSV
        if not p.is_file():
            raise InputFileError("landmark gene table not found", path=str(p),
                                 hint="pass --metadata with the public metadata folder, or --manifest of a pretraining run")
        df = pd.read_csv(p, dtype=str)
        need = ["gene_id", "gene_symbol"]
        miss = [c for c in need if c not in df.columns]
        if miss:
            raise MetadataError(f"landmark table lacks columns {miss}", path=str(p), field=",".join(miss),
                                hint=f"columns present: {list(df.columns)}")
    elif manifest is not None:
        p = Path(manifest)
        if p.is_dir():
            p = p / "manifest.json"
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise InputFileError(f"cannot read manifest ({e})", path=str(p), hint="give a manifest.json of `scpert data lincs`") from None
        if "genes" not in m:
            raise MetadataError("manifest has no 'genes'", path=str(p), field="genes", hint="give a manifest.json of `scpert data lincs`")
        genes = [str(g) for g in m["genes"]]
        syms = [str(s) for s in m.get("gene_symbols", [""] * len(genes))]
        df = pd.DataFrame({"gene_id": genes, "gene_symbol": syms})
    else:
        raise GeneMappingError("no gene panel: neither a metadata folder nor a pretraining manifest was given",
                               hint="pass --metadata (or set SCPERT_METADATA) or --manifest")
    for c in ("ensembl_id", "gene_symbol_gse92742"):
        if c not in df.columns:
            df[c] = ""
    df = df.fillna("")
    df["gene_id"] = df["gene_id"].astype(str).str.strip()
    return df[["gene_id", "gene_symbol", "ensembl_id", "gene_symbol_gse92742"]].reset_index(drop=True)


def strip_version(ensembl: str) -> str:
    """'ENSG00000113552.15' -> 'ENSG00000113552' (only for Ensembl-like ids)."""
    s = str(ensembl).strip()
    if s.upper().startswith("ENS") and "." in s:
        return s.split(".", 1)[0]
    return s


@dataclass
class GeneMapping:
    """Result of map_genes: per input gene the panel Entrez id ('' if unmapped) and the key that matched."""

    entrez: list[str]
    """Panel gene id per input gene ('' where unmapped)."""
    by: list[str]
    """'entrez' | 'ensembl' | 'symbol' | 'symbol_gse92742' | '' per input gene."""
    panel_size: int
    unmapped_panel: list[str] = field(default_factory=list)
    """Panel symbols that no input gene mapped to."""

    @property
    def mapped(self) -> np.ndarray:
        return np.array([bool(e) for e in self.entrez])

    @property
    def n_mapped(self) -> int:
        return len({e for e in self.entrez if e})

    def counts_by_key(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.by:
            if b:
                out[b] = out.get(b, 0) + 1
        return out

    def report(self) -> str:
        keys = ", ".join(f"{k} {v}" for k, v in sorted(self.counts_by_key().items()))
        miss = ", ".join(self.unmapped_panel[:10]) + (" ..." if len(self.unmapped_panel) > 10 else "")
        return (f"genes mapped to the panel: {self.n_mapped} / {self.panel_size} (by {keys or 'none'}); "
                f"{len(self.unmapped_panel)} panel genes unmapped{': ' + miss if miss else ''}")

    def as_dict(self) -> dict:
        return {"n_mapped": self.n_mapped, "panel_size": self.panel_size, "by": self.counts_by_key(),
                "unmapped_panel": list(self.unmapped_panel)}


def map_genes(ids: Sequence[str], symbols: Sequence[str] | None = None, entrez: Sequence[str] | None = None,
              table: pd.DataFrame | None = None, *, path: str | None = None) -> GeneMapping:
    """Map genes to the panel `table` (see landmark_table). `ids` may be Ensembl ids (with or without version),
    symbols or Entrez ids. Each panel gene is assigned to at most one input gene (the first one that matches).
    Raises GeneMappingError when nothing maps."""
    if table is None:
        raise GeneMappingError("no gene panel table given", hint="call landmark_table(metadata) first")
    n = len(ids)
    by_entrez = {str(g): str(g) for g in table["gene_id"]}
    by_ens = {strip_version(e).upper(): str(g) for e, g in zip(table["ensembl_id"], table["gene_id"], strict=False) if e}
    by_sym = {str(s).upper(): str(g) for s, g in zip(table["gene_symbol"], table["gene_id"], strict=False) if s}
    by_sym92 = {str(s).upper(): str(g) for s, g in zip(table["gene_symbol_gse92742"], table["gene_id"], strict=False) if s}

    def _clean(v) -> str:
        s = "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()
        if s.endswith(".0") and s[:-2].isdigit():
            s = s[:-2]
        return s

    out, how, taken = [""] * n, [""] * n, set()
    for i in range(n):
        cands = []
        if entrez is not None:
            cands.append(("entrez", by_entrez.get(_clean(entrez[i]))))
        raw = _clean(ids[i])
        cands.append(("entrez", by_entrez.get(raw)))
        cands.append(("ensembl", by_ens.get(strip_version(raw).upper())))
        for s in ([_clean(symbols[i])] if symbols is not None else []) + [raw]:
            cands.append(("symbol", by_sym.get(s.upper())))
            cands.append(("symbol_gse92742", by_sym92.get(s.upper())))
        for key, g in cands:
            if g and g not in taken:
                out[i], how[i] = g, key
                taken.add(g)
                break
    unmapped = [s or g for g, s in zip(table["gene_id"], table["gene_symbol"], strict=False) if g not in taken]
    m = GeneMapping(entrez=out, by=how, panel_size=len(table), unmapped_panel=unmapped)
    if m.n_mapped == 0:
        raise GeneMappingError(f"none of {n} genes maps to the {len(table)}-gene panel (first ids: {list(ids[:3])})",
                               path=path, field="var_names",
                               hint="var index must be Ensembl ids, symbols or Entrez ids, or give a "
                                    "gene_short_name/gene_symbol/entrez_id column")
    return m
