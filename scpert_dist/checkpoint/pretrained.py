"""Pretrained-model checkpoints: safetensors weights + a JSON sidecar with everything that defines the data.

Layout of a checkpoint folder:
  model.safetensors    the PretrainModel state dict (loading never unpickles)
  scpert_model.json    format version, model config (sizes), the tasks its heads serve, gene panel (ids and
                       symbols), cell and drug vocabularies, sha256 of the weights, `extra` (e.g. the full training
                       config, step, metrics). Checkpoints written before the `objective` section kept the tasks
                       (and the mask ratio) inside the model config; they load as they are.
Both files are written atomically (weights first, then the JSON that names their checksum), so a crash leaves
either the previous checkpoint or a JSON/weights pair that fails its checksum with a CheckpointError.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig, check_heads
from ..paths import atomic_write_bytes, ensure_writable_dir, sha256_file

WEIGHTS = "model.safetensors"
META = "scpert_model.json"
FORMAT = "scpert-pretrained/1"


def _unwrap(model):
    """The bare module under DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and not hasattr(model, "encoder"):
            model = model.module
        else:
            return model


def _describe_diff(expected: list[str], found: list[str], limit: int = 5) -> str:
    es, fs = set(expected), set(found)
    missing = [g for g in expected if g not in fs]
    extra = [g for g in found if g not in es]
    parts = [f"expected {len(expected)} genes, found {len(found)}"]
    if missing:
        parts.append(f"{len(missing)} expected genes absent (e.g. {', '.join(missing[:limit])})")
    if extra:
        parts.append(f"{len(extra)} genes not in the expected panel (e.g. {', '.join(extra[:limit])})")
    if not missing and not extra and len(expected) == len(found):
        moved = [i for i, (a, b) in enumerate(zip(expected, found, strict=True)) if a != b]
        parts.append(f"same genes but {len(moved)} at a different position (first at position {moved[0]}: "
                     f"expected {expected[moved[0]]}, found {found[moved[0]]})")
    elif len(set(found)) != len(found):
        parts.append(f"{len(found) - len(set(found))} duplicated genes")
    return "; ".join(parts)


def check_panel(expected_genes, found_genes, where: str) -> None:
    """Raise CheckpointError (naming `where`, with how many genes differ) unless the panels are identical and in
    the same order."""
    expected = [str(g) for g in expected_genes]
    found = [str(g) for g in found_genes]
    if expected == found:
        return
    raise CheckpointError(
        f"gene panel differs: {_describe_diff(expected, found)}", path=where, field="genes",
        hint="use data built on the checkpoint's gene panel (the same manifest 'genes' in the same order), or "
             "start a new model and copy the shared genes with transfer_gene_embeddings")


