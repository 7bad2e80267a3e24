"""Drug featurisation with RDKit: canonical SMILES, InChIKey, Morgan fingerprints, 2D descriptors, cached per compound.

Salts and solvents are stripped (largest fragment) before anything is computed, so 'X.HCl' and 'X' agree.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from ..errors import SmilesError


def _rdkit():
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return Chem


@functools.lru_cache(maxsize=65536)
def mol_of(smiles: str):
    """The standardised RDKit molecule of a SMILES (cached); SmilesError for an empty or invalid one."""
    Chem = _rdkit()
    from rdkit.Chem.MolStandardize import rdMolStandardize

    if not isinstance(smiles, str) or not smiles.strip():
        raise SmilesError("empty SMILES", field="smiles", hint="give a valid SMILES string")
    mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None:
        raise SmilesError(f"invalid SMILES '{smiles}'", field="smiles",
                          hint="check the string (RDKit cannot parse it); remove or correct this compound")
    return rdMolStandardize.LargestFragmentChooser().choose(mol)


def is_valid_smiles(smiles: str) -> bool:
    try:
        mol_of(smiles)
        return True
    except SmilesError:
        return False


@functools.lru_cache(maxsize=65536)
def canonical_smiles(smiles: str) -> str:
    """Canonical isomeric SMILES of the largest fragment."""
    return _rdkit().MolToSmiles(mol_of(smiles))


@functools.lru_cache(maxsize=65536)
def inchikey(smiles: str) -> str:
    return _rdkit().MolToInchiKey(mol_of(smiles))


def inchikey_block(smiles: str) -> str:
    """First InChIKey block (14 characters): the connectivity, ignoring stereo and protonation."""
    return inchikey(smiles)[:14]


@functools.lru_cache(maxsize=65536)
def _morgan(smiles: str, radius: int, n_bits: int) -> bytes:
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    return gen.GetFingerprintAsNumPy(mol_of(smiles)).astype(np.uint8).tobytes()


def morgan_fingerprints(smiles: Sequence[str], radius: int = 2, n_bits: int = 1024) -> np.ndarray:
    """[n, n_bits] uint8 Morgan (ECFP-like) bit vectors; cached per compound."""
    out = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    for i, s in enumerate(smiles):
        out[i] = np.frombuffer(_morgan(s, radius, n_bits), dtype=np.uint8)
    return out


@functools.lru_cache(maxsize=65536)
def _descriptors(smiles: str) -> tuple[float, ...]:
    from rdkit.Chem import Descriptors

    mol = mol_of(smiles)
    vals = []
    for _, fn in Descriptors.descList:
        try:
            v = float(fn(mol))
        except Exception:
            v = float("nan")
        vals.append(v)
    return tuple(vals)


def descriptor_names() -> list[str]:
    from rdkit.Chem import Descriptors

    return [n for n, _ in Descriptors.descList]


def descriptors(smiles: Sequence[str]) -> np.ndarray:
    """[n, n_descriptors] float32 RDKit 2D descriptors; non-finite values set to 0."""
    arr = np.array([_descriptors(s) for s in smiles], dtype=np.float64)
    arr[~np.isfinite(arr)] = 0.0
    return np.clip(arr, -1e6, 1e6).astype(np.float32)


def tanimoto(fp_a: np.ndarray, fp_b: np.ndarray) -> np.ndarray:
    """Pairwise Tanimoto similarity of two uint8 bit matrices [n, b] x [m, b] -> [n, m]."""
    a = fp_a.astype(np.float32)
    b = fp_b.astype(np.float32)
    inter = a @ b.T
    union = a.sum(1, keepdims=True) + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def normalize_name(name: str) -> str:
    """Name key for matching compounds across tables: lower case, alphanumerics only."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())
