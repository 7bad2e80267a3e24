"""Match sci-Plex3 compounds to LINCS compounds (InChIKey connectivity block and normalised name), and a
per-compound feature cache (Morgan fingerprints or RDKit descriptors) on disk."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ...errors import InputFileError, MetadataError, SmilesError
from ..drugs import descriptors, inchikey_block, morgan_fingerprints, normalize_name

log = logging.getLogger(__name__)

SCIPLEX_DESIGN = "sciplex/sciplex3_hash_design_SupplTable3.tsv.gz"
LINCS_PERTINFO = "drugs/lincs2015_pertinfo_trt_cp_dhimmel.parquet"
CHEMCPA_BRD = "drugs/chemcpa_lincs_drugs_smiles.csv"


def _need(df: pd.DataFrame, cols: list[str], path: str) -> None:
    miss = [c for c in cols if c not in df.columns]
    if miss:
        raise MetadataError(f"table lacks columns {miss}", path=path, field=",".join(miss),
                            hint=f"columns present: {list(df.columns)}")


def sciplex_compounds(metadata: str | Path) -> pd.DataFrame:
    """The 188 sci-Plex3 compounds (name, SMILES, catalog_number) from the design table (vehicle rows dropped)."""
    p = Path(metadata) / SCIPLEX_DESIGN
    if not p.is_file():
        raise InputFileError("sci-Plex3 design table not found", path=str(p), hint="pass the public metadata folder")
    d = pd.read_csv(p, sep="\t", dtype=str)
    _need(d, ["name", "SMILES", "catalog_number"], str(p))
    d = d.dropna(subset=["name", "SMILES"])
    return d[["catalog_number", "name", "SMILES"]].drop_duplicates("name").reset_index(drop=True)


def lincs_compounds(metadata: str | Path, *, with_chemcpa: bool = True) -> pd.DataFrame:
    """LINCS compounds: pert_id, pert_iname, smiles from dhimmel's pertinfo (+ chemCPA's BRD->SMILES table,
    names unknown there)."""
    p = Path(metadata) / LINCS_PERTINFO
    if not p.is_file():
        raise InputFileError("LINCS pertinfo table not found", path=str(p), hint="pass the public metadata folder")
    d = pd.read_parquet(p)
    _need(d, ["pert_id", "pert_iname", "canonical_smiles"], str(p))
    out = d[["pert_id", "pert_iname", "canonical_smiles"]].rename(columns={"canonical_smiles": "smiles"})
    q = Path(metadata) / CHEMCPA_BRD
    if with_chemcpa and q.is_file():
        c = pd.read_csv(q, header=None, names=["pert_id", "smiles"], dtype=str, skipinitialspace=True)
        c["pert_iname"] = ""
        out = pd.concat([out, c[["pert_id", "pert_iname", "smiles"]]], ignore_index=True)
    return out.fillna("").reset_index(drop=True)


BRD_SMILES_TABLES = ("drugs/chemcpa_lincs_drugs_smiles.csv", "drugs/ciger_lincs_drug_smiles.csv.gz")
"""headerless (BRD pert_id, SMILES) tables of the public metadata folder, read before dhimmel's pertinfo."""


def brd_smiles(metadata: str | Path) -> dict[str, str]:
    """BRD pert_id -> SMILES from the drug tables of the metadata folder (chemCPA, CIGER, dhimmel's pertinfo; the
    first table that names a pert_id wins)."""
    metadata = Path(metadata)
    out: dict[str, str] = {}
    for rel in BRD_SMILES_TABLES:
        if (metadata / rel).is_file():
            t = pd.read_csv(metadata / rel, header=None, names=["pert_id", "smiles"], dtype=str)
            for a, b in zip(t.pert_id, t.smiles, strict=True):
                out.setdefault(str(a).strip(), str(b).strip())
    pi = lincs_compounds(metadata, with_chemcpa=False)
    for a, b in zip(pi.pert_id, pi.smiles, strict=True):
        if b:
            out.setdefault(a, b)
    return out


def _block_or_empty(s: str) -> str:
    if not isinstance(s, str) or not s.strip() or s.strip() in ("-666", "nan"):
        return ""
    try:
        return inchikey_block(s)
    except SmilesError:
        return ""


