"""Typed values for `KEY=VALUE` overrides (the CLI's `--set`, sweep files' lists, the app's sweep dialog)."""

from __future__ import annotations

from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def parse_set_value(text: str) -> Any:
    """A TOML value (numbers, booleans, arrays, quoted strings); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
