"""Safetensors checkpoints: round trip, metadata checks, corrupt/missing files, no unpickling, panel mismatch,
gene-embedding transfer."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from scpert_dist.checkpoint import (
    META,
    WEIGHTS,
    check_panel,
    load_pretrained,
    save_pretrained,
    transfer_gene_embeddings,
)
from scpert_dist.errors import CheckpointError
from scpert_dist.model import GeneTokenEncoder, PretrainModel, model_config, random_mask

GENES = [str(1000 + i) for i in range(20)]
SYMS = [f"G{i}" for i in range(20)]
CELLS = ["A375", "A549", "MCF7", "PC3"]
DRUGS = ["vemurafenib", "atorvastatin", "venlafaxine"]


def _model(**kw):
    torch.manual_seed(0)
    cfg = model_config("tiny", n_genes=20, n_cells=4, n_drugs=3, dropout=0.1, **kw)
    m = PretrainModel(cfg, "mask+cell+drug+dose")
    # move every weight away from its init so a load that silently re-initialises would be caught
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m, cfg


def _save(tmp_path, m, cfg, **kw):
    args = dict(genes=GENES, gene_symbols=SYMS, cells=CELLS, drugs=DRUGS,
                extra={"train": {"lr": 1e-3, "steps": 7}, "step": 7})
    args.update(kw)
    return save_pretrained(tmp_path / "ck", m, cfg, **args)


def test_round_trip_equal_outputs(tmp_path):
    m, cfg = _model()
    out_dir = _save(tmp_path, m, cfg)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([WEIGHTS, META])
    m2, cfg2, info = load_pretrained(out_dir)
    assert cfg2 == cfg
    assert info == {"genes": GENES, "gene_symbols": SYMS, "cells": CELLS, "drugs": DRUGS,
                    "tasks": ["mask", "cell", "drug", "dose"], "extra": {"train": {"lr": 1e-3, "steps": 7}, "step": 7}}
    assert m2.tasks == m.tasks
    assert not m2.training  # returned in eval mode, like other from_pretrained loaders
    m.eval()
    x = torch.randn(5, 20)
    mk = random_mask(5, 20, 0.3, torch.Generator().manual_seed(0))
    a, b = m(x, mk), m2(x, mk)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # either file path also locates the checkpoint
    m3, _, _ = load_pretrained(out_dir / META)
    assert torch.equal(m3(x, mk)["mask_pred"].detach(), a["mask_pred"].detach())


def test_checkpoint_of_the_earlier_layout_loads(tmp_path):
    """A checkpoint written before the objective section (tasks and mask ratio inside model_config, no 'tasks') loads
    with the heads it was trained with."""
    import json

    m, cfg = _model()
    out_dir = _save(tmp_path, m, cfg)
    meta = json.loads((out_dir / META).read_text())
    meta["model_config"].update(tasks=meta.pop("tasks"), mask_ratio=0.15)
    (out_dir / META).write_text(json.dumps(meta))
    m2, cfg2, info = load_pretrained(out_dir)
    assert cfg2 == cfg and m2.tasks == ("mask", "cell", "drug", "dose") and info["tasks"] == list(m2.tasks)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_save_unwraps_compiled_or_wrapped_models(tmp_path):
    m, cfg = _model()

    class Wrapper(torch.nn.Module):  # the shape of DDP / DeepSpeed engines: the model is `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    _save(tmp_path, Wrapper(m), cfg)
    m2, _, _ = load_pretrained(tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True))


def test_bad_save_arguments_leave_nothing(tmp_path):
    m, cfg = _model()
    with pytest.raises(CheckpointError, match="19 genes"):
        _save(tmp_path, m, cfg, genes=GENES[:19])
    with pytest.raises(CheckpointError, match="cells"):
        _save(tmp_path, m, cfg, cells=CELLS[:3])
    with pytest.raises(CheckpointError, match="gene symbols"):
        _save(tmp_path, m, cfg, gene_symbols=SYMS[:2])
    assert not (tmp_path / "ck").exists()


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope")
    m, cfg = _model()
    d = _save(tmp_path, m, cfg)
    good_meta = (d / META).read_text()
    good_w = (d / WEIGHTS).read_bytes()

    (d / WEIGHTS).write_bytes(good_w[: len(good_w) // 2])  # truncated
    with pytest.raises(CheckpointError, match="checksum") as e:
        load_pretrained(d)
    assert str(d / WEIGHTS) in str(e.value)
    (d / WEIGHTS).write_bytes(good_w)

    (d / META).write_text(good_meta[:-20])
    with pytest.raises(CheckpointError, match="JSON") as e:
        load_pretrained(d)
    assert str(d / META) in str(e.value)

    meta = json.loads(good_meta)
    meta["model_config"]["d_model"] = 64  # config no longer fits the weights
    (d / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_pretrained(d)

    meta = json.loads(good_meta)
    meta["genes"] = meta["genes"][:-1]
    (d / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="19 genes"):
        load_pretrained(d)

    (d / META).write_text(good_meta)
    (d / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(d)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_load_never_unpickles(tmp_path):
    """A pickle placed as the weights file (checksum updated to match) is rejected, never executed."""
    from scpert_dist.paths import sha256_file

    m, cfg = _model()
    d = _save(tmp_path, m, cfg)
    (d / WEIGHTS).write_bytes(pickle.dumps({"x": _Boom()}))
    meta = json.loads((d / META).read_text())
    meta["weights_sha256"] = sha256_file(d / WEIGHTS)
    (d / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(d)


def test_check_panel_messages():
    check_panel(GENES, list(GENES), "data manifest")  # identical: no error
    other = GENES[:17] + ["x1", "x2", "x3"]
    with pytest.raises(CheckpointError) as e:
        check_panel(GENES, other, "shards/manifest.json")
    msg = str(e.value)
    assert "3 expected genes absent" in msg and "3 genes not in the expected panel" in msg
    assert "shards/manifest.json" in msg and "genes" in msg
    swapped = list(GENES)
    swapped[2], swapped[5] = swapped[5], swapped[2]
    with pytest.raises(CheckpointError, match="2 at a different position"):
        check_panel(GENES, swapped, "h5ad var")
    with pytest.raises(CheckpointError, match="expected 20 genes, found 10"):
        check_panel(GENES, GENES[:10], "x")


def test_transfer_gene_embeddings_copies_exactly_shared_genes():
    torch.manual_seed(0)
    src = GeneTokenEncoder(model_config("tiny", n_genes=20))
    dst_genes = ["9999", GENES[3], "8888", GENES[0], GENES[19], "7777"]
    dst = GeneTokenEncoder(model_config("tiny", n_genes=len(dst_genes)))
    before = dst.gene_emb.weight.detach().clone()
    n = transfer_gene_embeddings(src, GENES, dst, dst_genes)
    assert n == 3
    w = dst.gene_emb.weight.detach()
    for j, g in enumerate(dst_genes):
        if g in GENES:
            assert torch.equal(w[j], src.gene_emb.weight[GENES.index(g)].detach()), g
        else:
            assert torch.equal(w[j], before[j]), g
    # other parameters are untouched; the src is unchanged by later training of dst
    w.add_(1.0)
    assert not torch.equal(src.gene_emb.weight[3], w[1])
    # a PretrainModel is accepted too; mismatched widths are a named error
    pm = PretrainModel(model_config("tiny", n_genes=20))
    assert transfer_gene_embeddings(pm, GENES, dst, dst_genes) == 3
    wide = GeneTokenEncoder(model_config("tiny", n_genes=6, d_model=64))
    with pytest.raises(CheckpointError, match="widths differ"):
        transfer_gene_embeddings(src, GENES, wide, dst_genes)
    with pytest.raises(CheckpointError, match="source genes"):
        transfer_gene_embeddings(src, GENES[:5], dst, dst_genes)
