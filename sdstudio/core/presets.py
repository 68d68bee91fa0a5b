"""Presets: TOML overlays on the config defaults. Built-ins ship in resources/presets, user presets live
in the platformdirs config folder. Old files are migrated by schema version before validation."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from . import paths
from .atomic import write_text_atomic
from .config import SCHEMA_VERSION, RunConfig
from .errors import ConfigError, UserError

DEFAULT_PRESET = "demo"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    builtin: bool
    description: str


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; every failure becomes a UserError naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file or start from "
                          "`sdstudio presets show demo`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None


def write_toml_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, tomli_w.dumps(_drop_none(data)))


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, (list, tuple)):
        return [_drop_none(v) for v in data]
    return data


# -- migrations: version N -> N+1, applied in order to the raw dict -----------------------------------
def _migrate_0_to_1(data: dict[str, Any]) -> dict[str, Any]:
    # Version 0 (before the schema had a version) called the sampler section "preview" and the
    # scheduler "lr_schedule"; keep such files loading.
    if "preview" in data and "sample" not in data:
        data["sample"] = data.pop("preview")
    train = data.get("train", {})
    if "lr_schedule" in train and "lr_scheduler" not in train:
        train["lr_scheduler"] = train.pop("lr_schedule")
    return data


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _migrate_0_to_1}


def migrate(data: dict[str, Any], *, source: str = "preset") -> dict[str, Any]:
    data = copy.deepcopy(data)
    version = data.get("schema_version", 0)
    if not isinstance(version, int) or version < 0:
        raise ConfigError(f"{source}: schema_version = {version!r} is invalid (allowed: 0..{SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{source}: schema_version {version} is newer than this sdstudio understands "
                          f"({SCHEMA_VERSION}); update sdstudio")
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    data["schema_version"] = SCHEMA_VERSION
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _preset_description(data: dict[str, Any]) -> str:
    return str(data.get("description", ""))


def list_presets() -> list[Preset]:
    """Built-in presets first, then user presets (a user preset may not shadow a built-in)."""
    out: list[Preset] = []
    seen: set[str] = set()
    for folder, builtin in ((paths.builtin_presets_dir(), True), (paths.user_presets_dir(), False)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.toml")):
            name = path.stem
            if name in seen:
                continue
            seen.add(name)
            try:
                desc = _preset_description(read_toml(path))
            except UserError:
                desc = "(unreadable)"
            out.append(Preset(name, path, builtin, desc))
    return out


def find_preset(name: str) -> Preset:
    for preset in list_presets():
        if preset.name == name:
            return preset
    names = ", ".join(p.name for p in list_presets())
    raise UserError(f"unknown preset {name!r}; available: {names}")


def overlay_to_config(overlay: dict[str, Any], *, source: str) -> RunConfig:
    data = migrate(overlay, source=source)
    data.pop("description", None)
    return RunConfig.from_dict(data, source=source)


def load_preset(name: str) -> RunConfig:
    preset = find_preset(name)
    return overlay_to_config(read_toml(preset.path), source=f"preset {name!r} ({preset.path})")


def load_config_file(path: Path) -> RunConfig:
    """A full config or an overlay in TOML (missing keys take the defaults)."""
    return overlay_to_config(read_toml(path), source=str(path))


def preset_overlay(name: str) -> dict[str, Any]:
    return migrate(read_toml(find_preset(name).path), source=name)


def check_preset_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(f"preset name {name!r}: use letters, digits, '-', '_' or '.', at most 64 characters")
    return name


def save_user_preset(name: str, config: RunConfig, description: str = "") -> Path:
    """Save a config as a user preset (only the keys that differ from the defaults)."""
    check_preset_name(name)
    for preset in list_presets():
        if preset.name == name and preset.builtin:
            raise UserError(f"preset {name!r} is built in; save under another name")
    data: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    if description:
        data["description"] = description
    data.update(config_diff(RunConfig().to_dict(), config.to_dict()))
    path = paths.user_presets_dir() / f"{name}.toml"
    write_toml_atomic(path, data)
    return path


def delete_user_preset(name: str) -> None:
    preset = find_preset(name)
    if preset.builtin:
        raise UserError(f"preset {name!r} is built in and cannot be deleted")
    preset.path.unlink()


def rename_user_preset(old: str, new: str) -> Path:
    preset = find_preset(old)
    if preset.builtin:
        raise UserError(f"preset {old!r} is built in and cannot be renamed")
    check_preset_name(new)
    if any(p.name == new for p in list_presets()):
        raise UserError(f"a preset named {new!r} exists already")
    target = preset.path.with_name(f"{new}.toml")
    preset.path.rename(target)
    return target


def config_diff(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The nested keys of ``other`` whose values differ from ``base``."""
    out: dict[str, Any] = {}
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            sub = config_diff(base[key], value)
            if sub:
                out[key] = sub
        elif base.get(key) != value:
            out[key] = value
    return out


def config_to_toml(config: RunConfig) -> str:
    return tomli_w.dumps(_drop_none(config.to_dict()))
