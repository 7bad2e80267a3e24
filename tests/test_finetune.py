"""Finetune model, loop, prediction and CLI on a small realistic AnnData (tests/ft_fixture.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ft_fixture import ft_config, make_adata  # noqa: E402

from scpert_dist.finetune.config import FinetuneConfig, FinetuneModelConfig  # noqa: E402
from scpert_dist.finetune.decoders import Decoder, SequenceDecoder  # noqa: E402
from scpert_dist.finetune.model import DoseEncoder, FinetuneModel  # noqa: E402
from scpert_dist.registry import DECODERS  # noqa: E402


def _tiny_model(decoder="lstm", G=40, block=8, rep="morgan"):
    from scpert_dist.model.config import model_config
    from scpert_dist.model.encoder import GeneTokenEncoder

    enc = GeneTokenEncoder(model_config("tiny", n_genes=G))
    return FinetuneModel(enc, n_genes=G, n_cells=2, decoder=decoder, gene_block=block, drug_rep=rep,
                         n_drugs=3, drug_feat_dim=16)


def test_every_registered_decoder_is_a_decoder_class_named_as_registered():
    """The registry is the one list of decoder names; each name loads a Decoder class that carries it."""
    assert DECODERS.names == ("factor", "lstm", "gru", "mlp", "transformer")
    for name in DECODERS:
        assert issubclass(DECODERS[name], Decoder) and DECODERS[name].name == name


@pytest.mark.parametrize("kind", ["lstm", "gru", "transformer"])
def test_sequential_decoders_run_over_gene_blocks(kind):
    dec = DECODERS[kind](8, 978, 16)
    h = torch.randn(3, 978, 8, requires_grad=True)
    x = dec.read(h)
    assert x.shape == (3, 62, 8)  # ceil(978 / 16) real steps, not a length-1 sequence
    y = dec(x, None, torch.zeros(3, 978))
    assert y.shape == (3, 978)
    # a recurrent/attention decoder mixes blocks: changing the first block changes outputs of the last block
    y[:, -16:].sum().backward()
    assert h.grad[:, :16].abs().sum() > 0


@pytest.mark.parametrize("kind", ["lstm", "gru", "transformer", "mlp"])
def test_condition_projection_equals_adding_the_condition_to_every_gene_token(kind):
    """change(read(h), c) (the condition's block projection added once per step, no [B, G, d] sum materialised)
    equals the plain definition change(read(h + c on every gene token)), for a panel that does not fill its last
    block; the padded states (`states`) give the same output."""
    torch.manual_seed(0)
    dec = DECODERS[kind](8, 45, 16)
    for prm in dec.parameters():
        torch.nn.init.normal_(prm, std=0.3)
    h, c = torch.randn(5, 45, 8), torch.randn(5, 8)
    ref = dec.change(dec.read(h + c.unsqueeze(1)), None)
    torch.testing.assert_close(dec.change(dec.read(h), c), ref, rtol=1e-4, atol=1e-5)
    tokens = torch.cat([torch.randn(5, 1, 8), h], 1)  # [CLS] + gene tokens, as the encoder returns them
    torch.testing.assert_close(dec.change(dec.read(dec.states(tokens)), c), ref, rtol=1e-4, atol=1e-5)
    assert isinstance(dec, SequenceDecoder) == (kind != "mlp")


def test_mlp_decoder_is_per_gene():
    dec = DECODERS["mlp"](8, 40, 16)
    h = torch.randn(2, 40, 8, requires_grad=True)
    dec.change(dec.read(h), None)[:, -1].sum().backward()
    assert h.grad[:, :-1].abs().sum() == 0


def test_dose_keeps_top_dose_and_control_distinct():
    torch.manual_seed(0)
    m = _tiny_model().eval()
    ctrl = torch.rand(4, 40) * 3
    feat = torch.rand(4, 16).round()
    cell = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        top = m(ctrl, feat, cell, torch.full((4,), 10.0))
        nxt = m(ctrl, feat, cell, torch.full((4,), 1.0))
        ctl = m(ctrl, feat, cell, torch.zeros(4))
    assert (top - nxt).abs().max() > 1e-4
    assert (top - ctl).abs().max() > 1e-4
    d = DoseEncoder(8)
    assert not torch.allclose(d(torch.tensor([10.0])), torch.zeros(8))  # top dose not erased (paper code: log(1)=0)


def test_gene_embedding_transfer_counts(tmp_path):
    from scpert_dist.checkpoint import save_pretrained
    from scpert_dist.finetune.build import build_model
    from scpert_dist.model.config import model_config
    from scpert_dist.model.heads import PretrainModel

    src_genes = [str(1000 + i) for i in range(30)] + [f"x{i}" for i in range(10)]
    pcfg = model_config("tiny", n_genes=40)
    pre = PretrainModel(pcfg)
    save_pretrained(tmp_path / "pre", pre, pcfg, genes=src_genes, gene_symbols=None, cells=["A549"], drugs=["d"])
    dst_genes = [str(1000 + i) for i in range(40)]  # 30 shared, 10 new
    cfg = ft_config(pretrained=str(tmp_path / "pre"))
    m, n, _ = build_model(cfg, dst_genes, ["A549"], ["d"], 16, tmp_path / "pre")
    assert n == 30
    w = pre.encoder.gene_emb.weight
    assert torch.equal(m.encoder.gene_emb.weight[:30], w[:30])
    assert not torch.equal(m.encoder.gene_emb.weight[30:], w[30:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    a, names = make_adata(seed=0)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = ft_config(split="split_test", epochs=2, steps_per_epoch=8, batch_size=32, lr=3e-3, cond_steps=150, threads=1, uri=uri,
                         out=str(tmp / "model"), model=FinetuneModelConfig(decoder="lstm", gene_block=8))
    from scpert_dist.finetune.train import run_finetune

    return run_finetune(cfg, a), a, names, uri, tmp


def test_finetune_beats_control_on_heldout_drugs(trained):
    from scpert_dist.finetune.build import load_finetuned
    from scpert_dist.finetune.data import Prepared, condition_groups
    from scpert_dist.finetune.validate import logfc_pearson_groups
    from scpert_dist.stats import logfc_pearson

    r, a, names, _, _ = trained
    prep = Prepared(a, "split_test", "morgan")
    test_rows = np.flatnonzero((~prep.ctl) & (prep.split == "test"))
    assert set(prep.drug[test_rows]) == set(names[-2:])
    model, _ = load_finetuned(r.model_dir)
    ours = logfc_pearson_groups(model, prep, test_rows, np.random.default_rng(5))

    # the 'control' baseline: each condition predicted by 64 of its line's control cells, unchanged (drawn the same
    # way), scored by the same logFC r
    rng, cm = np.random.default_rng(5), prep.control_means()
    groups = condition_groups(prep, test_rows)
    picks = {k: rng.integers(0, len(prep.ctl_by_line[k[1]]), size=64) for k in groups}
    base = np.mean([logfc_pearson(prep.X[g].mean(0), prep.X[prep.ctl_by_line[k[1]][picks[k]]].mean(0), cm[k[1]])
                    for k, g in groups.items()])
    assert ours > base + 0.1, (ours, base)


def test_validation_uses_valid_drugs_only(trained):
    r, a, names, _, _ = trained
    from scpert_dist.finetune.data import Prepared

    prep = Prepared(a, "split_test", "morgan")
    assert set(prep.drug[prep.valid_rows]) == set(names[-4:-2])
    assert not set(prep.drug[prep.valid_rows]) & set(names[-2:])
    assert np.isfinite(r.val_metrics["val_logfc_pearson"])


def test_mlflow_run_has_params_metrics_model(trained):
    import mlflow

    r, _, _, uri, _ = trained
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(r.run_id)
    assert run.data.params["model.decoder"] == "lstm"
    # the typed config it ran, flattened by the one function every stage logs with
    from scpert_dist.config import params
    from scpert_dist.finetune.build import load_finetuned

    _, meta = load_finetuned(r.model_dir)
    assert params(FinetuneConfig()).keys() <= run.data.params.keys()
    assert run.data.params["optim.epochs"] == "2" and run.data.params["optim.batch_size"] == "32"
    assert meta["init"]["decoder"] == "lstm" and meta["init"]["gene_block"] == 8  # rebuilt from these on load
    assert "val_logfc_pearson" in run.data.metrics and "epoch_s" in run.data.metrics
    arts = {f.path for f in mlflow.MlflowClient(uri).list_artifacts(r.run_id, "model")}
    assert {"model/model.safetensors", "model/scpert_finetune.json"} <= arts


def test_predict_cli_writes_h5ad(trained):
    import anndata as ad
    from typer.testing import CliRunner

    from scpert_dist.cli import app

    r, a, names, uri, tmp = trained
    a.write_h5ad(tmp / "data.h5ad")
    res = CliRunner().invoke(app, ["predict", "--model", r.run_id, "--tracking", uri, "--data", str(tmp / "data.h5ad"),
                                   "--drug", names[-1], "--cell-line", "A549", "--dose", "1.0", "--n-cells", "25",
                                   "--out", str(tmp / "pred.h5ad")])
    assert res.exit_code == 0, res.output
    p = ad.read_h5ad(tmp / "pred.h5ad")
    assert p.shape == (25, 40) and list(p.var_names) == list(a.var_names)
    assert (p.obs["drug"] == names[-1]).all() and (p.obs["dose_um"] == 1.0).all()
    assert (p.obs["cell_line"] == "A549").all()
    assert p.X.std(0).mean() > 0  # per-cell heterogeneity kept


def test_learned_rep_unseen_drug_warns_and_raises(tmp_path):
    from scpert_dist.errors import SmilesError
    from scpert_dist.finetune.predict import drug_tensor

    meta = {"drug_rep": "learned", "drugs": ["a", "b"], "smiles": {}}
    assert drug_tensor(meta, "b", None, 3).tolist() == [1, 1, 1]
    with pytest.warns(UserWarning, match="untrained vector"), pytest.raises(SmilesError, match="morgan"):
        drug_tensor(meta, "unseen", None, 3)


def test_learned_rep_warns_at_training_about_unseen_drugs(tmp_path):
    from scpert_dist.finetune.train import run_finetune

    a, names = make_adata(n_drugs=6, cells_per=6)
    cfg = ft_config(split="split_test", epochs=1, steps_per_epoch=2, batch_size=8, out=str(tmp_path / "m"),
                         model=FinetuneModelConfig(decoder="mlp", drug_rep="learned"))
    with pytest.warns(UserWarning, match="untrained vector"):
        r = run_finetune(cfg, a, log_mlflow=False)
    assert (r.model_dir / "model.safetensors").is_file()


def test_rdkit_drug_features_and_bad_smiles():
    from ft_fixture import real_smiles

    from scpert_dist.errors import SmilesError
    from scpert_dist.finetune.drugrep import features
    from scpert_dist.finetune.predict import drug_tensor

    (_, s1), (_, s2) = real_smiles(2)
    for rep in ("morgan", "descriptors"):
        f = features(rep, [s1, "", s2])
        assert np.isfinite(f).all()
        assert not f[1].any() and f[0].any() and not np.array_equal(f[0], f[2])
    meta = {"drug_rep": "morgan", "drugs": [], "smiles": {}}
    assert drug_tensor(meta, None, s1, 2).shape == (2, 1024)  # any SMILES works with morgan
    with pytest.raises(SmilesError):
        features("morgan", ["not_a_smiles(("])


def test_shift_head_starts_from_gene_embeddings_and_is_zero_for_vehicle():
    torch.manual_seed(0)
    m = _tiny_model()
    V, E = m.shift.V.detach(), m.encoder.gene_emb.weight.detach()
    cos = torch.nn.functional.cosine_similarity(V, E, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # same directions: pretrained gene geometry kept
    de = torch.randn(3, V.shape[1])
    s = m.shift(de, torch.zeros(3, dtype=torch.long), torch.tensor([0.0, 1.0, 10.0]))
    assert s[0].abs().max() == 0 and s[2].abs().max() > s[1].abs().max() > 0  # vehicle 0; gate rises with dose


def test_frozen_encoder_cache_matches_full_forward_and_encoder_is_not_trained(trained):
    from scpert_dist.finetune.build import build_model, load_finetuned
    from scpert_dist.finetune.data import ControlPool, Prepared

    r, a, _, _, _ = trained
    model, meta = load_finetuned(r.model_dir)
    prep = Prepared(a, "split_test", "morgan")
    pool = ControlPool.drawn(model, prep, 16, np.random.default_rng(0))
    assert len(pool.all_rows) == 32 and prep.ctl[pool.all_rows].all()
    pi = pool.sample("MCF7", 5, np.random.default_rng(1))
    assert set(prep.cell[pool.all_rows[pi]]) == {"MCF7"}
    ctrl, drug = torch.from_numpy(pool.X[pi]), prep.drug_input([prep.drugs[0]] * 5)
    cell, dose = torch.full((5,), prep.cells.index("MCF7")), torch.full((5,), 1.0)
    with torch.no_grad():
        assert torch.allclose(model.head(pool.h[torch.from_numpy(pi)], ctrl, drug, cell, dose),
                              model(ctrl, drug, cell, dose), atol=1e-5)
    # freeze_encoder (default): the trained encoder equals a fresh one built with the same seed
    torch.manual_seed(0)
    fresh, _, _ = build_model(FinetuneConfig(), prep.genes, prep.cells, prep.drugs, prep.feat_dim, None)
    for (k, v), (_, w) in zip(model.encoder.state_dict().items(), fresh.encoder.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_lincs_drug_rep_encodes_each_drugs_lincs_signature_and_predicts(tmp_path):
    """drug_rep='lincs' on the simulator's paired bulk + single-cell data: every drug with a LINCS signature in the
    shards gets the pretrained encoder's vector of that signature; a drug LINCS did not measure gets the vector a
    structure map (Morgan -> encoded signature, fit over the LINCS compounds) predicts, and is listed as imputed; the
    model finetunes, and `predict` works for a held-out drug LINCS measured and refuses a drug the model has no vector
    for. Without shards or a pretrained encoder it is a named ConfigError."""
    import json

    import anndata as ad
    from conftest import SHARED
    from shards_fixture import simulated_shards

    from scpert_dist.api import predict_h5ad
    from scpert_dist.checkpoint import save_pretrained
    from scpert_dist.checkpoint.finetuned import META_FILE
    from scpert_dist.data.readers.sciplex import prepare_sciplex
    from scpert_dist.data.shards.signatures import LincsSignatures
    from scpert_dist.errors import ConfigError, SmilesError
    from scpert_dist.finetune.data import Prepared
    from scpert_dist.finetune.train import run_finetune
    from scpert_dist.model.config import model_config
    from scpert_dist.model.heads import PretrainModel

    shards = simulated_shards(tmp_path / "d", metadata=SHARED)
    man = json.loads((shards / "manifest.json").read_text())
    torch.manual_seed(0)
    pre = save_pretrained(tmp_path / "pre", PretrainModel(model_config("tiny", n_genes=man["n_genes"])),
                          model_config("tiny", n_genes=man["n_genes"]), genes=man["genes"], gene_symbols=None,
                          cells=man["cells"], drugs=man["drugs"])
    h5 = tmp_path / "sc.h5ad"
    prepare_sciplex(tmp_path / "d" / "sim" / "sciplex" / "sciplex3_sim.h5ad", h5, split="chemcpa_ood",
                    metadata=SHARED, manifest=shards / "manifest.json")
    a = ad.read_h5ad(h5)
    sigs = LincsSignatures.from_shards(shards, man["genes"])
    p0 = Prepared(a, "split_chemcpa_ood", "morgan")
    tests = sorted(set(p0.drug[(~p0.ctl) & (p0.split == "test")]))
    if all(sigs._key(d) or sigs._key(p0.smiles.get(d, "")) for d in tests):
        # the synthetic-metadata fallback gives every simulated drug a LINCS signature; make one test drug one that
        # LINCS did not measure (a new name and a structure absent from the compound table)
        t0 = tests[0]
        obs = a.obs.copy()
        hit = (obs["drug"].astype(str) == t0).to_numpy()
        obs["drug"] = obs["drug"].astype(str).where(~hit, "unmeasured-by-lincs")
        obs["smiles"] = obs["smiles"].astype(str).where(~hit, "OCCCCCCCCCCCCCCCCCCCCCCO")
        a.obs = obs
        a.write_h5ad(h5)
    cfg = ft_config(split="split_chemcpa_ood", epochs=1, steps_per_epoch=3, batch_size=32, cond_steps=20, threads=1,
                         lincs_shards=str(shards), uri=f"sqlite:///{tmp_path / 'm.db'}", out=str(tmp_path / "model"),
                         model=FinetuneModelConfig(pretrained=str(pre), decoder="mlp", drug_rep="lincs",
                                                   control_pool=16))
    r = run_finetune(cfg, a)
    meta = json.loads((r.model_dir / META_FILE).read_text())
    table = meta["lincs_feat"]
    prep = Prepared(a, "split_chemcpa_ood", "morgan")
    drugs = sorted(set(prep.drug[~prep.ctl]))
    measured = {d for d in drugs if sigs._key(d) or sigs._key(prep.smiles.get(d, ""))}
    imputed = set(meta["lincs_imputed"])
    assert 0 < len(measured) < len(drugs) and imputed == set(drugs) - measured and set(table) == set(drugs)
    assert all(len(v) == 2 * 32 for v in table.values())  # [CLS] || mean token state of the tiny encoder
    assert len({tuple(np.round(v, 5)) for v in table.values()}) == len(table)  # different drugs, different vectors
    assert all(np.abs(table[d]).sum() > 0 for d in imputed)
    test_drugs = sorted(set(prep.drug[(~prep.ctl) & (prep.split == "test")]))
    have = [d for d in test_drugs if d in measured]
    lacks = ["a-drug-this-model-never-saw"]
    assert have and set(test_drugs) & imputed
    line = str(a.obs["cell_line"].iloc[0])
    out = predict_h5ad(r.model_dir, h5, tmp_path / "p.h5ad", drug=have[0], cell_line=line, dose_um=1.0, n_cells=6)
    assert ad.read_h5ad(out).n_obs == 6
    with pytest.raises(SmilesError, match="no LINCS signature"):
        predict_h5ad(r.model_dir, h5, tmp_path / "q.h5ad", drug=lacks[0], cell_line=line, dose_um=1.0, n_cells=6)
    assert not (tmp_path / "q.h5ad").exists()
    # in an evaluation (benchmark) such a drug gets the zero vector it had in training, counted as a fallback
    from scpert_dist.evaluate.predictor import Condition
    from scpert_dist.finetune.predict import FinetunedPredictor

    pr = FinetunedPredictor.load(r.model_dir, name="scpert_lincs")
    ctl = a[(a.obs["is_control"].to_numpy(bool)) & (a.obs["cell_line"].astype(str) == line).to_numpy()]
    rng = np.random.default_rng(0)
    with_sig = pr.predict(ctl, Condition(have[0], "", line, 1.0), 5, rng)
    assert with_sig.shape == (5, a.n_vars) and pr.n_fallback is None
    without = pr.predict(ctl, Condition(lacks[0], "", line, 1.0), 5, rng)
    assert without.shape == (5, a.n_vars) and pr.n_fallback == 1
    # a saved lincs model scores on test drugs without its pretraining (the sweep's test metrics of the best trial)
    from scpert_dist.tune import test_metrics

    a.write_h5ad(tmp_path / "scored.h5ad")
    tm = test_metrics(r.model_dir, str(tmp_path / "scored.h5ad"), cfg.data.split)
    assert tm["test_conditions"] > 0 and np.isfinite(tm["test_logfc_pearson"])
    from scpert_dist.config import with_overrides

    for bad in ({"data.lincs_shards": ""}, {"model.pretrained": "none"}):  # refused by the config itself
        with pytest.raises(ConfigError, match=next(iter(bad))):
            with_overrides(cfg, bad)
