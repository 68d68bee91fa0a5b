"""The run config: defaults, field-named validation messages, cross-field checks, overrides."""

from __future__ import annotations

import pytest

from sdstudio.cli.common import parse_sets
from sdstudio.core.config import RunConfig
from sdstudio.core.config_docs import field_docs
from sdstudio.core.errors import ConfigError, UserError
from sdstudio.core.overrides import parse_set_value


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, field, fragment", [
    ({"train.learning_rate": -1}, "train.learning_rate", "> 0"),
    ({"train.optimizer": "adamx"}, "train.optimizer", "'adamw'"),
    ({"data.resolution": 33}, "data.resolution", "multiple of 8"),
    ({"train.batch_size": 0}, "train.batch_size", ">= 1"),
    ({"diffusion.schedule": "quadratic"}, "diffusion.schedule", "'cosine'"),
    ({"sample.sampler": "plms"}, "sample.sampler", "'dpmpp_2m'"),
    ({"train.mixed_precision": "fp8"}, "train.mixed_precision", "'bf16'"),
    ({"train.learning_rate": "fast"}, "train.learning_rate", "number"),
])
def test_bad_value_names_field_value_and_allowed(overrides: dict, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig().with_overrides(overrides)
    text = str(info.value)
    value = next(iter(overrides.values()))
    assert field in text and repr(value) in text and fragment in text, text


def test_unknown_key_is_refused_with_hint() -> None:
    with pytest.raises(ConfigError, match=r"train\.learnin_rate .*unknown key"):
        RunConfig().with_overrides({"train.learnin_rate": 1e-4})


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"train": {"learning_rate": 0, "batch_size": -3}})
    assert "train.learning_rate" in str(info.value) and "train.batch_size" in str(info.value)


@pytest.mark.parametrize("overrides, fragment", [
    ({"train.mixed_precision": "fp16", "train.device": "cpu"}, "needs a GPU"),
    ({"model.attention_levels": [True]}, "one per level"),
    ({"model.block_channels": [30, 64, 64]}, "norm_groups"),
    ({"data.resolution": 40, "model.block_channels": [32] * 5, "model.attention_levels": [False] * 5},
     "divisible by 16"),
    ({"train.max_steps": 0, "train.epochs": 0}, "both 0"),
    ({"loss.timestep_min": 900, "loss.timestep_max": 500}, "timestep_min"),
    ({"model.text_width": 30, "model.text_heads": 4}, "text_heads"),
])
def test_cross_field_checks(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        RunConfig().with_overrides(overrides)


def test_sd_family_without_path_is_valid_but_not_ready() -> None:
    cfg = RunConfig().with_overrides({"model.family": "sd1"})
    assert any("model.path" in p for p in cfg.readiness_problems())
    assert RunConfig().readiness_problems() == []


def test_set_values_parse_as_toml_with_string_fallback() -> None:
    assert parse_set_value("1e-4") == 1e-4
    assert parse_set_value("8") == 8
    assert parse_set_value("true") is True
    assert parse_set_value("ddim") == "ddim"
    assert parse_set_value('["a red circle","a blue square"]') == ["a red circle", "a blue square"]
    assert parse_set_value("/models/x.safetensors") == "/models/x.safetensors"
    assert parse_sets(["train.learning_rate=1e-4", "sample.sampler=ddim"]) == {
        "train.learning_rate": 1e-4, "sample.sampler": "ddim"}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_sets(["train.learning_rate"])


def test_field_docs_cover_every_field_with_a_description() -> None:
    rows = field_docs()
    keys = {r[0] for r in rows}
    assert {"data.path", "train.learning_rate", "checkpoint.keep_last", "lora.rank", "sample.prompts"} <= keys
    missing = [r[0] for r in rows if not r[3]]
    assert not missing, f"fields without a description: {missing}"


def test_docs_config_md_is_up_to_date() -> None:
    from pathlib import Path

    from sdstudio.core.config_docs import render

    committed = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == render(), "regenerate: python -m sdstudio.core.config_docs > docs/config.md"
