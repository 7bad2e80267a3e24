"""Building the finetune model: for training, from the config (+ the pretrained encoder it names); for prediction,
from a saved model's init parameters (`FinetuneModel.init_params`: the decoder's and the drug representation's
registered names and the shapes) and its encoder's ModelConfig, as scvi-tools rebuilds a module from its saved init
parameters. Models saved before the init parameters were recorded are rebuilt from their config's model section."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..checkpoint import load_pretrained, transfer_gene_embeddings
from ..checkpoint.finetuned import read_finetuned
from ..checkpoint.resolve import resolve
from ..config import from_dict, upgrade_layout
from ..errors import CheckpointError
from ..model.config import ModelConfig, model_config
from ..model.encoder import GeneTokenEncoder
from .config import FinetuneConfig
from .model import FinetuneModel


def resolve_pretrained(spec: str, tracking: str | None = None) -> Path | None:
    """'none'/'scratch' -> None; else the folder of the pretrained model named by a folder, run id or model URI."""
    if not spec or spec.lower() in ("none", "scratch"):
        return None
    return resolve(spec, kind="pretrained", tracking=tracking)


def build_model(cfg: FinetuneConfig, genes: list[str], cells: list[str], drugs: list[str], feat_dim: int,
                src: Path | None) -> tuple[FinetuneModel, int, dict]:
    """(FinetuneModel, n genes transferred from the pretrained encoder, encoder ModelConfig dict) for training;
    `src`: the pretrained checkpoint folder (`resolve_pretrained(cfg.model.pretrained)`) or None = scratch."""
    n_tr = 0
    if src is None:
        mcfg = model_config(cfg.model.preset, n_genes=len(genes))
        enc = GeneTokenEncoder(mcfg)
    else:
        pre, pcfg, info = load_pretrained(src)
        mcfg = dataclasses.replace(pcfg, n_genes=len(genes), n_cells=0, n_drugs=0)
        enc = GeneTokenEncoder(mcfg)
        enc.load_state_dict({k: v for k, v in pre.encoder.state_dict().items() if not k.startswith("gene_emb")},
                            strict=False)
        n_tr = transfer_gene_embeddings(pre.encoder, info["genes"], enc, genes)
        print(f"pretrained encoder from {src}: {n_tr}/{len(genes)} gene embeddings transferred, "
              f"{len(genes) - n_tr} new genes initialised fresh")
    m = cfg.model
    model = FinetuneModel(enc, n_genes=len(genes), n_cells=len(cells), decoder=m.decoder, gene_block=m.gene_block,
                          drug_rep=m.drug_rep, n_drugs=len(drugs), drug_feat_dim=feat_dim, cond_hidden=m.cond_hidden,
                          shift_head=m.shift_head)
    return model, n_tr, dataclasses.asdict(mcfg)


def saved_init(meta: dict) -> dict:
    """A saved model's FinetuneModel init parameters; for a model saved before they were recorded, the same from its
    config's model section (models of that time without a `shift_head` entry had no shift head)."""
    if "init" in meta:
        return dict(meta["init"])
    m = meta["config"]["model"]
    return {"n_genes": len(meta["genes"]), "n_cells": len(meta["cells"]), "decoder": m["decoder"],
            "gene_block": m["gene_block"], "drug_rep": meta["drug_rep"], "n_drugs": len(meta["drugs"]),
            "drug_feat_dim": meta["feat_dim"], "cond_hidden": m.get("cond_hidden", 64),
            "shift_head": m.get("shift_head", False)}


def saved_config(meta: dict) -> FinetuneConfig:
    """The FinetuneConfig a saved model was trained with (a model saved before the config had sections: its flat
    keys moved to their sections)."""
    return from_dict(FinetuneConfig, upgrade_layout(FinetuneConfig, meta["config"]))


def load_finetuned(spec, tracking: str | None = None) -> tuple[FinetuneModel, dict]:
    """(FinetuneModel in eval mode, meta) from a folder, run id, models:/name@alias or models:/name/version."""
    state, meta = read_finetuned(spec, tracking)
    m = FinetuneModel(GeneTokenEncoder(ModelConfig(**meta["encoder"])), **saved_init(meta))
    try:
        m.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the saved config ({str(e).splitlines()[0]})",
                              path=meta["dir"]) from None
    return m.eval(), meta
