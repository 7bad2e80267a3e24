"""Map single-cell gene ids (Ensembl, symbols, Entrez) onto the LINCS L1000 landmark panel.

Order of keys tried per gene: Entrez id, Ensembl id (version suffix stripped), symbol (LINCS2020 symbol or the
GSE92742 symbol, case-insensitive). The panel is `lincs/l1000_landmark_genes.csv` in the metadata folder, or the
`genes` + `gene_symbols` of a pretraining manifest.
"""

from __future__ import annotations

import json
import re
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
    """The genes of a LINCS matrix, in matrix order (after rows that are no gene were left out)."""

    ids: list[str]
    """Entrez ids (str), or the file's row ids where it has no gene id column."""
    symbols: list[str]
    landmark: np.ndarray | None
    """bool per gene from the file's own flag column; None when the file has none."""
    flag: str = ""
    """the column the landmark flags came from ('' when none)."""
    columns: np.ndarray | None = None
    """the matrix columns (row-metadata rows) that are these genes, in order; None: every column is a gene."""
    dropped: dict[str, list[str]] = field(default_factory=dict)
    """matrix rows left out, by reason -> their row ids (calibration analytes, probes that map to no gene, ...)."""
    mapping: str = ""
    """how row ids became gene ids, with counts ('' for a plain file of gene ids)."""

    def report(self) -> str:
        """One line: the mapping and what was dropped, with counts ('' when nothing to say)."""
        drop = "; ".join(f"{len(v)} {k} (e.g. {', '.join(v[:3])})" for k, v in self.dropped.items() if v)
        return "; ".join(x for x in (self.mapping, f"rows dropped: {drop}" if drop else "") if x)


AFFX_PROBE = re.compile(r"^(\d+(_[a-z]+)*_at|AFFX-.+)$")
"""Affymetrix HG-U133A probe ids ('200814_at', '218597_s_at', 'AFFX-...'): the GSE92742-era L1000 row ids."""
NO_GENE = {"", "nan", "none", "-666", "na", "not_assigned"}


def _gene_or_empty(v) -> str:
    s = entrez(v)
    return "" if s.lower() in NO_GENE else s


def is_probe_space(rid: Sequence[str]) -> bool:
    """Most row ids are Affymetrix probe ids."""
    rid = [str(r) for r in rid]
    return bool(rid) and sum(bool(AFFX_PROBE.match(r)) for r in rid) > len(rid) / 2


def row_genes(row: pd.DataFrame, rid: Sequence[str], probe_map: dict[str, str] | None = None,
              source: str = "") -> FileGenes:
    """Gene ids, symbols and landmark flags from a GCT/GCTX row-metadata table (any release's column names).
    Rows without a gene id (the 11 calibration analytes of a CMap plate, 'NOT_ASSIGNED') are left out (counted in
    `dropped`). Row ids that are Affymetrix probe ids are mapped to Entrez ids (probe_genes)."""
    rid = [str(r) for r in rid]
    cols = set(row.columns)
    idc = first(cols, "pr_gene_id", "gene_id")
    symc = first(cols, "pr_gene_symbol", "gene_symbol")
    syms = row[symc].astype(str).tolist() if symc else [""] * len(rid)
    lmc = first(cols, *LANDMARK_FLAGS)
    if lmc:
        flags, flag = np.array([is_flag_true(v) for v in row[lmc]]), lmc
    elif "feature_space" in cols:
        flags, flag = (row["feature_space"].astype(str) == "landmark").to_numpy(), "feature_space"
    else:
        flags, flag = None, ""
    if is_probe_space(rid):
        return probe_genes(rid, [_gene_or_empty(v) for v in row[idc]] if idc else None, syms, flags, flag,
                           probe_map, idc, source)
    ids = [_gene_or_empty(v) for v in (row[idc] if idc else rid)]
    keep = np.array([k for k, g in enumerate(ids) if g], dtype=np.int64)
    if len(keep) == len(ids):
        return FileGenes([entrez(v) for v in (row[idc] if idc else rid)], syms, flags, flag)
    lost = [rid[k] for k in range(len(rid)) if not ids[k]]
    return FileGenes([ids[k] for k in keep], [syms[k] for k in keep], None if flags is None else flags[keep], flag,
                     columns=keep, dropped={f"rows without a gene id ({idc or 'id'})": lost})