def save_pretrained(out_dir, model, cfg, *, genes: list[str], gene_symbols: list[str] | None,
                    cells: list[str], drugs: list[str], extra: dict | None = None) -> Path:
    """Write out_dir/model.safetensors + out_dir/scpert_model.json; returns out_dir."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    genes = [str(g) for g in genes]
    if len(genes) != cfg.n_genes:
        raise CheckpointError(f"{len(genes)} genes given for a model with n_genes={cfg.n_genes}", field="genes",
                              hint="pass the manifest's gene list the model was built for")
    if gene_symbols is not None and len(gene_symbols) != len(genes):
        raise CheckpointError(f"{len(gene_symbols)} gene symbols for {len(genes)} genes", field="gene_symbols")
    for name, vocab, n in (("cells", cells, cfg.n_cells), ("drugs", drugs, cfg.n_drugs)):
        if n and len(vocab) != n:
            raise CheckpointError(f"{len(vocab)} {name} given for a model with n_{name}={n}", field=name,
                                  hint=f"pass the {name[:-1]} vocabulary the heads were trained on")
    out = ensure_writable_dir(out_dir)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".{WEIGHTS}.tmp-{os.getpid()}"
    try:
        save_file(state, str(tmp), metadata={"format": FORMAT})
        digest = sha256_file(tmp)
        os.replace(tmp, out / WEIGHTS)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(cfg),
        "tasks": list(getattr(model, "tasks", ("mask",))),
        "genes": genes,
        "gene_symbols": None if gene_symbols is None else [str(s) for s in gene_symbols],
        "cells": [str(c) for c in cells],
        "drugs": [str(d) for d in drugs],
        "weights_sha256": digest,
        "extra": extra or {},
    }
    try:
        data = json.dumps(meta, indent=1, default=str, allow_nan=True).encode()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"'extra' is not JSON-serialisable ({e})", field="extra") from None
    atomic_write_bytes(out / META, data)
    return out


def _resolve(path) -> Path:
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS, META):
        p = p.parent
    if not p.is_dir():
        raise CheckpointError("checkpoint folder not found", path=str(p),
                              hint=f"pass a folder written by save_pretrained (with {WEIGHTS} and {META})")
    return p


def load_pretrained(path, map_location="cpu"):
    """(model, cfg, info) from a checkpoint folder (or either of its files); info has genes, gene_symbols, cells,
    drugs, tasks, extra. The model is returned in eval mode (call .train() to keep training it). Weights are read with safetensors only; a missing/corrupt file or a mismatch raises
    CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..model.heads import PretrainModel

    d = _resolve(path)
    meta_p, w_p = d / META, d / WEIGHTS
    for p in (meta_p, w_p):
        if not p.is_file():
            raise CheckpointError("checkpoint file missing", path=str(p),
                                  hint="the folder must hold both files written by save_pretrained")
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata is not valid JSON ({e})", path=str(meta_p)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"not a scpert checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r})", path=str(meta_p), field="format")
    for key in ("model_config", "genes", "cells", "drugs", "weights_sha256"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata lacks '{key}'", path=str(meta_p), field=key)
    sizes = dict(meta["model_config"])
    tasks = meta.get("tasks") or sizes.get("tasks") or ["mask"]  # earlier checkpoints: the tasks in the config
    sizes.pop("tasks", None)
    sizes.pop("mask_ratio", None)
    try:
        cfg = ModelConfig(**sizes)
        check_heads(cfg, tasks)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"invalid model config in checkpoint ({e})", path=str(meta_p),
                              field="model_config") from None
    if len(meta["genes"]) != cfg.n_genes:
        raise CheckpointError(f"{len(meta['genes'])} genes listed for n_genes={cfg.n_genes}", path=str(meta_p),
                              field="genes")
    if sha256_file(w_p) != meta["weights_sha256"]:
        raise CheckpointError("weights do not match the checksum in the metadata (truncated, corrupt or replaced)",
                              path=str(w_p), hint="re-export the checkpoint")
    try:
        state = load_file(str(w_p), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors weights ({e})", path=str(w_p)) from None
    model = PretrainModel(cfg, tasks)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the saved model config ({str(e).splitlines()[0]})",
                              path=str(w_p)) from None
    model.to(map_location).eval()
    info = {k: meta.get(k) for k in ("genes", "gene_symbols", "cells", "drugs", "extra")} | {"tasks": list(tasks)}
    return model, cfg, info


def transfer_gene_embeddings(src, src_genes: list[str], dst, dst_genes: list[str]) -> int:
    """Copy gene-embedding rows of genes present in both panels (matched by gene id) from encoder `src` to `dst`;
    genes only in `dst` keep their fresh init. Returns how many rows were copied."""
    import torch

    src, dst = _unwrap(src), _unwrap(dst)
    src = getattr(src, "encoder", src)
    dst = getattr(dst, "encoder", dst)
    sw, dw = src.gene_emb.weight, dst.gene_emb.weight
    if len(src_genes) != sw.shape[0]:
        raise CheckpointError(f"{len(src_genes)} source genes for a source embedding of {sw.shape[0]} rows",
                              field="src_genes")
    if len(dst_genes) != dw.shape[0]:
        raise CheckpointError(f"{len(dst_genes)} target genes for a target embedding of {dw.shape[0]} rows",
                              field="dst_genes")
    if sw.shape[1] != dw.shape[1]:
        raise CheckpointError(f"embedding widths differ (source d_model={sw.shape[1]}, target {dw.shape[1]})",
                              field="d_model", hint="build the target model with the source's d_model")
    pos = {str(g): i for i, g in enumerate(src_genes)}
    pairs = [(pos[str(g)], j) for j, g in enumerate(dst_genes) if str(g) in pos]
    if pairs:
        si = torch.tensor([p[0] for p in pairs], device=sw.device)
        di = torch.tensor([p[1] for p in pairs], device=dw.device)
        with torch.no_grad():
            dw[di] = sw[si].to(device=dw.device, dtype=dw.dtype)
    return len(pairs)
