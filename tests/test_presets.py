"""Presets: built-ins load and validate, user presets save/rename/delete, old files migrate."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdstudio.core import paths, presets
from sdstudio.core.config import SCHEMA_VERSION, RunConfig
from sdstudio.core.errors import ConfigError, UserError

BUILTINS = {"demo", "sd15-lora", "sd15-full", "sdxl-lora", "sd15-lora-lowvram"}


def test_builtin_presets_exist_and_validate() -> None:
    names = {p.name for p in presets.list_presets() if p.builtin}
    assert BUILTINS <= names
    for name in names:
        cfg = presets.load_preset(name)
        assert isinstance(cfg, RunConfig)
        assert presets.find_preset(name).description, f"preset {name} has no description"


def test_demo_is_the_default_and_trains_from_scratch() -> None:
    cfg = presets.load_preset(presets.DEFAULT_PRESET)
    assert presets.DEFAULT_PRESET == "demo"
    assert cfg.model.family == "pixel" and cfg.readiness_problems() == []
    assert cfg.sample.prompts, "the demo shows samples for fixed prompts"


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(UserError, match="unknown preset 'nope'.*demo"):
        presets.load_preset("nope")


def test_user_preset_save_load_rename_delete() -> None:
    cfg = presets.load_preset("demo").with_overrides({"train.learning_rate": 3e-4, "train.batch_size": 8})
    path = presets.save_user_preset("mine", cfg, description="my settings")
    assert path.parent == paths.user_presets_dir()
    text = path.read_text()
    assert "learning_rate" in text and "block_channels" not in text, "only the differences are stored"
    assert presets.load_preset("mine") == cfg
    presets.rename_user_preset("mine", "mine2")
    assert presets.load_preset("mine2") == cfg
    presets.delete_user_preset("mine2")
    with pytest.raises(UserError):
        presets.load_preset("mine2")


def test_builtins_are_protected() -> None:
    with pytest.raises(UserError, match="built in"):
        presets.save_user_preset("demo", RunConfig())
    with pytest.raises(UserError, match="built in"):
        presets.delete_user_preset("demo")
    with pytest.raises(UserError, match="preset name"):
        presets.save_user_preset("../evil", RunConfig())


def test_old_schema_is_migrated(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    old.write_text('[preview]\nsteps = 7\n[train]\nlr_schedule = "linear"\n')
    cfg = presets.load_config_file(old)
    assert cfg.sample.steps == 7 and cfg.train.lr_scheduler == "linear"
    assert cfg.schema_version == SCHEMA_VERSION


def test_newer_schema_and_bad_toml_are_clear_errors(tmp_path: Path) -> None:
    newer = tmp_path / "newer.toml"
    newer.write_text(f"schema_version = {SCHEMA_VERSION + 1}\n")
    with pytest.raises(ConfigError, match="newer than this sdstudio"):
        presets.load_config_file(newer)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlearning_rate = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        presets.load_config_file(bad)
    with pytest.raises(UserError, match="not found"):
        presets.load_config_file(tmp_path / "missing.toml")


def test_toml_round_trip_of_a_full_config(tmp_path: Path) -> None:
    cfg = presets.load_preset("sdxl-lora")
    path = tmp_path / "c.toml"
    path.write_text(presets.config_to_toml(cfg))
    assert presets.load_config_file(path) == cfg
