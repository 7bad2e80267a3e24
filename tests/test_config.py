"""The typed configs: each knob defined once and validated once (in its section's __post_init__), a typo in a decoder,
drug representation or mask ratio stops with a named ConfigError BEFORE any data is read (CLI --set, TOML, sweep
YAML), an old-layout key says where it lives now, and typed configs change by `replace_at` without dict round trips."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from scpert_dist.config import field_path, load, params, replace_at, upgrade_layout, with_overrides
from scpert_dist.errors import ConfigError
from scpert_dist.finetune.config import FinetuneConfig
from scpert_dist.registry import DECODERS, DRUG_REPS, PREDICTORS
from scpert_dist.train.settings import PretrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_inputs import run_cli  # noqa: E402

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


@pytest.mark.parametrize("field,value,names", [("model.decoder", "lstn", DECODERS.names),
                                               ("model.drug_rep", "morgn", DRUG_REPS.names)])
def test_cli_typo_stops_before_the_data_is_read(tmp_path, monkeypatch, field, value, names):
    """`scpert finetune --set model.decoder=lstn` on a data file that does not exist: the ConfigError about the typo,
    listing the registered names, not the missing file; nothing written."""
    monkeypatch.chdir(tmp_path)
    code, text = run_cli("finetune", "--data", tmp_path / "not_read.h5ad", "--set", f"{field}={value}",
                         "--out", tmp_path / "m", "--tracking", f"sqlite:///{tmp_path / 'm.db'}")
    assert code == 2 and "error: ConfigError" in text and value in text and f"field: {field}" in text, text
    assert all(n in text for n in names) and "InputFileError" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_toml_typo_and_old_layout_keys_stop_before_the_data_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ft.toml").write_text('[model]\ndecoder = "factr"\n')
    code, text = run_cli("finetune", "--data", tmp_path / "not_read.h5ad", "--config", tmp_path / "ft.toml",
                         "--out", tmp_path / "m", "--tracking", f"sqlite:///{tmp_path / 'm.db'}")
    assert code == 2 and "unknown decoder 'factr'" in text and "InputFileError" not in text, text
    # the layout before the sections: every moved key names its new place
    (tmp_path / "old.toml").write_text("epochs = 2\nbatch = 16\n")
    with pytest.raises(ConfigError, match="batch is now optim.batch_size, epochs is now optim.epochs"):
        load(FinetuneConfig, tmp_path / "old.toml")
    (tmp_path / "pre.toml").write_text("[model]\npreset = 'tiny'\nmask_ratio = 0.8\n")
    code, text = run_cli("pretrain", "--config", tmp_path / "pre.toml", "--shards", tmp_path / "no_shards")
    assert code == 2 and "model.mask_ratio is now objective.mask_ratio" in text and "ShardError" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.toml", "old.toml", "pre.toml"]


@pytest.mark.parametrize("override,field", [("space.decoder=mlp,lstn", "space.decoder"),
                                            ("space.drug_rep=morgan,morgn", "space.drug_rep"),
                                            ("space.mask_ratio=0.15,1.5", "space.mask_ratio"),
                                            ("finetune.model.decoder=cnn", "model.decoder")])
def test_sweep_yaml_typo_stops_before_any_data_is_made(tmp_path, monkeypatch, override, field):
    """A typo in the sweep's search space or its base configs: `scpert sweep` stops with the ConfigError naming the
    sweep file and the field, before it simulates, ingests or tracks anything."""
    monkeypatch.chdir(tmp_path)
    code, text = run_cli("sweep", "--config", SWEEPS / "tiny.yaml", "--set", override, "--set", f"out={tmp_path / 'o'}",
                         "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert code == 2 and "error: ConfigError" in text and f"field: {field}" in text and "tiny.yaml" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_replace_at_changes_sections_together_and_validates_them():
    """replace_at builds each touched section once with all of its changes: fields checked together (drug_rep=lincs
    needs a pretraining and shards) may change together; an unknown or moved key is the named error."""
    base = FinetuneConfig()
    cfg = replace_at(base, {"model.drug_rep": "lincs", "model.pretrained": "run1", "data.lincs_shards": "s",
                            "optim.epochs": "5"})
    assert (cfg.model.drug_rep, cfg.optim.epochs, cfg.data.lincs_shards) == ("lincs", 5, "s")
    assert base.model.drug_rep == "morgan"  # the base is not changed
    with pytest.raises(ConfigError, match="model.pretrained"):
        replace_at(base, {"model.drug_rep": "lincs", "data.lincs_shards": "s"})
    with pytest.raises(ConfigError, match="unknown config key.*optim.epoch\\b"):
        replace_at(base, {"optim.epoch": 5})
    with pytest.raises(ConfigError, match="lr is now optim.lr"):
        replace_at(base, {"lr": 0.1})
    # keyword use: a field name one section has
    assert field_path(FinetuneConfig, "epochs") == "optim.epochs"
    assert with_overrides(base, {"decoder": "gru", "split": "s"}).model.decoder == "gru"
    with pytest.raises(ConfigError, match="batch is now optim.batch_size"):
        with_overrides(base, {"batch": 8})


def test_each_knob_is_one_field_of_one_section():
    """mask ratio, task set and gene sampling are the pretraining objective's; the model section holds sizes only;
    the decoder and drug representation are the finetune model section's (names from their registries)."""
    def paths(cfg):
        return set(params(cfg))

    pre, ft = paths(PretrainConfig()), paths(FinetuneConfig())
    for knob in ("mask_ratio", "tasks", "gene_sample"):
        assert [p for p in pre if p.split(".")[-1] == knob] == [f"objective.{knob}"]
    from scpert_dist.model.config import ModelSpec

    assert [f.name for f in dataclasses.fields(ModelSpec)] == ["preset", "overrides"]  # sizes only
    for knob in ("decoder", "drug_rep"):
        assert [p for p in ft if p.split(".")[-1] == knob] == [f"model.{knob}"]
    assert len({p.split(".")[-1] for p in ft}) == len(ft)  # every finetune field name is unique (keyword use)
    assert PREDICTORS.names[:3] == ("null", "control", "mean_drug")


