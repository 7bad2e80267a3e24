"""Mean LINCS level-5 signature per (drug, cell line) from the pretraining Parquet shards, on a target gene list."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ... import schema as S
from ...errors import ShardError
from ..drugs import inchikey_block, is_valid_smiles, normalize_name


def _line_key(cell: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(cell).upper())


class LincsSignatures:
    """Signatures keyed by normalised drug name, with an InChIKey-block index from SMILES for matching."""

    def __init__(self, sigs: dict[tuple[str, str], np.ndarray], genes: list[str],
                 inchikeys: dict[str, str] | None = None, n_missing_genes: int = 0):
        self.genes = list(genes)
        self.sigs = {(normalize_name(d), _line_key(c)): np.asarray(v, float) for (d, c), v in sigs.items()}
        self.by_inchikey = {k: normalize_name(v) for k, v in (inchikeys or {}).items()}
        self.n_missing_genes = n_missing_genes
        self.smiles: dict[str, str] = {}
        """normalised drug name -> a valid SMILES from the shards (for structure -> signature-space maps)"""

    @classmethod
    def from_shards(cls, shards_dir, genes: list[str]) -> LincsSignatures:
        """Average trt_cp rows per (pert_iname, cell_id), per gene over the rows that measured it (a partial-panel
        plate holds NaN for the genes it lacks); manifest genes aligned to `genes` (missing -> 0, counted
        in n_missing_genes)."""
        import pyarrow.parquet as pq


        d = Path(shards_dir)
        mpath = d / S.MANIFEST
        if not mpath.is_file():
            raise ShardError("no shard manifest in the LINCS shard folder", path=mpath, field=S.MANIFEST,
                             hint="point --shards at a folder written by `scpert data lincs`")
        man = json.loads(mpath.read_text())
        pos = {g: i for i, g in enumerate(man["genes"])}
        take = np.array([pos.get(str(g), -1) for g in genes])
        sums: dict[tuple, np.ndarray] = {}
        counts: dict[tuple, int] = {}
        iks: dict[str, str] = {}
        smiles_of: dict[str, str] = {}
        for sh in man["shards"]:
            t = pq.read_table(d / sh["file"], columns=[S.PERT_INAME, S.CELL_ID, S.PERT_TYPE, S.SMILES, S.EXPR])
            trt = np.asarray(t.column(S.PERT_TYPE).to_pylist()) == S.TRT_CP
            names = t.column(S.PERT_INAME).to_pylist()
            cells = t.column(S.CELL_ID).to_pylist()
            smiles = t.column(S.SMILES).to_pylist()
            expr = np.asarray(t.column(S.EXPR).combine_chunks().flatten().to_numpy(zero_copy_only=False),
                              float).reshape(t.num_rows, -1)
            for i in np.flatnonzero(trt):
                k = (names[i], cells[i])
                seen = np.isfinite(expr[i])  # genes a plate did not measure are NaN: averaged over the others
                sums[k] = sums.get(k, 0) + np.where(seen, expr[i], 0.0)
                counts[k] = counts.get(k, 0) + seen
                s = smiles[i]
                if s and names[i] not in smiles_of and is_valid_smiles(s):
                    iks[inchikey_block(s)] = names[i]
                    smiles_of[names[i]] = s
        sigs = {}
        for k, v in sums.items():
            c = counts[k]
            # mean over the rows that measured the gene; a gene no row of the drug measured -> 0 (as a gene absent
            # from the manifest): these signatures feed numpy baselines (kNN), which need finite values
            m = np.where(c > 0, v / np.maximum(c, 1), 0.0)
            sigs[k] = np.where(take >= 0, m[np.maximum(take, 0)], 0.0)
        out = cls(sigs, genes, iks, n_missing_genes=int((take < 0).sum()))
        out.smiles = {normalize_name(n): s for n, s in smiles_of.items()}
        return out

    def _key(self, drug_name_or_smiles: str) -> str | None:
        k = normalize_name(drug_name_or_smiles)
        if any(dk == k for dk, _ in self.sigs):
            return k
        if self.by_inchikey and is_valid_smiles(drug_name_or_smiles):
            return self.by_inchikey.get(inchikey_block(drug_name_or_smiles))
        return None

    def get(self, drug_name_or_smiles: str, cell_line: str) -> np.ndarray | None:
        k = self._key(drug_name_or_smiles)
        return None if k is None else self.sigs.get((k, _line_key(cell_line)))

    def drugs(self, cell_line=None) -> list[str]:
        return sorted({d for d, c in self.sigs if cell_line is None or c == _line_key(cell_line)})