def probe_genes(rid: list[str], file_ids: list[str] | None, syms: list[str], flags: np.ndarray | None, flag: str,
                probe_map: dict[str, str] | None, idc: str | None, source: str = "") -> FileGenes:
    """Affymetrix probe ids -> Entrez ids: the landmark table's `affx_probe_id_gse92742` first (the 978 landmark
    probes), then the file's own `pr_gene_id` (single Entrez ids; '387522///7335' names several genes and is
    dropped). One probe per gene: a landmark probe wins, else the first. GeneMappingError when nothing maps."""
    n = len(rid)
    gene = [""] * n
    how = [""] * n
    reason = [""] * n
    for k, r in enumerate(rid):
        g = (probe_map or {}).get(r, "")
        if g:
            gene[k], how[k] = g, "landmark table"
            continue
        v = file_ids[k] if file_ids is not None else ""
        if v and "///" in v:
            reason[k] = "probes naming several genes ('///')"
        elif v and v.isdigit():
            gene[k], how[k] = v, "file"
        else:
            reason[k] = "rows without a gene id (calibration analytes, NOT_ASSIGNED, '-666')"
    if not any(gene):
        tried = [f"affx_probe_id_gse92742 of {LANDMARK_CSV}" + ("" if probe_map else " (no metadata folder given)"),
                 f"the row metadata {idc}" if idc else "the row metadata pr_gene_id / gene_id (absent)"]
        raise GeneMappingError(
            f"the row ids are Affymetrix probe ids (e.g. {rid[0]!r}) and none of {n} maps to a gene; tried: "
            + "; ".join(tried), path=source, field="id (probe ids)",
            hint=f"pass --metadata (a folder with {LANDMARK_CSV}: its affx_probe_id_gse92742 column maps the "
                 "landmark probes to Entrez ids), or a file whose row metadata has pr_gene_id")
    first_landmark = [bool(how[k] == "landmark table" or (flags is not None and flags[k])) for k in range(n)]
    taken: dict[str, int] = {}
    for k in sorted(range(n), key=lambda k: (not first_landmark[k], k)):
        g = gene[k]
        if not g:
            continue
        if g in taken:
            gene[k], reason[k] = "", "second probes of a gene (the landmark probe or the first kept)"
        else:
            taken[g] = k
    keep = np.array([k for k in range(n) if gene[k]], dtype=np.int64)
    dropped: dict[str, list[str]] = {}
    for k in range(n):
        if reason[k]:
            dropped.setdefault(reason[k], []).append(rid[k])
    by_table = sum(how[k] == "landmark table" for k in keep)
    by_file = len(keep) - by_table
    landmark = flags[keep] if flags is not None else (np.array([how[k] == "landmark table" for k in keep])
                                                      if probe_map else None)
    n_lm = int(landmark.sum()) if landmark is not None else 0
    mapping = (f"Affymetrix probe ids: {n:,} rows -> {len(keep):,} genes ("
               + (f"{by_table:,} through affx_probe_id_gse92742 of {LANDMARK_CSV}" if probe_map else
                  "no metadata folder: the landmark table's probe column not used")
               + (f", {by_file:,} through the file's {idc}" if idc else "")
               + f"); {n_lm:,} of them landmarks")
    return FileGenes([gene[k] for k in keep], [syms[k] for k in keep], landmark,
                     flag if flags is not None else ("affx_probe_id_gse92742" if probe_map else ""),
                     columns=keep, dropped=dropped, mapping=mapping)


