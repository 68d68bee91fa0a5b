"""The model-family registry: every family answers every question the rest of sdstudio asks, and no code outside
core/models/ branches on a family's name (that knowledge lives in the family objects)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest

from sdstudio.core.config import ModelConfig, RunConfig
from sdstudio.core.errors import UserError
from sdstudio.core.export.formats import EXPORT_FORMATS, FORMAT_NAMES, export_problem, writer_for
from sdstudio.core.models.family import ModelFamily, SamplingDefaults
from sdstudio.core.models.registry import FAMILY_NAMES, families, family_of_lora, get_family, recognise_model

ROOT = Path(__file__).resolve().parents[1]
# a comparison with a family's name, as in `family == "sdxl"` or `kind in ("sd1", "sd2")`
FAMILY_BRANCH = re.compile(r"""(==|!=|\bin\b)\s*[\(\[{]?\s*["'](pixel|sd1|sd15|sd2|sdxl|flux|sd3|chroma)["']""")


def test_no_family_name_branches_outside_core_models() -> None:
    hits = []
    for path in sorted((ROOT / "sdstudio").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("sdstudio/core/models/"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FAMILY_BRANCH.search(line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    assert not hits, "ask the family (core/models/registry.get_family) instead:\n" + "\n".join(hits)


@pytest.mark.parametrize("family", families(), ids=lambda f: f.name)
def test_every_family_answers_every_question(family: ModelFamily) -> None:
    assert get_family(family.name) is family
    assert family.title and family.short_title
    assert family.space in ("pixel", "latent") and family.pixel_space == (family.space == "pixel")
    assert family.latent_downscale >= 1
    assert family.objective in ("diffusion", "flow_matching")
    assert family.default_prediction_type in ("epsilon", "v_prediction", "sample", "flow")
    assert family.text_encoders
    assert isinstance(family.sampling, SamplingDefaults) and family.sampling.steps > 0
    assert set(family.sampling.as_dict()) == {"sampler", "steps", "guidance", "negative_prompt"}
    assert family.activation_bytes_per_pixel > 0
    assert family.base_model_version("epsilon") and family.modelspec_architecture
    assert family_of_lora({"ss_base_model_version": family.base_model_version("epsilon")}) is family
    assert family_of_lora({"modelspec.architecture": family.modelspec_architecture + "/lora"}) is family
    if family.supports_lora:
        assert family.default_lora_targets in family.lora_targets
        assert set(family.lora_targets) == set(get_args(RunConfig.model_fields["lora"].annotation
                                                        .model_fields["targets"].annotation))
        assert set(family.kohya_text_prefixes) == set(family.text_encoders)
    else:
        assert family.no_lora_reason
    for fmt in FORMAT_NAMES:
        for lora in (True, False):
            reason = export_problem(fmt, family, lora)
            assert isinstance(reason, str)
            if not reason:
                assert callable(writer_for(fmt, family))
    assert any(not export_problem(fmt, family, family.supports_lora) for fmt in FORMAT_NAMES), \
        "every family can be exported somehow"
    for fmt, reason in family.unsupported_exports.items():
        assert fmt in EXPORT_FORMATS and reason.endswith("."), "a full sentence for people"
    if family.fine_tunes_base_model:
        assert RunConfig().with_overrides({"model.family": family.name}).readiness_problems()
    assert isinstance(family.config_problems(RunConfig()), list)


def test_config_families_are_the_registry() -> None:
    assert get_args(ModelConfig.model_fields["family"].annotation) == FAMILY_NAMES
    with pytest.raises(UserError, match="not known"):
        get_family("flux")


def test_export_reasons_come_from_the_family_and_the_training_mode() -> None:
    pixel, sd1 = get_family("pixel"), get_family("sd1")
    assert "no LoRA" in export_problem("kohya", pixel, lora=False)
    assert "single-file" in export_problem("single-file", pixel, lora=False)
    assert not export_problem("diffusers-folder", pixel, lora=False)
    assert "not a LoRA" in export_problem("kohya", sd1, lora=False)
    assert all(not export_problem(fmt, sd1, lora=True) for fmt in FORMAT_NAMES)
    assert writer_for("diffusers-folder", pixel) is not writer_for("diffusers-folder", sd1)


def test_lora_metadata_names_its_family() -> None:
    assert family_of_lora({"ss_base_model_version": "sdxl_base_v0-9"}).name == "sdxl"
    assert family_of_lora({"ss_base_model_version": "sd_v2_768_v"}).name == "sd2"
    assert family_of_lora({"modelspec.architecture": "stable-diffusion-v1/lora"}).name == "sd1"
    assert family_of_lora({}) is None
    # kohya's base version wins over a modelspec that says otherwise (what kohya-based tools go by)
    assert family_of_lora({"ss_base_model_version": "sdxl_base_v1-0",
                           "modelspec.architecture": "stable-diffusion-v1/lora"}).name == "sdxl"


def test_recognise_model_files(tiny_sd1: Path, tmp_path: Path) -> None:
    assert recognise_model(tiny_sd1).name == "sd1"
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}', encoding="utf-8")
    assert recognise_model(tmp_path) is None
