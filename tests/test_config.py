"""Config dataclasses: JSON round trip, overrides, early errors that say what to change."""

import json
import math

import pytest

from ditkit.config import Config, ConfigError, apply_overrides, load_config, parse_set_option, save_config
from ditkit.recipes import RECIPES, get_recipe
from ditkit.builders import model_kwargs
from ditkit.train.loop import lr_at, preflight


def _custom_config() -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.qk_norm, cfg.model.mlp_ratio = "DiT-T/2", True, 2.5
    cfg.objective.kind, cfg.objective.learn_sigma, cfg.objective.time_sampling = "flow", False, "logit_normal"
    cfg.data.dataset, cfg.data.num_classes, cfg.data.channels = "shapes", 0, 3
    cfg.train.betas, cfg.train.max_steps, cfg.train.lr = (0.8, 0.95), 123, 3e-4
    cfg.run.run_name = "x"
    cfg.sample.guide_channels = 2
    cfg.recipe = "custom"
    return cfg


def test_json_round_trip_keeps_every_value(tmp_path):
    cfg = _custom_config()
    save_config(cfg, tmp_path / "config.json")
    back = load_config(tmp_path)  # a directory holding config.json works too
    assert back == cfg
    assert back.train.betas == (0.8, 0.95) and isinstance(back.train.betas, tuple)
    assert json.loads(cfg.to_json())["train"]["betas"] == [0.8, 0.95]
    assert back != Config()  # the comparison can fail


def test_unknown_key_is_rejected_with_a_suggestion():
    data = Config().to_dict()
    data["train"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'.*valid keys in train: lr"):
        Config.from_dict(data)
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*did you mean 'model'"):
        Config.from_dict({"modle": {}})


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        Config.from_dict({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        Config.from_dict({"train": {"max_steps": 1.5}})
    with pytest.raises(ConfigError, match="unknown objective 'diffusion' .objective.kind.; choose one of: .*gaussian"):
        Config.from_dict({"objective": {"kind": "diffusion"}}).validate()


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(Config(), {
        "train.lr": "3e-4", "train.max_steps": "1_000", "model.qk_norm": "true", "data.num_classes": "none",
        "train.betas": "0.9,0.95", "data.hflip": "0", "model.name": "DiT-B/4",
    })
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 1000 and cfg.model.qk_norm is True
    assert cfg.data.num_classes is None and cfg.train.betas == (0.9, 0.95) and cfg.data.hflip is False
    assert cfg.model.name == "DiT-B/4"
    assert parse_set_option("train.lr=1e-3") == ("train.lr", "1e-3")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set_option("train.lr")
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        apply_overrides(Config(), {"train.lrr": "1"})
    with pytest.raises(ConfigError, match="unknown config section 'trian'"):
        apply_overrides(Config(), {"trian.lr": "1"})
    with pytest.raises(ConfigError, match="model.qk_norm='maybe': use true or false"):
        apply_overrides(Config(), {"model.qk_norm": "maybe"})


def test_impossible_values_fail_with_the_fix():
    cfg = get_recipe("shapes_tiny")
    cfg.data.image_size = 30  # DiT-T/4: patch 4
    with pytest.raises(ConfigError, match=r"--image-size 30 is not divisible by the patch size 4.*--image-size 28 or 32"):
        preflight(cfg)
    cfg = get_recipe("shapes_tiny")
    cfg.data.dataset = "/no/such/folder"
    with pytest.raises(ConfigError, match="/no/such/folder.*fix --data"):
        preflight(cfg)
    cfg = get_recipe("shapes_tiny")
    cfg.train.max_steps = None
    with pytest.raises(ConfigError, match="--max-steps N, --epochs N or --time-budget"):
        preflight(cfg)
    cfg = get_recipe("shapes_tiny")
    cfg.objective.kind = "flow"
    with pytest.raises(ConfigError, match="learn_sigma=false for flow matching"):
        preflight(cfg)
    cfg = get_recipe("shapes_tiny")
    cfg.model.name = "DiT-Q/2"
    with pytest.raises(ConfigError, match="not a preset; choose one of: DiT-XL/2"):
        preflight(cfg)
    cfg = get_recipe("shapes_tiny")
    cfg.train.global_batch_size, cfg.train.grad_accum_steps = 10, 3
    with pytest.raises(ConfigError, match="not divisible by train.grad_accum_steps=3"):
        preflight(cfg)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_are_valid_and_round_trip(name):
    try:
        cfg = get_recipe(name)
    except ConfigError as err:  # optional dependency (mlxtend) missing: the message says how to get it
        assert "pip install" in str(err)
        return
    assert Config.from_json(cfg.to_json()) == cfg
    if cfg.data.dataset.startswith("path/"):  # a placeholder: the recipe's data is given with --data
        with pytest.raises(ConfigError, match="fix --data"):
            preflight(cfg)
        # a built-in dataset of the recipe's own modality stands in for the user's file
        cfg.data.dataset = "pydoc" if cfg.modality == "text" else "shapes"
    preflight(cfg)
    assert cfg.recipe == name


def test_model_kwargs_merge_preset_overrides_and_data():
    cfg = get_recipe("shapes_tiny")
    cfg.data.channels, cfg.data.num_classes = 3, 4
    cfg.model.depth = 2
    kw = model_kwargs(cfg)
    assert kw["hidden_size"] == 64 and kw["patch_size"] == 4  # preset
    assert kw["depth"] == 2  # override
    assert kw["input_size"] == 16 and kw["in_channels"] == 3 and kw["num_classes"] == 4 and kw["learn_sigma"] is True


def test_learning_rate_schedule():
    cfg = Config()
    t = cfg.train
    t.lr, t.warmup_steps, t.lr_schedule, t.min_lr_ratio = 1.0, 10, "cosine", 0.1
    assert lr_at(0, t, 110) == pytest.approx(0.1)
    assert lr_at(9, t, 110) == pytest.approx(1.0)
    assert lr_at(60, t, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, t, 110) == pytest.approx(0.1)
    t.lr_schedule = "constant"
    assert lr_at(50, t, 110) == 1.0


def test_compile_setting_auto_true_false():
    import torch

    from ditkit.train.loop import COMPILE_AUTO_MIN_STEPS, compile_enabled

    assert Config().train.compile == "auto"
    for raw, expected in (("true", True), ("off", False), ("auto", "auto")):
        assert apply_overrides(Config(), {"train.compile": raw}).train.compile == expected
    with pytest.raises(ConfigError, match="train.compile"):
        apply_overrides(Config(), {"train.compile": "sometimes"})
    old = Config().to_dict()
    old["train"]["compile"] = False  # configs saved before "auto" existed still load
    assert Config.from_dict(old).train.compile is False
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled("auto", cpu, 10**6)  # CPU: 0-5% gain, not worth ~1 min of compiling
    assert compile_enabled("auto", cuda, COMPILE_AUTO_MIN_STEPS) and not compile_enabled("auto", cuda, 100)
    assert compile_enabled(True, cpu, 1) and not compile_enabled(False, cuda, 10**6)
