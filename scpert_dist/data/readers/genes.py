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

from ...errors import GeneMappingError, InputFileError, MetadataError
from .tables import entrez, first, is_flag_true, read_table

LANDMARK_CSV = "lincs/l1000_landmark_genes.csv"
N_LANDMARKS = 978
# row-metadata columns that flag landmark genes, across releases (GSE92742 gene_info: pr_is_lm; CMap plate files:
# pr_is_lmark; CMap 2020 geneinfo_beta: feature_space == 'landmark')
LANDMARK_FLAGS = ("pr_is_lm", "pr_is_lmark", "is_lm", "is_landmark")


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


# ---------------------------------------------------------------------------------------------- LINCS gene panel
@dataclass
class FileGenes:
    """The genes of a LINCS matrix, in matrix order."""

    ids: list[str]
    """Entrez ids (str), or the file's row ids where it has no gene id column."""
    symbols: list[str]
    landmark: np.ndarray | None
    """bool per gene from the file's own flag column; None when the file has none."""
    flag: str = ""
    """the column the landmark flags came from ('' when none)."""


def row_genes(row: pd.DataFrame, rid: Sequence[str]) -> FileGenes:
    """Gene ids, symbols and landmark flags from a GCT/GCTX row-metadata table (any release's column names)."""
    cols = set(row.columns)
    idc = first(cols, "pr_gene_id", "gene_id")
    ids = [entrez(v) for v in (row[idc] if idc else rid)]
    symc = first(cols, "pr_gene_symbol", "gene_symbol")
    syms = row[symc].astype(str).tolist() if symc else [""] * len(ids)
    lmc = first(cols, *LANDMARK_FLAGS)
    if lmc:
        return FileGenes(ids, syms, np.array([is_flag_true(v) for v in row[lmc]]), lmc)
    if "feature_space" in cols:
        return FileGenes(ids, syms, (row["feature_space"].astype(str) == "landmark").to_numpy(), "feature_space")
    return FileGenes(ids, syms, None)


def gene_info_table(path) -> tuple[dict[str, str], set[str] | None]:
    """gene_info (pr_gene_id, pr_gene_symbol, pr_is_lm) or geneinfo_beta (gene_id, gene_symbol, feature_space)
    -> ({id: symbol}, landmark ids or None)."""
    df = read_table(path, "gene info")
    cols = set(df.columns)
    idc = first(cols, "pr_gene_id", "gene_id")
    sym = first(cols, "pr_gene_symbol", "gene_symbol")
    if idc is None or sym is None:
        raise MetadataError("gene info lacks the gene id / symbol columns", path=str(path),
                            field="pr_gene_id/pr_gene_symbol or gene_id/gene_symbol",
                            hint="give GSE92742 gene_info or CMap 2020 geneinfo_beta")
    ids = [entrez(v) for v in df[idc]]
    syms = dict(zip(ids, df[sym].astype(str), strict=True))
    lm = None
    lmc = first(cols, *LANDMARK_FLAGS)
    if lmc:
        lm = {i for i, v in zip(ids, df[lmc], strict=True) if is_flag_true(v)}
    elif "feature_space" in cols:
        lm = {i for i, v in zip(ids, df["feature_space"], strict=True) if str(v).strip() == "landmark"}
    return syms, lm


def landmark_panel(meta_dir: Path | None) -> tuple[list[str], list[str]] | None:
    """(Entrez ids, symbols) of the 978 landmarks in the public order, from the metadata folder; None without one."""
    if meta_dir is None:
        return None
    p = Path(meta_dir) / LANDMARK_CSV
    if not p.is_file():
        return None
    df = pd.read_csv(p, dtype=str)
    if "position" in df.columns:
        df = df.sort_values("position", key=lambda s: s.astype(int))
    return [entrez(v) for v in df["gene_id"]], df["gene_symbol"].astype(str).tolist()


@dataclass
class PanelChoice:
    """Which matrix genes go into the shards."""

    index: np.ndarray
    """column indices into the matrix."""
    ids: list[str]
    symbols: list[str]
    description: str


def _check_distinct(ids: list[str], source: str) -> None:
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise GeneMappingError(f"gene id {dup!r} occurs twice in the matrix", path=source, field="gene id",
                               hint="each matrix row/column must be a distinct gene")


def _landmark_set(genes: FileGenes, geneinfo, panel, source: str) -> tuple[set[str], str, list[str]]:
    """(landmark ids, where they came from, symbols in matrix order)."""
    symbols = list(genes.symbols)
    landmark, desc = None, "embedded gene metadata"
    if genes.landmark is not None:
        landmark = {g for g, f in zip(genes.ids, genes.landmark, strict=True) if f}
        desc = f"embedded gene metadata ({genes.flag})"
    if geneinfo is not None:
        syms, lm = gene_info_table(geneinfo)
        symbols = [syms.get(g, s) for g, s in zip(genes.ids, symbols, strict=True)]
        if lm is not None:
            landmark, desc = lm, f"gene info {Path(geneinfo).name}"
    if landmark is None and panel is not None:
        landmark, desc = set(panel[0]), f"landmark table {LANDMARK_CSV}"
    if landmark is None and len(genes.ids) == N_LANDMARKS:
        # an L1000 matrix of exactly 978 genes is the measured landmark panel (LJP/CPC plate files carry no flag)
        landmark, desc = set(genes.ids), "the matrix's 978 genes (the L1000 landmark panel)"
    if landmark is None:
        raise GeneMappingError(
            "no landmark gene information: the matrix has no pr_is_lm/pr_is_lmark/feature_space gene metadata",
            path=source, field="pr_is_lm", hint="pass --geneinfo (gene_info with pr_is_lm), --metadata (a folder "
                                                f"with {LANDMARK_CSV}), or --all-genes")
    return landmark, desc, symbols


def select_gene_panel(genes: FileGenes, *, all_genes: bool, geneinfo=None, meta_dir: Path | None = None,
                      source: str = "") -> PanelChoice:
    """The genes to keep: all of them, or the landmarks (from the file's flags, --geneinfo, the metadata folder's
    landmark table, or a matrix of exactly the 978 landmarks), in the public landmark order when it is known."""
    ids = genes.ids
    _check_distinct(ids, source)
    if all_genes:
        symbols = list(genes.symbols)
        if geneinfo is not None:
            syms, _ = gene_info_table(geneinfo)
            symbols = [syms.get(g, s) for g, s in zip(ids, symbols, strict=True)]
        return PanelChoice(np.arange(len(ids)), list(ids), symbols, "all genes in the file")
    panel = landmark_panel(meta_dir)
    landmark, desc, symbols = _landmark_set(genes, geneinfo, panel, source)
    pos = {g: i for i, g in enumerate(ids)}
    missing = [g for g in landmark if g not in pos]
    if missing:
        raise GeneMappingError(
            f"{len(missing)} of {len(landmark)} landmark genes are not in the matrix (e.g. {sorted(missing)[:5]})",
            path=source, field="gene id", hint="the matrix's genes (Entrez ids) must cover the landmark panel; "
                                               "check the gene id column, or use --all-genes")
    if panel is not None and set(panel[0]) == landmark:
        order = panel[0]  # the public landmark order (position column)
        psym = dict(zip(panel[0], panel[1], strict=True))
        return PanelChoice(np.array([pos[g] for g in order]), list(order), [psym[g] for g in order],
                           desc + " (landmark order)")
    sel = np.array(sorted(pos[g] for g in landmark))
    return PanelChoice(sel, [ids[i] for i in sel], [symbols[i] for i in sel], desc)
