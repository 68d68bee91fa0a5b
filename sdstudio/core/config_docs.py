"""Every config field's key, type, default and description (``field_docs``: docs/config.md, the app's settings form
and sweep dialog), and docs/config.md generated from them (tests keep the committed file up to date)."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from .config import RunConfig

HEADER = """# Config keys

Generated from `sdstudio/core/config.py` by `python -m sdstudio.core.config_docs > docs/config.md`
(a test fails when this file is out of date). Keys go in TOML sections (`[train]` `learning_rate = 1e-4`) or on
the command line as `--set train.learning_rate=1e-4` (the value is parsed as TOML, else taken as a string).
Defaults below are the schema's; presets overlay them (`sdstudio presets show demo` prints a full config).

| key | type | default | description |
|---|---|---|---|
"""


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def field_docs() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every config field, for docs and the settings form."""
    rows: list[tuple[str, str, str, str]] = []
    default = RunConfig().to_dict()
    for sname, sfield in RunConfig.model_fields.items():
        ann = sfield.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for fname, f in ann.model_fields.items():
                typ = _type_name(f.annotation)
                rows.append((f"{sname}.{fname}", typ, repr(default[sname][fname]), f.description or ""))
        else:
            rows.append((sname, getattr(ann, "__name__", str(ann)), repr(default[sname]),
                         sfield.description or ""))
    return rows


def render() -> str:
    rows = []
    for key, typ, default, desc in field_docs():
        typ = typ.replace("|", "\\|")
        rows.append(f"| `{key}` | {typ} | `{default}` | {desc.replace('|', '/')} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
