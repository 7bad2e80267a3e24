"""One answer to "where is this model?": an MLflow run id, `models:/name@alias`, `models:/name/version`,
`runs:/id/path`, or a local folder -> a local folder, checked to hold the kind of model the caller needs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError
from ..tracking import resolve_uri

PRETRAINED_META = "scpert_model.json"
FINETUNED_META = "scpert_finetune.json"
_KIND_FILE = {"pretrained": PRETRAINED_META, "finetuned": FINETUNED_META}
_COMMAND = {"pretrained": "scpert pretrain", "finetuned": "scpert finetune (or a sweep)"}
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def is_model_uri(spec: str) -> bool:
    return spec.startswith(("models:/", "runs:/"))


def _download(spec: str, tracking: str | None, artifact_path: str) -> Path:
    import mlflow


    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars on our console
    uri = resolve_uri(tracking)
    try:
        if is_model_uri(spec):
            if spec.startswith("models:/"):  # resolved through the registry, which does not follow tracking_uri=
                mlflow.set_registry_uri(uri)
                # ... and its client takes the tracking store from the process default (which would create
                # ./mlflow.db in the user's folder): point the default at `uri` for this call only
                before = mlflow.get_tracking_uri()
                mlflow.set_tracking_uri(uri)
                try:
                    return Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, tracking_uri=uri))
                finally:
                    mlflow.set_tracking_uri(before)
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, tracking_uri=uri))
        return Path(mlflow.artifacts.download_artifacts(run_id=spec, artifact_path=artifact_path, tracking_uri=uri))
    except Exception as e:  # noqa: BLE001 - mlflow raises many types
        what = "registered model" if spec.startswith("models:/") else "MLflow run"
        raise CheckpointError(f"{spec!r}: no {what} with a '{artifact_path}/' artifact at {uri} "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})", field="model",
                              hint="pass a run id, models:/NAME@ALIAS, models:/NAME/VERSION or a model folder; "
                                   "set --tracking / MLFLOW_TRACKING_URI to the store that holds it") from e


def resolve(spec: str | os.PathLike, *, kind: str, tracking: str | None = None, artifact_path: str = "model") -> Path:
    """The local folder of a `kind` ('pretrained' or 'finetuned') model named by `spec`."""
    if kind not in _KIND_FILE:
        raise ValueError(f"kind must be one of {sorted(_KIND_FILE)}")
    s = str(spec)
    p = Path(s).expanduser()
    if p.is_dir():
        folder = p
    elif is_model_uri(s) or _RUN_ID.match(s):
        folder = _download(s, tracking, artifact_path)
    else:
        raise CheckpointError(f"{s!r} is neither a model folder nor an MLflow run id / model URI", path=s,
                              field="model", hint="pass a run id, models:/NAME@ALIAS, models:/NAME/VERSION or a "
                                                  f"folder written by `{_COMMAND[kind]}`")
    if (folder / _KIND_FILE[kind]).is_file():
        return folder
    other = next((k for k, f in _KIND_FILE.items() if k != kind and (folder / f).is_file()), None)
    found = f"a {other} model ({_KIND_FILE[other]})" if other else "no scpert model"
    raise CheckpointError(f"{s!r} holds {found}, not a {kind} model", field="model",
                          hint=f"pass a {kind} model: the run id or folder of `{_COMMAND[kind]}`")
