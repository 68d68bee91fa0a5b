"""Packaging facts: every subpackage is listed in pyproject.toml, resources are found as package data."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

from sdstudio.core import paths

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sdstudio").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_resources_are_found() -> None:
    assert (paths.builtin_presets_dir() / "demo.toml").is_file()
    assert len(list(paths.demo_dataset_dir().glob("*.png"))) >= 200