def test_saved_config_of_the_flat_layout_is_upgraded():
    """A finetuned model saved before the sections keeps loading: its flat config keys move to their sections."""
    old = {"data": "d.h5ad", "split": "split_x", "pretrained": "none", "lincs_shards": "", "lr": 0.01, "epochs": 4,
           "batch": 16, "tracking": "sqlite:///x.db", "experiment": "e", "out": "o",
           "model": {"decoder": "gru", "drug_rep": "morgan"}}
    from scpert_dist.config import from_dict

    cfg = from_dict(FinetuneConfig, upgrade_layout(FinetuneConfig, old))
    assert (cfg.data.path, cfg.data.split, cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (
        "d.h5ad", "split_x", 0.01, 4, 16)
    assert (cfg.tracking.uri, cfg.tracking.experiment, cfg.model.decoder) == ("sqlite:///x.db", "e", "gru")
    assert dataclasses.asdict(cfg)["model"]["decoder"] == "gru"


def test_configs_validate_without_importing_torch():
    """The registries hold names (components load on use), so building and checking every stage's config (a typo
    included) imports no torch: a bad `--set` stops before anything heavy is loaded."""
    import subprocess

    code = ("import sys\n"
            "from scpert_dist.config import PACKAGED, load\n"
            "from scpert_dist.errors import ConfigError\n"
            "from scpert_dist.finetune.config import FinetuneConfig\n"
            "from scpert_dist.train.settings import PretrainConfig\n"
            "from scpert_dist.tune import load_sweep\n"
            f"load_sweep({str(SWEEPS / 'paper.yaml')!r})\n"
            "load(PretrainConfig, PACKAGED / 'pretrain_base.toml')\n"
            "try:\n    load(FinetuneConfig, None, ['model.decoder=lstn'])\nexcept ConfigError:\n    pass\n"
            "print('torch' in sys.modules, 'ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"], out.stdout
