"""The finetuned model format: a folder with `model.safetensors` (weights) and `scpert_finetune.json` (the config,
the encoder's ModelConfig, the model's init parameters with its decoder's and drug representation's registered names,
genes, cell lines, training drugs with their SMILES, the drug representation and the training history), and the
control cells it predicts from. Written atomically; read from a folder, an MLflow run id or a registered model URI.
The model is rebuilt from it by `finetune/build.py: load_finetuned`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointError
from .resolve import FINETUNED_META, resolve

MODEL_FILE, META_FILE = "model.safetensors", FINETUNED_META
CONTROLS_FILE = "controls.h5ad"
"""The control cells the model predicts from when no data is given (the finetuning's control pool)."""


def save_finetuned(out: str | Path, model, meta: dict, controls=None) -> Path:
    """Write the folder next to `out` under a temporary name, then rename it into place (never half-written).
    `controls`: an AnnData of control cells saved with the model (`controls.h5ad`)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp_ft_"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    if controls is not None:
        controls.write_h5ad(tmp / CONTROLS_FILE)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def read_finetuned(spec: str | Path, tracking: str | None = None) -> tuple[dict, dict]:
    """(state dict of tensors, meta dict) of the finetuned model named by a folder, run id, models:/name@alias or
    models:/name/version; meta['dir'] is its local folder, meta['source'] what was asked for. The model itself is
    built by `finetune.build.load_finetuned`."""
    from safetensors.torch import load_file

    p = resolve(spec, kind="finetuned", tracking=tracking)
    if not (p / MODEL_FILE).is_file():
        raise CheckpointError(f"{MODEL_FILE} missing", path=str(p / MODEL_FILE), hint="re-run `scpert finetune`")
    try:
        meta = json.loads((p / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"finetuned model metadata is not valid JSON ({e})", path=str(p / META_FILE)) from None
    try:
        state = load_file(str(p / MODEL_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"cannot read weights ({e})", path=str(p / MODEL_FILE)) from e
    meta["dir"], meta["source"] = str(p), str(spec)
    return state, meta
