"""Sweep files: a base config, fixed overrides and a grid or random search over config fields, expanded into
validated combinations before any run starts. Running them is `runner.py`; the summary and the overlay
plot are `summary.py` and `plot.py`."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from ..config import RunConfig
from ..config_docs import field_docs
from ..config_input import set_dotted
from ..errors import ConfigError, UserError
from ..presets import DEFAULT_PRESET, load_config_file, load_preset, read_toml
from .space import (
    flatten,
    grid_combinations,
    grid_values,
    random_combinations,
    random_specs,
    search_specs,
    space_corners,
)

TOP_LEVEL_KEYS = ("name", "base_preset", "base_config", "set", "grid", "random", "search")
MAX_COMBINATIONS = 1000  # a bigger sweep is almost always a typo; split it into several files
NOT_OVERRIDABLE = {"schema_version"}


@dataclass(frozen=True)
class Combination:
    """One run of a sweep: its swept values, the full validated config and its folder name."""

    index: int
    overrides: dict[str, Any]
    config: RunConfig
    folder: str

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def describe(self) -> str:
        return ", ".join(f"{key}={format_value(value)}" for key, value in self.overrides.items())


@dataclass(frozen=True)
class SweepPlan:
    """A parsed, fully validated sweep file."""

    path: Path
    name: str
    base: str  # "preset demo" | "config /abs/base.toml"
    mode: str  # "grid" | "random" | "search"
    fixed: dict[str, Any]
    keys: list[str]
    combinations: list[Combination]  # empty for a search: its trials are drawn as it learns (search.py)
    search: dict[str, Any] | None = None  # [search] settings (method, trials, prune, seed, startup_trials)
    ranges: dict[str, Any] | None = None  # [search] ranges, as in [random]
    base_config: RunConfig | None = None  # the base with [set] applied: what a search trial's values go onto

    def trial_config(self, overrides: dict[str, Any], number: int) -> RunConfig:
        """The validated config of a search trial's values."""
        assert self.base_config is not None
        desc = ", ".join(f"{k}={format_value(v)}" for k, v in overrides.items())
        config = _apply(self.base_config, overrides, f"{self.path}, trial {number} ({desc})")
        _check_ready(config, f"{self.path}, trial {number} ({desc})")
        return config


def config_hash(config: RunConfig) -> str:
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_sweep_dir(name: str) -> Path:
    """``<runs folder>/sweeps/<name>``: running the same sweep file again resumes it."""
    return paths.runs_dir() / "sweeps" / name


def load_sweep(path: Path) -> SweepPlan:
    """Read and validate a sweep file; any problem is one UserError naming the file and the key."""
    return parse_sweep(read_toml(path), path=path)


def parse_sweep(data: dict[str, Any], *, path: Path) -> SweepPlan:
    src = str(path)
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise UserError(f"{src}: unknown key {unknown[0]!r}{_suggest(unknown[0], TOP_LEVEL_KEYS)}; a sweep file "
                        f"has {', '.join(TOP_LEVEL_KEYS)}")
    name = _sweep_name(data.get("name", path.stem), src)
    base_config, base = _load_base(data, path)

    fixed = flatten(_table(data, "set", src), "set")
    _check_keys(fixed, "set", src)
    if sum(k in data for k in ("grid", "random", "search")) != 1:
        raise UserError(f"{src}: give either a [grid] table (every combination of lists of values), a [random] "
                        "table (samples drawn from choices and ranges) or a [search] table (Optuna TPE)")
    if "search" in data:
        return _parse_search(data, path, name, base_config, base, fixed)
    mode = "grid" if "grid" in data else "random"
    if mode == "grid":
        grid = flatten(_table(data, "grid", src), "grid")
        _check_keys(grid, "grid", src)
        values = grid_values(grid, src)
        count = math.prod(len(v) for v in values.values())
        if count > MAX_COMBINATIONS:  # before building them: a typo can ask for millions
            raise UserError(f"{src}: [grid] gives {count} combinations (at most {MAX_COMBINATIONS}); "
                            "split the sweep into several files")
        combos = grid_combinations(values)
    else:
        settings, ranges = random_specs(_table(data, "random", src), src)
        _check_keys(ranges, "random", src)
        combos = random_combinations(ranges, samples=settings["samples"], seed=settings["seed"])
        grid = ranges
    both = sorted(set(fixed) & set(grid))
    if both:
        raise UserError(f"{src}: {both[0]!r} is both in [set] and in [{mode}]; keep it in one of them")
    if len(combos) > MAX_COMBINATIONS:
        raise UserError(f"{src}: [{mode}] gives {len(combos)} combinations (at most {MAX_COMBINATIONS}); "
                        "split the sweep into several files")

    base_fixed = _apply(base_config, fixed, f"{src} [set]")
    combinations = []
    for index, overrides in enumerate(combos):
        desc = ", ".join(f"{k}={format_value(v)}" for k, v in overrides.items())
        config = _apply(base_fixed, overrides, f"{src}, combination {index} ({desc})")
        _check_ready(config, f"{src}, combination {index} ({desc})")
        combinations.append(Combination(index, overrides, config, run_folder_name(index, len(combos), overrides)))
    if not combinations:
        raise UserError(f"{src}: [{mode}] gives no combinations")
    return SweepPlan(path, name, base, mode, fixed, list(grid), combinations)