SALTS = (r"\b(mesylate|dimesylate|hydrochloride|dihydrochloride|hcl|2hcl|sodium|disodium|potassium|maleate|"
         r"fumarate|citrate|tosylate|sulfate|phosphate|acetate|tartrate|besylate|lactate|hydrate|monohydrate)\b")


def name_keys(name: str) -> list[str]:
    """Normalised keys of a compound name and its aliases: 'Navitoclax (ABT-263)' -> navitoclax(abt263),
    navitoclax, abt263; 'Tozasertib (VX-680, MK-0457)' also -> vx680, mk0457."""
    import re

    s = str(name)
    parts = [s, re.sub(r"\(.*?\)", " ", s)]
    parts.append(re.sub(SALTS, " ", parts[1], flags=re.I))
    for inner in re.findall(r"\((.*?)\)", s):
        parts += inner.split(",")
    keys = []
    for p in parts:
        k = normalize_name(p)
        if len(k) >= 3 and k not in keys:
            keys.append(k)
    return keys


def match_compounds(sciplex_table: pd.DataFrame, lincs_table: pd.DataFrame, *, name_col: str = "name",
                    smiles_col: str = "SMILES", progress: bool = True) -> pd.DataFrame:
    """One row per sci-Plex3 compound: name, inchikey14, lincs_by_inchikey (';'-joined pert_ids),
    lincs_by_name (pert_ids whose normalised pert_iname equals the normalised name or one of its
    aliases in parentheses, see name_keys), matched_inchikey,
    matched_name, matched_any. InChIKey blocks come from RDKit on the largest fragment (salts stripped);
    unparsable LINCS SMILES are skipped."""
    _need(sciplex_table, [name_col, smiles_col], "sciplex_table")
    _need(lincs_table, ["pert_id", "pert_iname", "smiles"], "lincs_table")
    from tqdm.auto import tqdm

    by_block: dict[str, set[str]] = {}
    for pid, smi in tqdm(zip(lincs_table["pert_id"], lincs_table["smiles"], strict=False), total=len(lincs_table),
                         desc="LINCS InChIKeys", disable=not progress, mininterval=5):
        b = _block_or_empty(smi)
        if b:
            by_block.setdefault(b, set()).add(str(pid).strip())
    by_name: dict[str, set[str]] = {}
    for pid, nm in zip(lincs_table["pert_id"], lincs_table["pert_iname"], strict=False):
        k = normalize_name(nm)
        if k:
            by_name.setdefault(k, set()).add(str(pid).strip())
    rows = []
    for nm, smi in zip(sciplex_table[name_col], sciplex_table[smiles_col], strict=False):
        b = _block_or_empty(smi)
        ik = sorted(by_block.get(b, ())) if b else []
        nmatch = sorted(set().union(*[by_name.get(k, set()) for k in name_keys(nm)]))
        rows.append({"name": nm, "inchikey14": b, "lincs_by_inchikey": ";".join(ik), "lincs_by_name": ";".join(nmatch),
                     "matched_inchikey": bool(ik), "matched_name": bool(nmatch), "matched_any": bool(ik or nmatch)})
    return pd.DataFrame(rows)


def drug_features(smiles_list: Sequence[str], kind: str = "morgan", cache_dir: str | Path | None = None,
                  **kw) -> np.ndarray:
    """[n, d] features per SMILES ('morgan': uint8 bits, 'descriptors': float32). With cache_dir, each
    compound's vector is stored as `<kind>-<sha1(params+canonical input)>.npy` and reused."""
    if kind not in ("morgan", "descriptors"):
        raise MetadataError(f"unknown drug feature kind '{kind}'", field="kind", hint="use 'morgan' or 'descriptors'")
    fn = (lambda s: morgan_fingerprints(s, **kw)) if kind == "morgan" else descriptors
    if cache_dir is None:
        return fn(list(smiles_list))
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for s in smiles_list:
        key = hashlib.sha1(f"{kind}|{sorted(kw.items())}|{s}".encode()).hexdigest()
        f = cache / f"{kind}-{key}.npy"
        if f.is_file():
            out.append(np.load(f))
            continue
        v = fn([s])[0]
        tmp = f.with_name(f".{f.name}.tmp.npy")
        np.save(tmp, v)
        tmp.replace(f)
        out.append(v)
    return np.stack(out) if out else np.zeros((0, 0), np.float32)
