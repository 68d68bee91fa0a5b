"""The app's family picker lists Chroma (it asks the registry; no GUI code names a family)."""

from __future__ import annotations


def test_the_family_picker_lists_chroma(window) -> None:
    family = window.form.editors["model.family"]
    choices = [family.input.itemText(i) for i in range(family.input.count())]
    assert "chroma" in choices
    assert choices.count("chroma") == 1