def landmark_probes(meta_dir: Path | None) -> dict[str, str] | None:
    """Affymetrix probe id -> Entrez id of the 978 landmarks (`affx_probe_id_gse92742`); None without the table."""
    df = _landmark_csv(meta_dir)
    if df is None or "affx_probe_id_gse92742" not in df.columns:
        return None
    return {str(p).strip(): entrez(g) for p, g in zip(df["affx_probe_id_gse92742"], df["gene_id"], strict=True)
            if isinstance(p, str) and p.strip()}


def landmark_symbols(meta_dir: Path | None) -> dict[str, tuple[str, str]] | None:
    """UPPER-CASE symbol (LINCS2020 `gene_symbol` and the older `gene_symbol_gse92742`) -> (Entrez id, the
    LINCS2020 symbol) of the 978 landmarks; None without the table."""
    df = _landmark_csv(meta_dir)
    if df is None:
        return None
    out: dict[str, tuple[str, str]] = {}
    for col in ("gene_symbol", "gene_symbol_gse92742"):
        if col in df.columns:
            for s, g, s20 in zip(df[col], df["gene_id"], df["gene_symbol"], strict=True):
                if isinstance(s, str) and s.strip():
                    out.setdefault(s.strip().upper(), (entrez(g), str(s20)))
    return out


def _landmark_csv(meta_dir: Path | None) -> pd.DataFrame | None:
    if meta_dir is None or not (Path(meta_dir) / LANDMARK_CSV).is_file():
        return None
    p = Path(meta_dir) / LANDMARK_CSV
    df = pd.read_csv(p, dtype=str)
    if "gene_id" not in df.columns or "gene_symbol" not in df.columns:
        raise MetadataError("landmark table lacks gene_id / gene_symbol", path=str(p), field="gene_id,gene_symbol",
                            hint=f"columns present: {list(df.columns)}")
    return df


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
    """column indices into the matrix; -1 = a panel gene the file does not hold (NaN in every row)."""
    ids: list[str]
    symbols: list[str]
    description: str
    missing: list[str] = field(default_factory=list)
    """panel genes (Entrez ids) the file does not hold: masked (NaN) in every row, never zero-filled."""


MIN_PANEL_SHARE = 0.25
"""A file holding fewer than this share of the landmark panel is refused (its gene ids are likely wrong) instead
of being read with the rest masked."""


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
    # a plate that measured part of the panel (one bead set) says so with its own landmark flags: the panel's other
    # genes are kept as NaN in every row (masked out of the loss and the metrics), never zero-filled
    declared = genes.landmark is not None and geneinfo is None
    if panel is not None and declared and landmark < set(panel[0]):
        if len(landmark) < MIN_PANEL_SHARE * len(panel[0]):
            raise GeneMappingError(
                f"only {len(landmark)} of the {len(panel[0])} landmark genes are flagged in the file ({genes.flag})",
                path=source, field=genes.flag or "gene id",
                hint="check the gene id and landmark flag columns, or use --all-genes")
        order, psym = panel[0], dict(zip(panel[0], panel[1], strict=True))
        absent = [g for g in order if g not in landmark]
        return PanelChoice(np.array([pos[g] if g in landmark else -1 for g in order], dtype=np.int64), list(order),
                           [psym[g] for g in order],
                           f"{desc}: {len(landmark)} of the {len(order)} landmark genes in the file; the other "
                           f"{len(absent)} are masked (NaN in every row) (landmark order)", missing=absent)
    sel = np.array(sorted(pos[g] for g in landmark))
    if declared and panel is None and len(sel) < N_LANDMARKS:
        desc += (f": {len(sel)} landmark genes in the file; without the landmark table (--metadata) the rest of the "
                 f"{N_LANDMARKS}-gene panel is unknown, so only these are kept")
    return PanelChoice(sel, [ids[i] for i in sel], [symbols[i] for i in sel], desc)
