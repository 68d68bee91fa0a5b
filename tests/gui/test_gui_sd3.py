"""The app and the SD3 family: the family picker lists it (the app asks the registry) and the settings form has
the key of its CLIP-G file."""

from __future__ import annotations


def test_sd3_is_in_the_family_picker(window) -> None:
    family = window.form.editors["model.family"]
    choices = [family.input.itemText(i) for i in range(family.input.count())]
    assert "sd3" in choices
    assert "model.clip_g_path" in window.form.editors and "model.text_encoder_2_path" in window.form.editors
