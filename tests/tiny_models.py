"""Tiny Stable Diffusion models in the real SD1.x / SDXL topologies, for tests (CPU, seconds, no downloads).

Test-only (not shipped in the package); benchmarks/gpu_train.py --tiny loads this file by path. The shapes:
a four-level SD1 UNet and VAE, so they still convert to and from the original single-file layout exactly
(two-level test UNets do not), and a two-level SDXL UNet with the text_time additional embedding. The
tokenizer is the real CLIP BPE cut to 1000 tokens: the 512 byte tokens and the first 486 merges of
resources/tokenizers/clip keep their real ids, and <|startoftext|> / <|endoftext|> become 998 / 999.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from sdstudio.core.models.sd.offline import clip_tokenizer_folder

TINY_VOCAB = 1000
TINY_TEXT_HIDDEN = 32
# SDXL's second encoder must differ in width from the first: diffusers' single-file loader tells the two
# SDXL text encoders apart by their hidden size and would load CLIP-L weights into both if they matched.
TINY_TEXT2_HIDDEN = 64
TINY_POOLED = 32  # projection_dim of the tiny text_encoder_2 (SDXL's pooled embedding)
TINY_TIME_EMBED = 8  # addition_time_embed_dim of the tiny SDXL UNet
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "steps_offset": 1}


def write_tiny_tokenizer(folder: Path, pad: Literal["l", "g"] = "l") -> Path:
    """Write vocab.json / merges.txt / configs of the 1000-token CLIP tokenizer into folder.

    pad "l" pads with <|endoftext|> (CLIP-L, SD1 / SDXL tokenizer); "g" pads with "!" (SDXL tokenizer_2).
    """
    source = clip_tokenizer_folder("l")
    n_merges = TINY_VOCAB - 512 - 2
    merges = (source / "merges.txt").read_text(encoding="utf-8").split("\n")[1 : n_merges + 1]
    full_vocab: dict[str, int] = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    vocab = {token: i for token, i in full_vocab.items() if i < 512 + n_merges}
    vocab[BOS], vocab[EOS] = TINY_VOCAB - 2, TINY_VOCAB - 1
    pad_token = EOS if pad == "l" else "!"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
              "clean_up_tokenization_spaces": False}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def tiny_tokenizer(pad: Literal["l", "g"] = "l"):  # -> transformers.CLIPTokenizer
    """The 1000-token CLIP tokenizer, loaded the way a real one is (from a folder)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="sdstudio-tiny-tok-") as tmp:
        return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(tmp), pad))


def tiny_text_config(hidden: int = TINY_TEXT_HIDDEN, projection: int = TINY_TEXT_HIDDEN):
    """A CLIPTextConfig with 5 layers and 4 heads over the 1000-token vocabulary (ids as the real configs)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=5,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection, hidden_act="quick_gelu",
        # eos_token_id 2 as in the published SD configs: pooling then takes the highest id (EOS = 999)
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64, scaling_factor=scaling_factor,
    )


def _scheduler(name: Literal["pndm", "euler"], prediction_type: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    if name == "pndm":
        return PNDMScheduler(**SCALED_LINEAR, skip_prk_steps=True, set_alpha_to_one=False,
                             prediction_type=prediction_type)
    return EulerDiscreteScheduler(**SCALED_LINEAR, timestep_spacing="leading", prediction_type=prediction_type)


def tiny_sd1_components(seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer, scheduler of a tiny SD1.x-topology model (global RNG untouched)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
            cross_attention_dim=TINY_TEXT_HIDDEN, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_text_config())
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder.eval(), "tokenizer": tiny_tokenizer("l"),
            "scheduler": _scheduler("pndm", prediction_type)}


def tiny_sdxl_components(seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
    """unet, vae, text_encoder(_2), tokenizer(_2), scheduler of a tiny SDXL-topology model (global RNG untouched)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
            # SDXL feeds the two encoders' hidden states concatenated
            cross_attention_dim=TINY_TEXT_HIDDEN + TINY_TEXT2_HIDDEN,
            addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_EMBED,
            projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED + TINY_POOLED,
        )
        vae = tiny_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(tiny_text_config())
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(TINY_TEXT2_HIDDEN, TINY_POOLED))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder.eval(), "text_encoder_2": text_encoder_2.eval(),
            "tokenizer": tiny_tokenizer("l"), "tokenizer_2": tiny_tokenizer("g"),
            "scheduler": _scheduler("euler", prediction_type)}


def save_tiny_sd1(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD1.x diffusers pipeline folder (StableDiffusionPipeline.save_pretrained)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd1_components(seed, prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def save_tiny_sdxl(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SDXL diffusers pipeline folder (StableDiffusionXLPipeline.save_pretrained)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed, prediction_type), add_watermarker=False)
    pipe.save_pretrained(folder)
    return Path(folder)
