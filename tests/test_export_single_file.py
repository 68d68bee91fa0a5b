"""Single-file export (original LDM layout): tiny SD1.x / SD2.x / SDXL models written by sdstudio and read back by
diffusers' own loader (``from_single_file(config=...)``) give the very tensors that went in; real-size layouts
carry the names and shapes diffusers uses to recognise each family; writes are atomic."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sdstudio.core.errors import UserError
from sdstudio.core.export import ldm
from sdstudio.core.export.single_file import HASH_KEYS, ldm_state_dict, write_single_file
from sdstudio.core.models.sd.files import inspect_model, load_sd_components
from sdstudio.core.models.sd.offline import models_dir
from tests import tiny_models as tiny

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def tiny_sd2_components(seed: int = 0) -> dict[str, Any]:
    """SD2.x topology: linear projections in the UNet's transformers, an OpenCLIP-style text encoder (HF
    CLIPTextModel, no projection) whose width is the UNet's cross_attention_dim, v-prediction."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
            cross_attention_dim=tiny.TINY_TEXT_HIDDEN, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = tiny.tiny_vae()
        config = tiny.tiny_text_config()
        config.hidden_act = "gelu"  # OpenCLIP's activation (CLIP-L's is quick_gelu)
        text_encoder = CLIPTextModel(config).eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tiny.tiny_tokenizer("g"),
            "scheduler": tiny._scheduler("euler", "v_prediction")}


