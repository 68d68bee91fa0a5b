"""docs/config.md, generated from the config schema (tests keep the committed file up to date)."""

from __future__ import annotations

from .config import field_docs

HEADER = """# Config keys

Generated from `sdstudio/core/config.py` by `python -m sdstudio.core.config_docs > docs/config.md`
(a test fails when this file is out of date). Keys go in TOML sections (`[train]` `learning_rate = 1e-4`) or on
the command line as `--set train.learning_rate=1e-4` (the value is parsed as TOML, else taken as a string).
Defaults below are the schema's; presets overlay them (`sdstudio presets show demo` prints a full config).

| key | type | default | description |
|---|---|---|---|
"""


def render() -> str:
    rows = []
    for key, typ, default, desc in field_docs():
        typ = typ.replace("|", "\\|")
        rows.append(f"| `{key}` | {typ} | `{default}` | {desc.replace('|', '/')} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
