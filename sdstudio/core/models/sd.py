"""The Stable Diffusion families (SD1.x, SD2.x, SDXL): a latent UNet fine-tuned fully or through a peft
LoRA, with the frozen VAE and text encoders kept out of the optimizer, in the dtypes sd-training.md asks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from .bundle import ModelBundle
from .sd_files import SDComponents, load_sd_components

LORA_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj", "conv"],
}


class SDDenoiser(nn.Module):
    """The UNet as forward(noisy, t, cond) with cond = encoder states (+ SDXL's pooled text and time ids)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        added = None
        if "text_embeds" in cond:
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                         added_cond_kwargs=added).sample


class SDBundle(ModelBundle):
    components: SDComponents
    weight_dtype: torch.dtype
    lora: bool

    # -- conditioning -----------------------------------------------------------------------------------
    @torch.no_grad()
    def text_features(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """What the frozen text encoder(s) make of captions: per-token states (+ SDXL's pooled embedding).
        This is the part a text-embedding cache stores."""
        c = self.components
        ids = _tokenize(c.tokenizer, captions).to(device)
        if c.family != "sdxl":
            return {"states": c.text_encoder(ids)[0]}
        ids2 = _tokenize(c.tokenizer_2, captions).to(device)
        out1 = c.text_encoder(ids, output_hidden_states=True)
        out2 = c.text_encoder_2(ids2, output_hidden_states=True)
        return {"states": torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), "pooled": out2[0]}

    def assemble(self, features: dict[str, torch.Tensor], device: torch.device,
                 sizes: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] | None = None
                 ) -> dict[str, torch.Tensor]:
        """UNet conditioning from text features (+ SDXL's time ids: original size, crop, target size)."""
        states = features["states"].to(device, self.weight_dtype)
        if self.components.family != "sdxl":
            return {"encoder_hidden_states": states}
        side = self.sample_size * 8
        sizes = sizes or [((side, side), (0, 0), (side, side))] * states.shape[0]
        time_ids = torch.tensor([[*o, *crop, *t] for o, crop, t in sizes], dtype=torch.float32, device=device)
        return {"encoder_hidden_states": states, "text_embeds": features["pooled"].to(device, self.weight_dtype),
                "time_ids": time_ids.to(self.weight_dtype)}

    def encode_captions(self, captions: list[str], device: torch.device,
                        sizes: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] | None = None
                        ) -> dict[str, torch.Tensor]:
        return self.assemble(self.text_features(captions, device), device, sizes)

    @staticmethod
    def batch_sizes(batch: dict[str, Any]) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] | None:
        if "original_size" not in batch:
            return None
        return [(tuple(int(v) for v in o), tuple(int(v) for v in c), tuple(int(v) for v in t))  # type: ignore[misc]
                for o, c, t in zip(batch["original_size"], batch["crop_top_left"], batch["target_size"])]

    def encode_batch(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        sizes = self.batch_sizes(batch) if self.components.family == "sdxl" else None
        return self.encode_captions(batch["captions"], device, sizes)

    def text_encoder_identity(self) -> str:
        """The text encoder(s): base model files, configs and dtype (the text cache's namespace)."""
        import hashlib

        c = self.components
        parts = [self.architecture.get("base", ""), str(self.weight_dtype),
                 json.dumps(c.text_encoder.config.to_dict(), sort_keys=True, default=str), str(len(c.tokenizer))]
        if c.text_encoder_2 is not None:
            parts.append(json.dumps(c.text_encoder_2.config.to_dict(), sort_keys=True, default=str))
        parts += _file_stamps(self.architecture.get("base", ""))
        return f"text-{self.family}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}"

    # -- latents ----------------------------------------------------------------------------------------
    def encoder_identity(self) -> str:
        """The VAE: its source files (path, size, mtime), its config and dtype."""
        import hashlib

        vae = self.components.vae
        parts = [self.architecture.get("base", ""), self.architecture.get("vae", ""), str(vae.dtype),
                 json.dumps(dict(vae.config), sort_keys=True, default=str)]
        for source in (self.architecture.get("base", ""), self.architecture.get("vae", "")):
            parts += _file_stamps(source)
        digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
        return f"vae-{self.family}-{digest}"

    @torch.no_grad()
    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        # the mean, not a sample: deterministic (exact resume) and identical to what a latent cache stores
        return (dist.mode() * vae.config.scaling_factor).float()

    @torch.no_grad()
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        return vae.decode((x / vae.config.scaling_factor).to(vae.dtype)).sample.float()

    # -- checkpoints ------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        unet = self.components.unet
        if self.lora:
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(unet)
        else:
            state = unet.state_dict()
        return {f"unet.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}

    def load_trainable_state(self, weights: dict[str, torch.Tensor], source: Path) -> None:
        from ..errors import CheckpointError

        sub = {k[len("unet."):]: v for k, v in weights.items() if k.startswith("unet.")}
        unet = self.components.unet
        if self.lora:
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(unet, sub)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise CheckpointError(f"{source}: LoRA weights do not fit this model ({unexpected[:3]}); were "
                                      "lora.rank/targets changed?")
        else:
            try:
                unet.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{source}: weights do not fit this UNet ({str(exc).splitlines()[0]})") from None

    def save_extra(self, folder: Path) -> None:
        (folder / "model.json").write_text(json.dumps(self.architecture, indent=1), encoding="utf-8")


def _file_stamps(source: str) -> list[str]:
    """path:size:mtime of a model file, or of every weights file in a model folder."""
    if not source:
        return []
    path = Path(source)
    files = sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.bin")) if path.is_dir() else [path]
    return [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]


def _tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def _weight_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision, torch.float32)


def build_sd_model(config: RunConfig, device: torch.device) -> SDBundle:
    m = config.model
    comps = load_sd_components(Path(m.path).expanduser(), family=m.family,
                               config_folder=Path(m.config_folder).expanduser() if m.config_folder else None,
                               vae_path=Path(m.vae_path).expanduser() if m.vae_path else None,
                               prediction_override=m.prediction_type)
    wdtype = _weight_dtype(config, device)
    for module in (comps.vae, comps.text_encoder, comps.text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    comps.text_encoder.to(device, dtype=wdtype)
    if comps.text_encoder_2 is not None:
        comps.text_encoder_2.to(device, dtype=wdtype)
    # SDXL's VAE overflows in fp16 (NaN latents): fp32 there unless bf16 was asked for.
    vae_dtype = torch.float32 if (comps.family == "sdxl" and wdtype == torch.float16) else wdtype
    comps.vae.to(device, dtype=vae_dtype)
    unet = comps.unet
    lora = config.lora.enabled
    if lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, dtype=wdtype)
        torch.manual_seed(config.train.seed)
        unet.add_adapter(LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha,
                                    lora_dropout=config.lora.dropout, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS[config.lora.targets]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable parameters are always fp32
    else:
        unet.requires_grad_(True)
        unet.to(device, dtype=torch.float32)
    unet.train()
    arch = {"family": comps.family, "base": str(Path(m.path).expanduser().resolve()),
            "vae": str(Path(m.vae_path).expanduser().resolve()) if m.vae_path else "", "lora": config.lora.model_dump() if lora else None,
            "prediction_type": comps.prediction_type, "zero_terminal_snr": comps.zero_terminal_snr,
            "layers_per_block": int(unet.config.layers_per_block)}
    bundle = SDBundle(family=comps.family, trainable=SDDenoiser(unet), save_modules={"unet": unet},
                      prediction_type=comps.prediction_type, in_channels=int(unet.config.in_channels),
                      sample_size=config.data.resolution // 8, architecture=arch, tokenizer=comps.tokenizer)
    bundle.components = comps
    bundle.weight_dtype = wdtype
    bundle.lora = lora
    return bundle
