"""Regenerate the weightless diffusers config folders in resources/models/ (SD1.5, SD2.1, SDXL base).

``from_single_file(path, config=<folder>, local_files_only=True)`` needs a local diffusers-format folder for
the model family, or diffusers goes to the hub for it. These folders hold only configs:
``model_index.json``, ``scheduler/``, ``unet/``, ``vae/``, ``text_encoder/`` (+ ``text_encoder_2/``),
``tokenizer/`` (+ ``tokenizer_2/``). The values are the published configs of the original repositories
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-2-1-base,
stabilityai/stable-diffusion-xl-base-1.0), written out here by hand so nothing is downloaded. Differences from
the published files: no safety checker / feature extractor (sdstudio never loads them) and no version stamps.

The tokenizer subfolders get only tokenizer_config.json and special_tokens_map.json, copied from
resources/tokenizers/ (see scripts/make_clip_tokenizer.py; run that first): CLIP's BPE files exist once, in
resources/tokenizers/clip/, and sdstudio passes the tokenizers to ``from_single_file`` itself
(sdstudio.core.models.sd.offline.config_folder_tokenizers).
Run from anywhere: ``python scripts/make_model_configs.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "resources" / "models"
TOKENIZERS_DIR = REPO_ROOT / "resources" / "tokenizers"
BPE_FILES = ("vocab.json", "merges.txt")  # in resources/tokenizers/clip/ only
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")

Config = dict[str, Any]

# ---------------------------------------------------------------------------------------------- shared parts

SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
SDXL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
SDXL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]

UNET_COMMON: Config = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
}

SCALED_LINEAR: Config = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def vae_config(sample_size: int, scaling_factor: float, force_upcast: bool) -> Config:
    """The SD VAE (the same architecture in SD1, SD2 and SDXL)."""
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": force_upcast,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def clip_text_config(
    architecture: str, hidden: int, layers: int, heads: int, intermediate: int, act: str, projection: int
) -> Config:
    """A CLIPTextConfig as the published SD text encoders carry it.

    eos_token_id stays 2 as published: transformers then pools at the highest id (49407, the real EOS),
    the behaviour the SD checkpoints were trained with.
    """
    return {
        "architectures": [architecture],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection,
        "torch_dtype": "float32",
        "vocab_size": 49408,
    }


# CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14): SD1.x, and SDXL's first encoder
CLIP_L = clip_text_config("CLIPTextModel", 768, 12, 12, 3072, "quick_gelu", 768)
# OpenCLIP ViT-H/14 text tower with its last layer dropped (SD2.x uses the penultimate layer): 23 of 24
OPENCLIP_H = clip_text_config("CLIPTextModel", 1024, 23, 16, 4096, "gelu", 512)
# OpenCLIP ViT-bigG/14 text tower with its projection: SDXL's second encoder
OPENCLIP_BIGG = clip_text_config("CLIPTextModelWithProjection", 1280, 32, 20, 5120, "gelu", 1280)

SD_PIPELINE_EXTRAS: Config = {
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
}


def sd_model_index(scheduler_class: str) -> Config:
    return {
        "_class_name": "StableDiffusionPipeline",
        **SD_PIPELINE_EXTRAS,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# ------------------------------------------------------------------------------------------------ families


def sd15() -> dict[str, Config | str]:
    """runwayml/stable-diffusion-v1-5 (epsilon, 512 px)."""
    return {
        "model_index.json": sd_model_index("PNDMScheduler"),
        "scheduler": {"_class_name": "PNDMScheduler", **SCALED_LINEAR, "prediction_type": "epsilon"},
        "unet": {
            **UNET_COMMON,
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 768,
            "down_block_types": SD_DOWN,
            "sample_size": 64,
            "up_block_types": SD_UP,
        },
        "vae": vae_config(512, 0.18215, force_upcast=True),
        "text_encoder": CLIP_L,
        "tokenizer": "clip",
    }


def _sd21_unet(sample_size: int, upcast_attention: bool) -> Config:
    return {
        **UNET_COMMON,
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "down_block_types": SD_DOWN,
        "sample_size": sample_size,
        "up_block_types": SD_UP,
        "upcast_attention": upcast_attention,
        "use_linear_projection": True,
    }


def sd21_768_v() -> dict[str, Config | str]:
    """stabilityai/stable-diffusion-2-1 (v-prediction, 768 px; attention upcast to fp32 as published)."""
    return {
        "model_index.json": sd_model_index("DDIMScheduler"),
        "scheduler": {"_class_name": "DDIMScheduler", **SCALED_LINEAR, "prediction_type": "v_prediction"},
        "unet": _sd21_unet(96, upcast_attention=True),
        "vae": vae_config(768, 0.18215, force_upcast=True),
        "text_encoder": OPENCLIP_H,
        "tokenizer": "clip-g",
    }


def sd2_base() -> dict[str, Config | str]:
    """stabilityai/stable-diffusion-2-1-base (epsilon, 512 px)."""
    return {
        "model_index.json": sd_model_index("PNDMScheduler"),
        "scheduler": {"_class_name": "PNDMScheduler", **SCALED_LINEAR, "prediction_type": "epsilon"},
        "unet": _sd21_unet(64, upcast_attention=False),
        "vae": vae_config(512, 0.18215, force_upcast=True),
        "text_encoder": OPENCLIP_H,
        "tokenizer": "clip-g",
    }


def sdxl_base() -> dict[str, Config | str]:
    """stabilityai/stable-diffusion-xl-base-1.0 (epsilon, 1024 px)."""
    return {
        "model_index.json": {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "scheduler": {
            "_class_name": "EulerDiscreteScheduler",
            **SCALED_LINEAR,
            "interpolation_type": "linear",
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "timestep_spacing": "leading",
            "use_karras_sigmas": False,
        },
        "unet": {
            **UNET_COMMON,
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "cross_attention_dim": 2048,
            "down_block_types": SDXL_DOWN,
            # 2816 = 1280 (pooled bigG embedding) + 6 time ids x 256
            "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": SDXL_UP,
            "use_linear_projection": True,
        },
        # the SDXL VAE overflows in fp16: force_upcast makes diffusers decode it in fp32
        "vae": vae_config(1024, 0.13025, force_upcast=True),
        "text_encoder": CLIP_L,
        "text_encoder_2": OPENCLIP_BIGG,
        "tokenizer": "clip",
        "tokenizer_2": "clip-g",
    }


FAMILIES = {"sd15": sd15, "sd21-768-v": sd21_768_v, "sd2-base": sd2_base, "sdxl-base": sdxl_base}

CONFIG_FILE = {
    "scheduler": "scheduler_config.json",
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
}


def _write_json(path: Path, data: Config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_family(folder: Path, parts: dict[str, Config | str], tokenizers_dir: Path = TOKENIZERS_DIR) -> None:
    """Write one config folder from scratch (an old folder is replaced)."""
    if folder.exists():
        shutil.rmtree(folder)
    for name, value in parts.items():
        if name == "model_index.json":
            _write_json(folder / name, value)  # type: ignore[arg-type]
        elif name.startswith("tokenizer"):
            source = tokenizers_dir / str(value)
            (folder / name).mkdir(parents=True)
            for file_name in TOKENIZER_FILES:
                shutil.copyfile(source / file_name, folder / name / file_name)
        else:
            _write_json(folder / name / CONFIG_FILE[name], value)  # type: ignore[arg-type]


def main() -> int:
    missing = [f for f in (*BPE_FILES, *TOKENIZER_FILES) if not (TOKENIZERS_DIR / "clip" / f).is_file()]
    if missing:
        raise SystemExit(f"{TOKENIZERS_DIR / 'clip'} lacks {missing}: run scripts/make_clip_tokenizer.py first")
    for name, build in FAMILIES.items():
        write_family(MODELS_DIR / name, build())
        print(f"wrote {MODELS_DIR / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
