"""Configs load, validate their keys and round-trip through a checkpoint's dict."""

from __future__ import annotations

import pytest

from training.config import ExperimentConfig, load_config


@pytest.mark.parametrize("name", ["paper", "small", "smoke"])
def test_builtin_configs_round_trip(name: str) -> None:
    cfg = load_config(name)
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_key_is_named() -> None:
    raw = load_config("smoke").to_dict()
    raw["model"]["image_sise"] = 64
    with pytest.raises(ValueError, match="image_sise"):
        ExperimentConfig.from_dict(raw)


def test_unknown_config_lists_builtins() -> None:
    with pytest.raises(FileNotFoundError, match="small"):
        load_config("nope")


def test_dotted_override() -> None:
    cfg = load_config("smoke").replace(**{"meta.k_shot": 5})
    assert cfg.meta.k_shot == 5
    with pytest.raises(KeyError):
        load_config("smoke").replace(**{"meta.kshot": 5})


def test_a_config_value_of_the_wrong_kind_is_named() -> None:
    """`image_size: abc` (a YAML file or --set) was accepted, then a traceback deep in the networks."""
    small = load_config("small")
    for key, value, kind in (
        ("model.image_size", "abc", "int"),
        ("model.image_size", True, "int"),
        ("loss.pixel_weight", "x", "float"),
        ("meta.augment_flip", 1, "bool"),
    ):
        with pytest.raises(ValueError, match=f"config.{key}: expected {kind}, got {value!r}"):
            small.replace(**{key: value})
    assert small.replace(**{"loss.pixel_weight": 2}).loss.pixel_weight == 2.0  # an int for a float
    assert ExperimentConfig.from_dict(small.to_dict()) == small


def test_a_negative_count_rate_weight_or_spread_is_named() -> None:
    """`train --set finetune.synthetic_spread=-0.5` was stored in the checkpoint and failed inside
    the first step of every later fine-tuning; a negative rate or loss weight trained on."""
    small = load_config("small")
    for key, value in (
        ("finetune.synthetic_spread", -0.5),
        ("finetune.one_shot_sources", -1),
        ("finetune.steps", -5),
        ("finetune.lr_generator", float("nan")),
        ("meta.lr_discriminator", -2e-4),
        ("meta.k_shot", -8),
        ("loss.matching_weight", -80),
    ):
        with pytest.raises(ValueError, match=rf"config\.{key}: must be 0 or more, got {value!r}"):
            small.replace(**{key: value})
    # 0 stays allowed: a term switched off, no synthetic pairs
    zero = small.replace(**{"finetune.synthetic_sources": 0, "loss.pixel_weight": 0})
    assert zero.finetune.synthetic_sources == 0 and zero.loss.pixel_weight == 0.0