def _save_sd2(components: dict[str, Any], folder: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path]]:
    """family -> (components, diffusers folder written from the same seed)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    sd2 = tiny_sd2_components()
    return {
        "sd1": (tiny.tiny_sd1_components(), tiny.save_tiny_sd1(root / "sd1")),
        "sdxl": (tiny.tiny_sdxl_components(), tiny.save_tiny_sdxl(root / "sdxl")),
        "sd2": (sd2, _save_sd2(sd2, root / "sd2")),
    }


def _state(module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in module.state_dict().items()}


def _assert_same_weights(loaded: Any, reference: Any, *, round_to: torch.dtype | None = None) -> None:
    for part in PARTS:
        got, want = getattr(loaded, part, None), getattr(reference, part, None)
        if want is None:
            assert got is None, part
            continue
        a, b = _state(got), _state(want)
        assert a.keys() == b.keys(), f"{part}: keys differ {sorted(set(a) ^ set(b))[:5]}"
        for key in b:
            expected = b[key] if round_to is None else b[key].to(round_to).float()
            assert torch.equal(a[key], expected), f"{part}.{key} differs after the round trip"


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd2"])
def test_single_file_reloads_with_the_diffusers_folders_weights(
        tiny_models: dict, family: str, tmp_path: Path) -> None:
    components, folder = tiny_models[family]
    path = write_single_file(components, tmp_path / f"{family}.safetensors", family=family, dtype=torch.float32,
                             v_prediction=family == "sd2")
    info = inspect_model(path)
    assert info.kind == family
    assert info.prediction_type == ("v_prediction" if family == "sd2" else None)
    from_file = load_sd_components(path, family=family, config_folder=folder)
    # a diffusers folder's SD2-ness is read from a 1024-wide text encoder, which the tiny one is not; the
    # pipeline class is the same for SD1 and SD2, so load the folder as whatever it is taken for
    from_folder = load_sd_components(folder, family=inspect_model(folder).kind)
    _assert_same_weights(from_file, from_folder)
    _assert_same_weights(from_file, SimpleNamespace(**components))  # and the modules that were exported


def test_fp16_export_holds_the_weights_rounded_to_fp16(tiny_models: dict, tmp_path: Path) -> None:
    components, folder = tiny_models["sdxl"]
    path = write_single_file(components, tmp_path / "half.safetensors", family="sdxl")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118 - safe_open is not iterable
    assert dtypes == {"F16"}
    _assert_same_weights(load_sd_components(path, family="sdxl", config_folder=folder),
                         SimpleNamespace(**components), round_to=torch.float16)


def test_reloaded_file_converts_back_to_the_same_tensors(tiny_models: dict, tmp_path: Path) -> None:
    """diffusers' loader reads every tensor we write (none ignored): writing what it loaded gives the file back."""
    from safetensors.torch import load_file

    components, folder = tiny_models["sdxl"]
    path = write_single_file(components, tmp_path / "a.safetensors", family="sdxl", dtype=torch.float32)
    loaded = load_sd_components(path, family="sdxl", config_folder=folder)
    original, again = load_file(str(path)), ldm_state_dict(loaded, family="sdxl")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_header_metadata_markers_and_tensor_hash(tiny_models: dict, tmp_path: Path) -> None:
    from safetensors import safe_open

    from sdstudio.core.export.metadata import tensor_data_sha256

    components, _ = tiny_models["sd1"]
    path = write_single_file(components, tmp_path / "m.safetensors", family="sd1", v_prediction=True,
                             zero_terminal_snr=True, metadata={"modelspec.title": "tiny", "ss_steps": 7})
    with safe_open(str(path), framework="pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
        assert fh.get_tensor("v_pred").numel() == 0
    assert meta["modelspec.title"] == "tiny" and meta["ss_steps"] == "7"
    digest = tensor_data_sha256(path.read_bytes())
    assert all(meta[k] == digest for k in HASH_KEYS)
    assert {"v_pred", "ztsnr"} <= keys
    info = inspect_model(path)
    assert (info.kind, info.prediction_type, info.zero_terminal_snr) == ("sd1", "v_prediction", True)


def test_existing_file_is_kept_without_force(tiny_models: dict, tmp_path: Path) -> None:
    components, _ = tiny_models["sd1"]
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(UserError, match="exists already"):
        write_single_file(components, path, family="sd1")
    assert path.read_bytes() == b"keep me"
    write_single_file(components, path, family="sd1", force=True)
    assert inspect_model(path).kind == "sd1"


def test_failed_write_leaves_nothing_under_the_final_name(
        tiny_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def half_written(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\x00" * 64)  # a partial file, then the disk fills up
        raise OSError(28, "No space left on device")

    components, _ = tiny_models["sd1"]
    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    fresh, existing = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    existing.write_bytes(b"previous export")
    with pytest.raises(UserError, match="No space left"):
        write_single_file(components, fresh, family="sd1")
    with pytest.raises(UserError):
        write_single_file(components, existing, family="sd1", force=True)
    assert not fresh.exists() and existing.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]  # no temp file left behind


def _meta_models(name: str, family: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = models_dir() / name
    with torch.device("meta"):  # real sizes, no memory
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return parts


# Names and shapes of the published SD1.5 / SD2.1 / SDXL base files (the original repos' layouts).
REAL_LAYOUT = {
    "sd15": ("sd1", "v1", 1130, {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.block.0.norm1.weight": (512,),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.encoder.norm_out.weight": (512,),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    }),
    "sd21-768-v": ("sd2", "v2", 1214, {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    }),
    "sdxl-base": ("sdxl", "xl_base", 2513, {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    }),
}


@pytest.mark.parametrize("name", list(REAL_LAYOUT))
def test_real_size_layout_has_the_published_names_and_family_markers(name: str) -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    family, model_type, count, shapes = REAL_LAYOUT[name]
    sd = ldm_state_dict(_meta_models(name, family), family=family)
    # the published files hold these plus text_model.embeddings.position_ids (and SDXL's logit_scale), which
    # no loader needs; SD2's file also holds OpenCLIP's 24th layer, which diffusers' SD2 encoder drops
    assert len(sd) == count
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert infer_diffusers_model_type(sd) == model_type  # what diffusers guesses without config=


def test_text_encoders_with_or_without_the_text_model_level_map_alike(tiny_models: dict) -> None:
    te2 = tiny_models["sdxl"][0]["text_encoder_2"].state_dict()
    flat = {k.removeprefix("text_model."): v for k, v in te2.items()}
    assert any(k.startswith("text_model.") for k in te2) and not any(k.startswith("text_model.") for k in flat)
    assert ldm.open_clip_to_ldm(te2, "p.").keys() == ldm.open_clip_to_ldm(flat, "p.").keys()
    assert ldm.clip_l_to_ldm(te2, "c.").keys() == ldm.clip_l_to_ldm(flat, "c.").keys()
    assert "c.text_model.embeddings.token_embedding.weight" in ldm.clip_l_to_ldm(flat, "c.")


def test_unknown_tensors_are_refused_not_dropped(tiny_models: dict) -> None:
    unet = tiny_models["sd1"][0]["unet"]
    state = {**unet.state_dict(), "encoder_hid_proj.weight": torch.zeros(1)}
    with pytest.raises(ldm.MappingError, match="encoder_hid_proj"):
        ldm.unet_to_ldm(state, unet.config)
    with pytest.raises(UserError, match="family 'sd1' does not match"):
        ldm_state_dict(tiny_models["sdxl"][0], family="sd1")
