"""The Flux.1 model of a run: the transformer with a peft LoRA (the frozen base in the weight dtype, fp32
adapters), conditioned on T5 per-token states + CLIP-L's pooled output (+ the guidance value for dev), on
16-channel VAE latents with Flux's shift and scale, packed into 2x2 patches with position ids as FluxPipeline
does (its own static helpers)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import RunConfig
from ..bundle import ModelBundle
from ..registry import get_family
from ..split_files import file_stamps as _file_stamps
from ..trained_state import load_trained_state, trained_state
from ..transformer_parts import load_options, prepare_transformer
from ..transformer_parts import optional_path as _path
from ..transformer_parts import weight_dtype as _weight_dtype
from .files import VARIANT_FAMILIES, FluxComponents, load_flux_components

# peft target_modules (regexes) of the transformer LoRA, per lora.targets
_DOUBLE_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_SINGLE_ATTN = r"attn\.(to_q|to_k|to_v)"
LORA_TARGETS: dict[str, str] = {
    # attention q/k/v/out of the double blocks (image and text streams) and q/k/v of the single blocks
    "attention": rf"^(transformer_blocks\.\d+\.{_DOUBLE_ATTN}|single_transformer_blocks\.\d+\.{_SINGLE_ATTN})$",
    # + the MLPs: double blocks' ff / ff_context, single blocks' proj_mlp and proj_out (as the peers train)
    "attention_ff": (rf"^(transformer_blocks\.\d+\.({_DOUBLE_ATTN}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
                     rf"|single_transformer_blocks\.\d+\.({_SINGLE_ATTN}|proj_mlp|proj_out))$"),
    # + the modulation linears: every linear layer of every block (sd-scripts' default for Flux)
    "all": (rf"^(transformer_blocks\.\d+\.({_DOUBLE_ATTN}|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)"
            rf"|norm1\.linear|norm1_context\.linear)"
            rf"|single_transformer_blocks\.\d+\.({_SINGLE_ATTN}|proj_mlp|proj_out|norm\.linear))$"),
}
DEFAULT_T5_LENGTH = {"dev": 512, "schnell": 256}


def pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, h * 8, w * 8, 8)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)


class FluxDenoiser(nn.Module):
    """The transformer as forward(x_t [B, C, H, W], t [B] in [0, 1], cond) -> velocity [B, C, H, W];
    cond = {"states": T5 states, "pooled": CLIP-L pooled (, "guidance": [B])}."""

    def __init__(self, transformer: nn.Module, weight_dtype: torch.dtype = torch.float32,
                 text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.weight_dtype = weight_dtype
        if text_encoder is not None:  # CLIP-L trains (lora.text_encoder): run here, with gradients
            self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        _, _, h, w = noisy.shape
        dtype = self.weight_dtype
        states = cond["states"].to(dtype)
        guidance = cond.get("guidance")
        pooled = cond["pooled"] if "clip_ids" not in cond else \
            self.text_encoder(cond["clip_ids"], output_hidden_states=False).pooler_output
        out = self.transformer(
            hidden_states=pack(noisy).to(dtype), timestep=timesteps.to(dtype),
            guidance=guidance.to(dtype) if guidance is not None else None,
            pooled_projections=pooled.to(dtype), encoder_hidden_states=states,
            txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(h, w, noisy.device, dtype), return_dict=False)[0]
        return unpack(out, h, w).to(noisy.dtype)


class FluxBundle(ModelBundle):
    components: FluxComponents
    weight_dtype: torch.dtype
    t5_length: int
    train_guidance: float | None  # dev: the guidance value fed while training (flow.guidance)
    train_text: bool = False  # a CLIP-L LoRA trains (lora.text_encoder); T5 stays frozen
    lora: bool = True  # False: a full fine-tune of the transformer

    def text_encoders(self) -> dict[str, nn.Module]:
        """name -> the text encoder that trains (CLIP-L's LoRA), as the SD bundles answer it."""
        return {"text_encoder": self.components.text_encoder}

    # -- conditioning -----------------------------------------------------------------------------------
    @torch.no_grad()
    def text_features(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """T5 per-token states and CLIP-L's pooled output: what the text-embedding cache stores."""
        c = self.components
        clip_ids = c.tokenizer(captions, padding="max_length", truncation=True, max_length=c.tokenizer.model_max_length,
                               return_tensors="pt").input_ids.to(device)
        t5_ids = c.tokenizer_2(captions, padding="max_length", truncation=True, max_length=self.t5_length,
                               return_tensors="pt").input_ids.to(device)
        pooled = c.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        states = c.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return {"states": states, "pooled": pooled}

    def assemble(self, features: dict[str, torch.Tensor], device: torch.device, sizes: Any = None
                 ) -> dict[str, torch.Tensor]:
        out = {"states": features["states"].to(device, self.weight_dtype),
               "pooled": features["pooled"].to(device, self.weight_dtype)}
        if self.train_guidance is not None:
            out["guidance"] = torch.full((out["states"].shape[0],), self.train_guidance, device=device)
        return out

    def encode_captions(self, captions: list[str], device: torch.device, sizes: Any = None) -> dict[str, torch.Tensor]:
        return self.assemble(self.text_features(captions, device), device)

    def clip_ids(self, captions: list[str], device: torch.device) -> torch.Tensor:
        tok = self.components.tokenizer
        return tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids.to(device)

    def encode_batch(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning of a training batch; with a CLIP-L LoRA its token ids, so FluxDenoiser.forward runs
        CLIP-L with gradients (T5's states are computed here, frozen)."""
        if not self.train_text:
            return self.encode_captions(batch["captions"], device)
        captions = batch["captions"]
        with torch.no_grad():
            ids = self.components.tokenizer_2(captions, padding="max_length", truncation=True,
                                              max_length=self.t5_length, return_tensors="pt").input_ids.to(device)
            states = self.components.text_encoder_2(ids, output_hidden_states=False)[0]
        out = {"states": states.to(device, self.weight_dtype), "clip_ids": self.clip_ids(captions, device)}
        if self.train_guidance is not None:
            out["guidance"] = torch.full((len(captions),), self.train_guidance, device=device)
        return out

    @staticmethod
    def batch_sizes(batch: dict[str, Any]) -> None:
        return None

    def text_encoder_identity(self) -> str:
        c = self.components
        parts = [c.sources.get("text_encoder", ""), c.sources.get("text_encoder_2", ""), str(self.weight_dtype),
                 str(self.t5_length), json.dumps(c.text_encoder.config.to_dict(), sort_keys=True, default=str),
                 json.dumps(c.text_encoder_2.config.to_dict(), sort_keys=True, default=str)]
        parts += _file_stamps(c.sources.get("text_encoder", "")) + _file_stamps(c.sources.get("text_encoder_2", ""))
        return f"text-flux-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}"

    # -- latents ----------------------------------------------------------------------------------------
    def encoder_identity(self) -> str:
        vae = self.components.vae
        parts = [self.components.sources.get("vae", ""), str(vae.dtype),
                 json.dumps(dict(vae.config), sort_keys=True, default=str)]
        parts += _file_stamps(self.components.sources.get("vae", ""))
        return f"vae-flux-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}"

    @torch.no_grad()
    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        mean = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        return ((mean - vae.config.shift_factor) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        return vae.decode((x / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)).sample.float()

    # -- checkpoints ------------------------------------------------------------------------------------
    def _trained_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"transformer": self.components.transformer}
        if self.train_text:
            modules["text_encoder"] = self.components.text_encoder
        return modules

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """"transformer.<key>" (+ "text_encoder.<key>" with a CLIP-L LoRA): the peft adapter tensors, or the
        whole transformer of a full fine-tune."""
        return trained_state(self._trained_modules(), lora=self.lora)

    def load_trainable_state(self, weights: dict[str, torch.Tensor], source: Path) -> None:
        load_trained_state(self._trained_modules(), weights, source, lora=self.lora,
                           title=self.model_family.short_title, hint="was lora.text_encoder changed?")

    def save_extra(self, folder: Path) -> None:
        (folder / "model.json").write_text(json.dumps(self.architecture, indent=1), encoding="utf-8")


def load_components(config: RunConfig, device: torch.device | None = None) -> FluxComponents:
    """The model's files; for a run on ``device`` the transformer loads as ``load_options`` says."""
    m = config.model
    return load_flux_components(Path(m.path).expanduser(), config_folder=_path(m.config_folder),
                                vae_path=_path(m.vae_path), text_encoder_path=_path(m.text_encoder_path),
                                text_encoder_2_path=_path(m.text_encoder_2_path),
                                transformer_options=load_options(config, device) if device else None)


def make_bundle(comps: FluxComponents, config: RunConfig, device: torch.device, *, lora: bool,
                denoiser_device: torch.device | None = None, full: bool = False) -> FluxBundle:
    """The bundle around loaded components: frozen parts in the weight dtype, a seeded peft adapter (fp32) when
    ``lora``, the whole transformer trainable in fp32 when ``full`` (a full fine-tune); the transformer on
    ``denoiser_device`` (default ``device``; the CPU when block swap places it)."""
    family = get_family(VARIANT_FAMILIES[comps.variant])
    wdtype = _weight_dtype(config, device)
    transformer = comps.transformer
    prepare_transformer(transformer, (comps.vae, comps.text_encoder, comps.text_encoder_2), config, device, wdtype,
                        LORA_TARGETS[config.lora.targets], lora=lora, full=full, denoiser_device=denoiser_device)
    if lora and config.lora.text_encoder:
        _add_clip_lora(comps.text_encoder, config)
    guided = bool(transformer.config.guidance_embeds)
    t5_length = config.model.t5_max_length or DEFAULT_T5_LENGTH[comps.variant]
    latent_down = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    arch = {"family": family.name, "base": str(Path(config.model.path).expanduser().resolve()),
            "sources": comps.sources, "lora": config.lora.model_dump() if lora else None,
            "prediction_type": "flow", "patch_size": 2, "t5_max_length": t5_length,
            "guidance_embeds": guided,
            "inner_dim": int(transformer.config.num_attention_heads) * int(transformer.config.attention_head_dim),
            "num_layers": int(transformer.config.num_layers),
            "num_single_layers": int(transformer.config.num_single_layers)}
    train_text = bool(lora and config.lora.text_encoder)
    if train_text:
        from ..adapters import text_lora_targets

        arch["train_text_encoder"] = True
        arch["text_encoder_lora_targets"] = {"text_encoder": text_lora_targets(config.lora.targets)}
    bundle = FluxBundle(family=family.name,
                        trainable=FluxDenoiser(transformer, wdtype, comps.text_encoder if train_text else None),
                        save_modules={"transformer": transformer}, prediction_type="flow",
                        in_channels=int(comps.vae.config.latent_channels),
                        sample_size=config.data.resolution // latent_down, architecture=arch,
                        tokenizer=comps.tokenizer)
    bundle.components = comps
    bundle.weight_dtype = wdtype
    bundle.t5_length = t5_length
    bundle.train_guidance = float(config.flow.guidance) if guided else None
    bundle.train_text = train_text
    bundle.lora = lora
    return bundle


def _add_clip_lora(text_encoder: nn.Module, config: RunConfig) -> None:
    """CLIP-L's LoRA (lora.text_encoder): injected in place (adapter "default", seeded, fp32 adapters), on the
    layers the SD families' text-encoder LoRA uses (q / k / v / out, + the MLP)."""
    from peft import inject_adapter_in_model

    from ..adapters import peft_adapter_config, text_lora_targets

    torch.manual_seed(config.train.seed + 1)
    inject_adapter_in_model(peft_adapter_config(config.lora.model_dump(), text_lora_targets(config.lora.targets)),
                            text_encoder, adapter_name="default")
    for p in text_encoder.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    text_encoder.train()


def build_flux_model(config: RunConfig, device: torch.device, *,
                     denoiser_device: torch.device | None = None) -> FluxBundle:
    return make_bundle(load_components(config, device), config, device, lora=config.lora.enabled,
                       full=not config.lora.enabled, denoiser_device=denoiser_device)
