"""The search space of a sweep: the [grid] lists and the [random] choices and ranges, and their expansion
into combinations (dicts of dotted config keys to values)."""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

from ..errors import UserError

RANDOM_SETTINGS = ("samples", "seed")
SEARCH_SETTINGS = ("method", "trials", "prune", "seed", "startup_trials")
SEARCH_METHODS = ("tpe",)
RANGE_KEYS = ("min", "max", "log")


def is_range(value: Any) -> bool:
    """A [random] table like ``{min = 1, max = 9}``; no config field is called min, max or log, so a table
    naming any of them is a (maybe misspelt) range, never a config section."""
    return isinstance(value, dict) and bool(set(value) & set(RANGE_KEYS))


def flatten(table: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """Accept both ``"train.learning_rate" = x`` and ``[grid.train] learning_rate = x`` spellings."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not (where == "random" and is_range(value)):
            out.update(flatten(value, where, f"{full}."))
        else:
            out[full] = value
    return out


def grid_values(grid: dict[str, Any], src: str) -> dict[str, list[Any]]:
    if not grid:
        raise UserError(f"{src}: [grid] is empty; list the values to try, e.g. \"train.learning_rate\" = [1e-4, 3e-4]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{src}: [grid] {key!r} = {values!r}: give a non-empty list of values to try, "
                            f"e.g. [{values!r}]")
    return grid


def random_specs(table: dict[str, Any], src: str) -> tuple[dict[str, int], dict[str, Any]]:
    settings = {"samples": table.get("samples"), "seed": table.get("seed", 0)}
    for key, low in (("samples", 1), ("seed", 0)):
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{src}: [random] {key} = {value!r}: give a whole number >= {low}"
                            + (" (how many runs to draw)" if key == "samples" else ""))
    specs = flatten({k: v for k, v in table.items() if k not in RANDOM_SETTINGS}, "random")
    return settings, _check_specs(specs, "random", src)


def search_specs(table: dict[str, Any], src: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """[search]: method = "tpe", trials = N, prune = true, seed, startup_trials (finished trials before pruning
    starts), then ranges and choices as in [random]."""
    settings = {"method": table.get("method", "tpe"), "trials": table.get("trials"), "prune": table.get("prune", True),
                "seed": table.get("seed", 0), "startup_trials": table.get("startup_trials", 2)}
    if settings["method"] not in SEARCH_METHODS:
        raise UserError(f"{src}: [search] method = {settings['method']!r}: allowed {', '.join(SEARCH_METHODS)}")
    for key, low in (("trials", 1), ("seed", 0), ("startup_trials", 0)):
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{src}: [search] {key} = {value!r}: give a whole number >= {low}"
                            + (" (how many runs to try)" if key == "trials" else ""))
    if not isinstance(settings["prune"], bool):
        raise UserError(f"{src}: [search] prune = {settings['prune']!r}; use true or false")
    specs = flatten({k: v for k, v in table.items() if k not in SEARCH_SETTINGS}, "random")
    return settings, _check_specs(specs, "search", src)


def space_corners(specs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The lowest and the highest end of every range (first and last choice): what a search must accept."""
    low = {k: (v[0] if isinstance(v, list) else v["min"]) for k, v in specs.items()}
    high = {k: (v[-1] if isinstance(v, list) else v["max"]) for k, v in specs.items()}
    return [("lowest values", low), ("highest values", high)]


def _check_specs(specs: dict[str, Any], where: str, src: str) -> dict[str, Any]:
    if not specs:
        raise UserError(f"{src}: [{where}] names no config keys; e.g. \"train.learning_rate\" = "
                        "{ min = 1e-4, max = 1e-2, log = true }")
    for key, spec in specs.items():
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{src}: [{where}] {key!r} = []: give at least one value to choose from")
            continue
        if not isinstance(spec, dict):
            raise UserError(f"{src}: [{where}] {key!r} = {spec!r}: give a list of choices or a range "
                            "{ min = ..., max = ..., log = true }")
        extra = [k for k in spec if k not in RANGE_KEYS]
        if extra:
            raise UserError(f"{src}: [{where}] {key!r}: unknown range key {extra[0]!r} (allowed: min, max, log)")
        low, high, log = spec.get("min"), spec.get("max"), spec.get("log", False)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"{src}: [{where}] {key!r}: a range needs numbers min and max, got min={low!r} "
                            f"max={high!r}")
        if low > high:
            raise UserError(f"{src}: [{where}] {key!r}: min {low} is above max {high}")
        if not isinstance(log, bool):
            raise UserError(f"{src}: [{where}] {key!r}: log = {log!r}; use true or false")
        if log and low <= 0:
            raise UserError(f"{src}: [{where}] {key!r}: a log range needs min > 0 (got {low})")
    return specs


def grid_combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, in file order, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def random_combinations(specs: dict[str, Any], *, samples: int, seed: int) -> list[dict[str, Any]]:
    """``samples`` distinct draws (fewer when the space is smaller); the same seed gives the same draws."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(samples * 50):
        if len(out) == samples:
            break
        combo = {key: _draw(rng, spec) for key, spec in specs.items()}
        ident = json.dumps(combo, sort_keys=True)
        if ident not in seen:
            seen.add(ident)
            out.append(combo)
    return out


def _draw(rng: random.Random, spec: Any) -> Any:
    if isinstance(spec, list):
        return spec[rng.randrange(len(spec))]
    low, high, log = spec["min"], spec["max"], spec.get("log", False)
    integer = isinstance(low, int) and isinstance(high, int)
    if log:
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    if integer:
        return min(high, max(low, round(value)))
    return float(f"{value:.3g}")  # 3 significant digits: readable in folder names and tables
