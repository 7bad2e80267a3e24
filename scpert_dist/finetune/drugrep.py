"""Drug representations (names: registry.DRUG_REPS): `learned` (table; cannot represent unseen drugs), `morgan`, `descriptors` (RDKit, any
SMILES), `lincs` (the drug's bulk LINCS signature encoded by the pretrained encoder: any drug LINCS measured)."""

from __future__ import annotations

import warnings

import numpy as np

from ..checkpoint import load_pretrained
from ..data import drugs as D
from ..data.shards.signatures import LincsSignatures
from ..errors import ConfigError, SmilesError
from ..registry import DRUG_REPS


def features(rep: str, smiles: list[str]) -> np.ndarray:
    """Fixed features of a representation computed from the structure (registry.DRUG_REPS: morgan, descriptors);
    rows for '' (control) are zero."""
    if not DRUG_REPS[DRUG_REPS.check(rep)].from_structure:
        raise ConfigError(f"drug rep {rep!r} has no fixed features", field="model.drug_rep")
    valid = [s for s in smiles if s]
    for s in valid:
        if not D.is_valid_smiles(s):
            raise SmilesError(f"invalid SMILES {s!r}", field="smiles", hint="fix the SMILES in the data or --smiles")
    dim = 1024 if rep == "morgan" else len(D.descriptor_names())
    out = np.zeros((len(smiles), dim), np.float32)
    idx = [i for i, s in enumerate(smiles) if s]
    if idx:
        f = D.morgan_fingerprints(valid) if rep == "morgan" else D.descriptors(valid)
        f = np.asarray(f, np.float32)
        if rep == "descriptors":
            f = np.sign(f) * np.log1p(np.abs(f))  # tame heavy-tailed descriptors
        out[idx] = np.nan_to_num(f)
    return out


def warn_learned_unseen(drug: str) -> None:
    warnings.warn(f"drug {drug!r} was not in training: the 'learned' drug representation gives it an untrained "
                  "vector, so its prediction is not informed by the drug; use drug_rep='morgan' for unseen drugs",
                  UserWarning, stacklevel=3)


STRUCTURE_MAP_MIN_DRUGS = 10
"""A structure -> LINCS-representation map is fit only over at least this many LINCS compounds with SMILES."""


def lincs_features(pretrained_dir, shards_dir, drugs: dict[str, str]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """`lincs` representation: for each drug (name -> SMILES), its mean LINCS level-5 signature over every cell line
    and dose in the shards (matched by name, else by InChIKey block of the SMILES), encoded by the pretrained
    gene-token encoder without masking: [CLS] state || mean of the gene-token states (2 x d_model).

    Drugs LINCS did not measure get the representation a ridge map from Morgan bits predicts, fit over EVERY LINCS
    compound in the shards with a SMILES (their encoded signatures are the targets; the data's own measured drugs are
    among them, its unmeasured ones never). Returns (features, names imputed from structure, names with no vector:
    no valid SMILES, or too few LINCS compounds to fit the map)."""
    sigs, codes = _encoded_lincs(str(pretrained_dir), str(shards_dir))

    feats, unmeasured = {}, []
    for name, smi in drugs.items():
        k = sigs._key(name) or (sigs._key(smi) if smi else None)
        if k is None or k not in codes:
            unmeasured.append(name)
        else:
            feats[name] = codes[k]
    imputed = _impute_from_structure({n: drugs[n] for n in unmeasured}, sigs, codes)
    return feats | imputed, sorted(imputed), sorted(set(unmeasured) - set(imputed))


_ENCODED: dict = {}
"""(pretrained folder, shard folder) -> (signatures, encoded per-drug means): one encoding per
process (a benchmark finetunes several seeds from the same pretraining)."""


def _encoded_lincs(pretrained_dir: str, shards_dir: str, batch: int = 64):
    """Every LINCS compound's mean signature (over lines and doses) through the pretrained encoder, in batches:
    [CLS] state || mean gene-token state (2 x d_model) per compound."""
    import torch


    key = (pretrained_dir, shards_dir)
    if key not in _ENCODED:
        model, _, info = load_pretrained(pretrained_dir)
        sigs = LincsSignatures.from_shards(shards_dir, [str(g) for g in info["genes"]])
        by_drug: dict[str, list] = {}
        for (d, _c), v in sigs.sigs.items():
            by_drug.setdefault(d, []).append(v)
        names = list(by_drug)
        X = torch.tensor(np.stack([np.mean(by_drug[k], axis=0) for k in names]), dtype=torch.float32)
        enc, out = model.encoder.eval(), []
        with torch.no_grad():
            for a in range(0, len(names), batch):
                h = enc(X[a:a + batch])
                out.append(torch.cat([h[:, 0], h[:, 1:].mean(1)], -1).numpy().astype(np.float32))
        codes = dict(zip(names, np.concatenate(out) if out else [], strict=True))
        _ENCODED.clear()  # one pretraining at a time is enough
        _ENCODED[key] = (sigs, codes)
    return _ENCODED[key]


def _impute_from_structure(todo: dict[str, str], sigs, codes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ridge (alpha by leave-one-out, scikit-learn's RidgeCV) from Morgan bits to the encoded representation over
    the LINCS compounds with SMILES; applied to the drugs in `todo` that have a valid SMILES."""
    from sklearn.linear_model import RidgeCV

    todo = {n: s for n, s in todo.items() if s and D.is_valid_smiles(s)}
    train = [k for k in codes if k in sigs.smiles]
    if not todo or len(train) < STRUCTURE_MAP_MIN_DRUGS:
        return {}
    X = features("morgan", [sigs.smiles[k] for k in train])
    Y = np.stack([codes[k] for k in train])
    fit = RidgeCV(alphas=np.logspace(-1, 4, 11)).fit(X, Y)
    names = list(todo)
    pred = fit.predict(features("morgan", [todo[n] for n in names])).astype(np.float32)
    return {n: pred[i] for i, n in enumerate(names)}
