"""Metadata for the simulator: the real public tables when a folder is given, else a fully synthetic stand-in.

Real: 978 L1000 landmark genes, basal log2 expression of 165 cell lines, the LINCS2020 (cell, compound) design,
the sci-Plex3 screen design (188 compounds x 4 doses x 3 lines, 24 h) with Selleck pathway/target and LINCS overlap.
Synthetic: synthetic genes and basal profiles (cell lines 'SYN-A549-like', ...) and real molecules from the
NCI first_5K.smi file shipped inside the RDKit wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import MetadataError
from ..drugs import is_valid_smiles

SC_LINES = ["A549", "MCF7", "K562"]
SC_DOSES_NM = [10.0, 100.0, 1000.0, 10000.0]
F_GENES = "lincs/l1000_landmark_genes.csv"
F_BASAL = "lincs/l1000_transigen_basal_modz_x1_n165x978.parquet"
F_BULK = "lincs/lincs2020_transigen_signature_index_n78569.parquet"
F_PERTINFO = "drugs/lincs2015_pertinfo_trt_cp_dhimmel.parquet"
F_DESIGN = "sciplex/sciplex3_hash_design_SupplTable3.tsv.gz"
F_OVERLAP = "sciplex/sciplex3_compounds_with_lincs_overlap.csv"
F_SELLECK = "sciplex/selleck_library_drugProperties_short.tsv"
F_OOD = "sciplex/chemcpa_sciplex_split_ood_finetuning_drugs.csv"


@dataclass
class SimMetadata:
    """Everything the simulator needs to know about genes, cell lines and compounds."""

    genes: pd.DataFrame
    """gene_id (Entrez str), gene_symbol, ensembl_id; landmark order."""
    basal: pd.DataFrame
    """index cell_id, columns gene_id: basal log2 expression (~4..14)."""
    bulk_design: pd.DataFrame
    """cell_id, smiles: the (cell, compound) pairs of the bulk design (LINCS2020 index when real)."""
    sciplex: pd.DataFrame
    """one row per sci-Plex3 compound: name, smiles, pathway, target, pert_id, in_lincs (bool), ood (bool)."""
    sc_lines: list[str]
    """the three single-cell lines (keys of `basal`)."""
    description: str
    """'real public metadata from <folder>' or 'synthetic metadata (...)'."""
    real: bool


def _read(folder: Path, rel: str, **kw) -> pd.DataFrame:
    p = folder / rel
    if not p.exists():
        raise MetadataError("metadata file missing", path=str(p),
                            hint="give --metadata a folder with the public file layout (see SOURCES.md), or none for synthetic")
    try:
        if rel.endswith(".parquet"):
            return pd.read_parquet(p, **kw)
        return pd.read_csv(p, sep="\t" if ".tsv" in rel else ",", **kw)
    except Exception as e:  # unreadable table
        raise MetadataError(f"cannot read metadata table: {e}", path=str(p), hint="re-fetch the file") from e


def _need(df: pd.DataFrame, cols: list[str], folder: Path, rel: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise MetadataError(f"missing columns {missing}", path=str(folder / rel), field=missing[0],
                            hint="the file does not have the layout of the public table")


def _real(folder: Path) -> SimMetadata:
    g = _read(folder, F_GENES, dtype={"gene_id": str})
    _need(g, ["gene_id", "gene_symbol", "ensembl_id"], folder, F_GENES)
    if "position" in g.columns:
        g = g.sort_values("position")
    genes = g[["gene_id", "gene_symbol", "ensembl_id"]].reset_index(drop=True).astype(str)
    b = _read(folder, F_BASAL)
    _need(b, ["cell_id", *genes.gene_id.head(3)], folder, F_BASAL)
    missing = [x for x in genes.gene_id if x not in b.columns]
    if missing:
        raise MetadataError(f"{len(missing)} landmark genes missing from basal profiles", path=str(folder / F_BASAL),
                            field=missing[0], hint="use the transigen basal table with 978 landmark columns")
    basal = b.set_index("cell_id")[list(genes.gene_id)].astype(np.float64)
    for line in SC_LINES:
        if line not in basal.index:
            raise MetadataError(f"cell line {line} has no basal profile", path=str(folder / F_BASAL), field="cell_id",
                                hint="the basal table must include A549, MCF7 and K562")
    bd = _read(folder, F_BULK)
    _need(bd, ["cell_id", "canonical_smiles"], folder, F_BULK)
    bd = bd[bd.cell_id.isin(basal.index)].rename(columns={"canonical_smiles": "smiles"})[["cell_id", "smiles"]]
    ov = _read(folder, F_OVERLAP)
    _need(ov, ["name", "SMILES", "target", "selleck_pathway", "lincs_brd_ids_by_inchikey14", "catalog_number"],
          folder, F_OVERLAP)
    design = _read(folder, F_DESIGN)
    _need(design, ["cell_type", "time_point", "dose", "name", "SMILES", "vehicle"], folder, F_DESIGN)
    d24 = design[(design.time_point == 24) & (~design.vehicle.astype(bool))]
    names = sorted(d24.name.dropna().unique())
    smi = d24.drop_duplicates("name").set_index("name").SMILES
    ov = ov.set_index("name")
    ood = _read(folder, F_OOD)
    _need(ood, ["chemcpa_drug_name", "role"], folder, F_OOD)
    ood_names = set(ood[ood.role == "ood"].chemcpa_drug_name)
    rows = []
    for n in names:
        r = ov.loc[n] if n in ov.index else None
        brd = None
        in_lincs = False
        pathway, target, ood_flag = "unknown", "unknown", False
        if r is not None:
            for col in ("lincs_brd_ids_by_inchikey14", "lincs_brd_ids_trapnell_map", "lincs_brd_ids_by_name"):
                v = r.get(col)
                if isinstance(v, str) and v.startswith("BRD"):
                    brd = v.split("|")[0].split(";")[0].strip()
                    break
            in_lincs = bool(r.get("in_lincs_by_inchikey14", False)) or bool(r.get("lincs2020_transigen_any_cell", False))
            pathway = str(r.get("selleck_pathway") or "unknown")
            target = str(r.get("target") or "unknown")
            ood_flag = str(r.get("chemcpa_name")) in ood_names or bool(r.get("chemcpa_split_ood_finetuning_ood", False))
        pid = brd or f"SIM-SCI-{r['catalog_number'] if r is not None else abs(hash(n)) % 10**6}"
        rows.append(dict(name=n, smiles=str(smi[n]), pathway=pathway, target=target, pert_id=pid,
                         in_lincs=in_lincs, ood=ood_flag))
    sci = pd.DataFrame(rows)
    if sci.smiles.isin(["nan", ""]).any():
        bad = sci[sci.smiles.isin(["nan", ""])].name.iloc[0]
        raise MetadataError("compound without SMILES", path=str(folder / F_DESIGN), field=f"SMILES ({bad})",
                            hint="every treated row of the design table needs a SMILES")
    return SimMetadata(genes=genes, basal=basal, bulk_design=bd.reset_index(drop=True), sciplex=sci,
                       sc_lines=list(SC_LINES), description=f"real public metadata from {folder.name}", real=True)


def _nci_smiles() -> list[str]:
    from rdkit import RDConfig

    p = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    if not p.exists():
        raise MetadataError("RDKit NCI molecule file missing", path=str(p),
                            hint="reinstall rdkit (the wheel ships Data/NCI/first_5K.smi)")
    out = []
    for line in p.read_text().splitlines():
        parts = line.split()
        if parts and 12 <= len(parts[0]) <= 80 and "." not in parts[0]:
            out.append(parts[0])
    return out


SYN_BULK_DRUGS = 4000
"""LINCS-side compounds of the synthetic metadata (besides the sci-Plex3 ones): thousands, as in LINCS (the real
LINCS 2020 index in ../shared/data has 8,316 compounds, median 7 cell lines each; RDKit's NCI set holds 4,535 valid
molecules, so 4,000 + 188 is as broad as a fresh clone can be)."""
SYN_LINES_P = 0.45
"""each synthetic compound is measured in 1 + Binomial(11, 0.45) of the 12 lines (mean 6, real median 7)."""
SYN_SCI_IN_LINCS = 0.84
"""share of sci-Plex3 compounds LINCS measured (real: 157 of 188 in the LINCS 2020 index)."""


def _synthetic(seed: int = 0, n_genes: int = 978, n_lines: int = 12, n_bulk_drugs: int = SYN_BULK_DRUGS,
               n_sci: int = 188) -> SimMetadata:
    rng = np.random.default_rng(seed + 991)
    genes = pd.DataFrame({"gene_id": [str(100000 + i) for i in range(n_genes)],
                          "gene_symbol": [f"SYNG{i:04d}" for i in range(n_genes)],
                          "ensembl_id": [f"ENSGSYN{i:011d}" for i in range(n_genes)]})
    lines = [f"SYN-{x}-like" for x in SC_LINES] + [f"SYN-LINE{i:02d}" for i in range(n_lines - 3)]
    mu = rng.normal(8.5, 1.8, n_genes)
    basal = pd.DataFrame(np.clip(mu[None] + rng.normal(0, 0.8, (n_lines, n_genes)), 2, 15),
                         index=pd.Index(lines, name="cell_id"), columns=genes.gene_id)
    smiles = [s for s in _nci_smiles()[: (n_bulk_drugs + n_sci) * 2] if is_valid_smiles(s)]
    smiles = smiles[: n_bulk_drugs + n_sci]
    sci_smi, bulk_smi = smiles[:n_sci], smiles[n_sci:]
    sci = pd.DataFrame({"name": [f"NCI-{i:04d}" for i in range(len(sci_smi))], "smiles": sci_smi,
                        "pathway": "unknown", "target": "unknown",
                        "pert_id": [f"SIM-NCI-{i:04d}" for i in range(len(sci_smi))]})
    sci["in_lincs"] = rng.random(len(sci)) < SYN_SCI_IN_LINCS
    sci["ood"] = False
    sci.loc[sci.index[sci.in_lincs][:9], "ood"] = True
    k = 1 + rng.binomial(n_lines - 1, SYN_LINES_P, size=len(bulk_smi))
    pairs = [(c, s) for s, n in zip(bulk_smi, k, strict=True) for c in rng.choice(lines, size=n, replace=False)]
    bd = pd.DataFrame(pairs, columns=["cell_id", "smiles"])
    return SimMetadata(genes=genes, basal=basal, bulk_design=bd, sciplex=sci, sc_lines=lines[:3],
                       description="synthetic metadata (synthetic genes and basal profiles; real molecules from "
                                   "RDKit's NCI first_5K.smi)", real=False)


def load_metadata(folder: Path | str | None) -> SimMetadata:
    """Real public metadata from `folder`, or fully synthetic metadata when `folder` is None."""
    if folder is None:
        return _synthetic()
    folder = Path(folder)
    if not folder.is_dir():
        raise MetadataError("metadata folder does not exist", path=str(folder), hint="pass an existing folder")
    return _real(folder)
