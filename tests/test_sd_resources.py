"""The bundled SD resources: CLIP tokenizers give CLIP's ids, config folders build the published models and
serve from_single_file offline, and the tiny test models run and reload."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sdstudio.core.errors import UserError
from sdstudio.core.models.sd import offline
from tests import tiny_models as tiny

REPO = Path(__file__).resolve().parents[1]

# ids published for CLIP's tokenizer, from sources independent of this repo's conversion
KNOWN_CLIP_IDS = {
    # CLIP README / transformers CLIPTokenizer docs example
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    # transformers CLIPModel docs example batch (also pinned by elixir-nx/bumblebee's CLIP tokenizer test)
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    # open_clip's own tokenizer output, quoted in huggingface/diffusers issue #4153
    "! !! !!!": [49406, 256, 748, 995, 49407],
    "": [49406, 49407],
}


@pytest.fixture(scope="module")
def clip_l():
    return offline.clip_tokenizer("l")


@pytest.fixture(scope="module")
def clip_g():
    return offline.clip_tokenizer("g")


@pytest.fixture(scope="module")
def sd1() -> dict:
    return tiny.tiny_sd1_components(seed=0)


@pytest.fixture(scope="module")
def sdxl() -> dict:
    return tiny.tiny_sdxl_components(seed=0)


@pytest.mark.parametrize("text", list(KNOWN_CLIP_IDS))
def test_clip_tokenizer_gives_known_clip_ids(clip_l, text: str) -> None:
    assert clip_l(text).input_ids == KNOWN_CLIP_IDS[text]


def test_clip_tokenizer_special_tokens_and_round_trip(clip_l) -> None:
    assert len(clip_l) == 49408
    assert (clip_l.bos_token_id, clip_l.eos_token_id, clip_l.pad_token_id) == (49406, 49407, 49407)
    assert clip_l.model_max_length == 77
    assert clip_l("A  PHOTO of a CAT").input_ids == KNOWN_CLIP_IDS["a photo of a cat"]
    text = "An astronaut riding a horse, café"
    assert clip_l.decode(clip_l(text).input_ids, skip_special_tokens=True) == "an astronaut riding a horse , café"


def test_clip_g_tokenizer_pads_with_exclamation_like_stabilityai_configs(clip_l, clip_g) -> None:
    padded = clip_g("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert padded[:7] == KNOWN_CLIP_IDS["a photo of a cat"] and set(padded[7:]) == {0}
    assert clip_g.pad_token == "!" and clip_g.pad_token_id == 0
    # the published SDXL tokenizer_2 turns every "!" into the pad token (diffusers issue #4153); kept as is
    assert clip_g("! !! !!!").input_ids == [49406, 0, 0, 0, 0, 0, 0, 49407]
    assert clip_g.get_vocab() == clip_l.get_vocab()


def test_committed_vocab_is_rebuilt_from_committed_merges() -> None:
    """vocab.json is exactly what CLIP's construction makes of merges.txt (the script's own rule)."""
    spec = importlib.util.spec_from_file_location("make_clip_tokenizer", REPO / "scripts" / "make_clip_tokenizer.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder = offline.clip_tokenizer_folder("l")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[1] == "i n" and len(lines[1:-1]) == 48894
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == script.build_vocab(lines[1:-1])
    assert (vocab["!"], vocab["!</w>"], vocab["in"], vocab["<|endoftext|>"]) == (0, 256, 512, 49407)


def test_config_folder_picks_the_family_folder() -> None:
    assert offline.config_folder("sd1").name == "sd15"
    assert offline.config_folder("sd1", "v_prediction").name == "sd15"
    assert offline.config_folder("sd2").name == "sd21-768-v"
    assert offline.config_folder("sd2", "v_prediction").name == "sd21-768-v"
    assert offline.config_folder("sd2", "epsilon").name == "sd2-base"
    assert offline.config_folder("sdxl", None).name == "sdxl-base"
    with pytest.raises(UserError, match="sd3"):
        offline.config_folder("sd3")
    with pytest.raises(UserError, match="v-pred"):
        offline.config_folder("sd1", "v-pred")


# published parameter counts: UNet, VAE, text_encoder (, text_encoder_2)
PUBLISHED_SIZES = {
    "sd15": (859_520_964, 83_653_863, 123_060_480),
    "sd21-768-v": (865_910_724, 83_653_863, 340_387_840),
    "sd2-base": (865_910_724, 83_653_863, 340_387_840),
    "sdxl-base": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840),
}
PREDICTION = {"sd15": "epsilon", "sd21-768-v": "v_prediction", "sd2-base": "epsilon", "sdxl-base": "epsilon"}


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(PUBLISHED_SIZES))
def test_config_folder_builds_the_published_models_on_meta(name: str) -> None:
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = offline.models_dir() / name
    index = DiffusionPipeline.load_config(folder)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == index["scheduler"][1]
    assert scheduler_config["prediction_type"] == PREDICTION[name]
    with torch.device("meta"):
        sizes = [
            _n_params(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))),
            _n_params(AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))),
            _n_params(CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))),
        ]
        if "text_encoder_2" in index:
            config_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            sizes.append(_n_params(CLIPTextModelWithProjection(config_2)))
    assert tuple(sizes) == PUBLISHED_SIZES[name]


def test_config_folders_serve_from_single_file_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sd1: dict, sdxl: dict
) -> None:
    """from_single_file(config=<bundled folder>) takes scheduler and tokenizers from the folder, no hub."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = tmp_path / "placeholder.safetensors"
    save_file({"model.diffusion_model.placeholder": torch.zeros(1)}, str(checkpoint))
    models = {k: sd1[k] for k in ("unet", "vae", "text_encoder")}
    for family, prediction, pad_id in [("sd1", "epsilon", 49407), ("sd2", "v_prediction", 0)]:
        pipe = StableDiffusionPipeline.from_single_file(
            str(checkpoint), config=str(offline.config_folder(family)), local_files_only=True, **models,
            **offline.config_folder_tokenizers(offline.config_folder(family)))
        assert pipe.scheduler.config.prediction_type == prediction
        assert pipe.tokenizer.pad_token_id == pad_id and pipe.safety_checker is None
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(offline.config_folder("sdxl")), local_files_only=True,
        **{k: sdxl[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2")},
        **offline.config_folder_tokenizers(offline.config_folder("sdxl")))
    assert (pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id) == (49407, 0)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_tiny_tokenizer_keeps_real_clip_ids_below_1000(clip_l) -> None:
    small = tiny.tiny_tokenizer("l")
    assert len(small) == 1000 and (small.bos_token_id, small.eos_token_id, small.pad_token_id) == (998, 999, 999)
    ids = small("a photo of a cat").input_ids
    assert max(ids) == 999 and ids[1] == clip_l("a").input_ids[1] == 320
    assert tiny.tiny_tokenizer("g").pad_token_id == 0


def test_tiny_sd1_components_run_a_forward_pass(sd1: dict) -> None:
    c = sd1
    ids = c["tokenizer"](["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = c["text_encoder"](ids).last_hidden_state
        latents = c["vae"].encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        out = c["unet"](latents, torch.tensor([10]), encoder_hidden_states=hidden).sample
        image = c["vae"].decode(out).sample
    assert hidden.shape == (1, 77, 32) and latents.shape == (1, 4, 8, 8)
    assert out.shape == latents.shape and image.shape == (1, 3, 64, 64)


def test_tiny_sdxl_components_run_a_forward_pass(sdxl: dict) -> None:
    c = sdxl
    kw = {"padding": "max_length", "max_length": 77, "return_tensors": "pt"}
    with torch.no_grad():
        h1 = c["text_encoder"](c["tokenizer"](["a cat"], **kw).input_ids, output_hidden_states=True)
        out2 = c["text_encoder_2"](c["tokenizer_2"](["a cat"], **kw).input_ids, output_hidden_states=True)
        context = torch.cat([h1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        sample = c["unet"](torch.zeros(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=context,
                           added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids}).sample
    assert context.shape == (1, 77, 96) and out2.text_embeds.shape == (1, 32) and sample.shape == (1, 4, 8, 8)


def test_save_tiny_sd1_loads_back_offline(tmp_path: Path, sd1: dict) -> None:
    """Same seed, same weights: the saved folder reloads to exactly the built components."""
    from diffusers import StableDiffusionPipeline

    folder = tiny.save_tiny_sd1(tmp_path / "tiny-sd1", seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        saved, built = pipe.components[name].state_dict(), sd1[name].state_dict()
        assert saved.keys() == built.keys() and all(torch.equal(saved[k], built[k]) for k in built), name
    assert pipe.tokenizer("a cat").input_ids == sd1["tokenizer"]("a cat").input_ids
    assert pipe.safety_checker is None


def test_save_tiny_sdxl_loads_back_offline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    folder = tiny.save_tiny_sdxl(tmp_path / "tiny-sdxl", seed=1)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.text_encoder_2.config.hidden_size == 64
    assert pipe.unet.config.addition_embed_type == "text_time"