def _parse_search(data: dict[str, Any], path: Path, name: str, base_config: RunConfig, base: str,
                  fixed: dict[str, Any]) -> SweepPlan:
    src = str(path)
    settings, ranges = search_specs(_table(data, "search", src), src)
    _check_keys(ranges, "search", src)
    both = sorted(set(fixed) & set(ranges))
    if both:
        raise UserError(f"{src}: {both[0]!r} is both in [set] and in [search]; keep it in one of them")
    base_fixed = _apply(base_config, fixed, f"{src} [set]")
    for label, corner in space_corners(ranges):  # both ends of every range must make a valid config
        desc = ", ".join(f"{k}={format_value(v)}" for k, v in corner.items())
        config = _apply(base_fixed, corner, f"{src}, [search] {label} ({desc})")
        _check_ready(config, f"{src}, [search] {label} ({desc})")
    return SweepPlan(path, name, base, "search", fixed, list(ranges), [], settings, ranges, base_fixed)


# -- pieces of the file ---------------------------------------------------------------------------------
def _sweep_name(value: Any, src: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(value)).strip("-.")
    if not isinstance(value, str) or not name:
        raise UserError(f"{src}: name = {value!r}: use letters, digits, '-', '_' or '.'")
    return name[:64]


def _load_base(data: dict[str, Any], path: Path) -> tuple[RunConfig, str]:
    src = str(path)
    if "base_preset" in data and "base_config" in data:
        raise UserError(f"{src}: give base_preset or base_config, not both")
    if "base_config" in data:
        value = data["base_config"]
        if not isinstance(value, str) or not value:
            raise UserError(f"{src}: base_config = {value!r}: give the path of a config TOML file")
        base_path = Path(value).expanduser()
        if not base_path.is_absolute():
            base_path = path.parent / base_path  # relative to the sweep file, not the current folder
        try:
            return load_config_file(base_path), f"config {base_path.resolve()}"
        except UserError as exc:
            raise UserError(f"{src}: base_config: {exc}") from None
    preset = data.get("base_preset", DEFAULT_PRESET)
    if not isinstance(preset, str) or not preset:
        raise UserError(f"{src}: base_preset = {preset!r}: give a preset name (`sdstudio presets list`)")
    try:
        return load_preset(preset), f"preset {preset}"
    except UserError as exc:
        raise UserError(f"{src}: base_preset: {exc}") from None


def _table(data: dict[str, Any], key: str, src: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"{src}: {key} must be a table ([{key}] followed by \"section.key\" = ... lines)")
    return value


def _known_keys() -> list[str]:
    return [key for key, *_ in field_docs() if key not in NOT_OVERRIDABLE]


def _check_keys(table: dict[str, Any], where: str, src: str) -> None:
    known = _known_keys()
    sections = {k.split(".")[0] for k in known if "." in k}
    for key in table:
        if key in known:
            continue
        if key in sections:
            raise UserError(f"{src}: [{where}] {key!r} is a section; name a field such as "
                            f"{next(k for k in known if k.startswith(key + '.'))!r}")
        raise UserError(f"{src}: [{where}] {key!r}: unknown config key{_suggest(key, known)} "
                        "(`sdstudio presets show demo` lists all keys)")


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- validation of combinations ---------------------------------------------------------------------------
def _apply(config: RunConfig, overrides: dict[str, Any], source: str) -> RunConfig:
    if not overrides:
        return config
    data = config.to_dict()
    for key, value in overrides.items():
        set_dotted(data, key, value)
    try:
        return RunConfig.from_dict(data, source=source)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def _check_ready(config: RunConfig, source: str) -> None:
    problems = config.readiness_problems()
    if config.data.path and not Path(config.data.path).expanduser().is_dir():
        problems.append(f"data.path: {config.data.path} is not a folder")
    if problems:
        raise UserError(f"{source}: {problems[0]}")


# -- names ------------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """Short text of a value for tables and folder names (3e-4, not 0.00030000000000000003)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            mantissa, exponent = f"{value:.3e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(format_value(v) for v in value)
    return str(value)


def short_key(key: str) -> str:
    """``train.learning_rate`` -> ``lr``; a one-word field keeps its name (``lora.rank`` -> ``rank``)."""
    words = key.split(".")[-1].split("_")
    return "".join(w[0] for w in words) if len(words) > 1 else words[0]


def run_folder_name(index: int, total: int, overrides: dict[str, Any], max_len: int = 48) -> str:
    width = max(2, len(str(max(0, total - 1))))
    slug = "_".join(f"{short_key(k)}{format_value(v)}" for k, v in overrides.items())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", slug).strip("-_.")[:max_len].rstrip("-_.")
    return f"{index:0{width}d}-{slug}" if slug else f"{index:0{width}d}"
