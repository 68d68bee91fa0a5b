"""The Stable Diffusion families (SD1.x, SD2.x, SDXL): a latent UNet fine-tuned fully or through a peft
LoRA, optionally with the text encoder(s) trained too (fully, or through their own peft LoRA), and everything
frozen kept out of the optimizer, in the dtypes sd-training.md asks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import RunConfig
from ..adapters import TEXT_LORA_TARGETS, peft_adapter_config, text_lora_targets  # noqa: F401 - names kept here
from ..bundle import ModelBundle
from ..registry import get_family
from ..trained_state import load_trained_state, trained_state
from .files import SDComponents, load_sd_components

# Text-encoder LoRA targets (CLIP layers): the attention projections, all four (A1111 applies a LoRA on
# OpenCLIP's fused attention only when q/k/v/out are all present); with "attention_ff" / "all" also the MLP,
# which is what kohya's networks.lora trains by default (CLIPAttention + CLIPMLP).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
CLIP_WINDOW = 77  # CLIP's context: BOS + 75 tokens + EOS

Sizes = list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]


def _clip_text_model(text_encoder: nn.Module) -> nn.Module:
    """The module holding embeddings / encoder / final_layer_norm (transformers 5's CLIPTextModel is flat,
    CLIPTextModelWithProjection keeps a ``text_model`` level)."""
    return getattr(text_encoder, "text_model", text_encoder)


def text_lora_config(lora: dict[str, Any], target_modules: list[str] | str) -> Any:
    return peft_adapter_config(lora, target_modules)


def run_text_encoders(family: str, text_encoder: nn.Module, text_encoder_2: nn.Module | None, ids: torch.Tensor,
                      ids_2: torch.Tensor | None, clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """Per-token states (+ SDXL's pooled embedding) from token ids: SD1/SD2 the last hidden state (with
    ``clip_skip`` = k > 1: the k-th last, through the final layer norm, as A1111 / kohya); SDXL the
    penultimate hidden states of both encoders concatenated, pooled (projected) from the second.

    Ids longer than one CLIP window (``chunk_ids``: n windows of 77) are encoded window by window and joined
    as kohya does: the first window's BOS, every window's 75 inner tokens, the last window's last token;
    SDXL's pooled embedding comes from the first window."""
    if family != "sdxl":
        return {"states": _clip_states(text_encoder, ids, clip_skip, final_norm=True)}
    assert text_encoder_2 is not None and ids_2 is not None
    states1 = _clip_states(text_encoder, ids, 2, final_norm=False)
    states2, pooled = _clip_states(text_encoder_2, ids_2, 2, final_norm=False, pooled=True)
    return {"states": torch.cat([states1, states2], dim=-1), "pooled": pooled}


def _clip_states(text_encoder: nn.Module, ids: torch.Tensor, skip: int, *, final_norm: bool,
                 pooled: bool = False) -> Any:
    # one window: the encoder's context (77); longer ids are n windows of it (``_tokenize``)
    width = int(getattr(getattr(text_encoder, "config", None), "max_position_embeddings", CLIP_WINDOW))
    batch, n = ids.shape[0], (ids.shape[1] // width if ids.shape[1] > width else 1)
    flat = ids.reshape(batch * n, width) if n > 1 else ids
    if skip <= 1 and final_norm:
        out = text_encoder(flat)
        states = out[0]
    else:
        out = text_encoder(flat, output_hidden_states=True)
        states = out.hidden_states[-skip]
        if final_norm:
            states = _clip_text_model(text_encoder).final_layer_norm(states)
    if n > 1:
        states = states.reshape(batch, n, width, -1)
        states = torch.cat([states[:, 0, :1]] + [states[:, k, 1:width - 1] for k in range(n)]
                           + [states[:, n - 1, width - 1:]], dim=1)
    if not pooled:
        return states
    pool = out[0] if n == 1 else out[0].reshape(batch, n, -1)[:, 0]
    return states, pool


_TIME_ID_ROWS: dict[tuple[Any, ...], torch.Tensor] = {}  # (device, dtype, six sizes) -> the row on the device
_TIME_ID_ROWS_MAX = 65536  # distinct (image, crop, bucket) rows kept; a few MB at most


def _time_ids(sizes: Sizes | None, n: int, side: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL micro-conditioning: original size + crop top-left + target size, one row per image. Each distinct row
    is built once and kept on the device (a step stacks device rows: no host-to-device copy that would wait for
    the GPU); a new row is copied from pinned memory without blocking."""
    sizes = sizes or [((side, side), (0, 0), (side, side))] * n
    rows = []
    for o, crop, t in sizes:
        values = (*o, *crop, *t)
        key = (str(device), dtype, values)
        row = _TIME_ID_ROWS.get(key)
        if row is None:
            host = torch.tensor(values, dtype=torch.float32)
            if torch.device(device).type == "cuda":
                host = host.pin_memory()
            row = host.to(device, non_blocking=True).to(dtype)
            if len(_TIME_ID_ROWS) < _TIME_ID_ROWS_MAX:
                _TIME_ID_ROWS[key] = row
        rows.append(row)
    return torch.stack(rows)


class SDDenoiser(nn.Module):
    """The UNet as forward(noisy, t, cond) with cond = encoder states (+ SDXL's pooled text and time ids).

    When the text encoder(s) train they are attributes of this module (one module for accelerate / DDP, and the
    optimizer's text-encoder group finds them here); a training batch's cond then holds token ids
    (``input_ids`` (+ ``input_ids_2``, ``time_ids``)) and the encoders run inside forward, with gradients.
    Prompts for sampling arrive already encoded (``encoder_hidden_states``), as without text-encoder training.
    """

    def __init__(self, unet: nn.Module, text_encoders: dict[str, nn.Module] | None = None, *, family: str = "sd1",
                 weight_dtype: torch.dtype = torch.float32, clip_skip: int = 1) -> None:
        super().__init__()
        self.unet = unet
        for name, module in (text_encoders or {}).items():
            setattr(self, name, module)
        self.family = family
        self.weight_dtype = weight_dtype
        self.clip_skip = clip_skip

    def encode_tokens(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token ids -> UNet conditioning, through the trained text encoder(s) (with gradients)."""
        feats = run_text_encoders(self.family, self.text_encoder, getattr(self, "text_encoder_2", None),
                                  cond["input_ids"], cond.get("input_ids_2"), self.clip_skip)
        out = {"encoder_hidden_states": feats["states"].to(self.weight_dtype)}
        if self.family == "sdxl":
            out.update(text_embeds=feats["pooled"].to(self.weight_dtype), time_ids=cond["time_ids"])
        return out

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        if "input_ids" in cond:
            cond = self.encode_tokens(cond)
        added = None
        if "text_embeds" in cond:
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                         added_cond_kwargs=added).sample


class SDBundle(ModelBundle):
    components: SDComponents
    weight_dtype: torch.dtype
    lora: bool
    train_text: bool = False  # the text encoder(s) train (lora.text_encoder or train.train_text_encoder)
    clip_skip: int = 1  # model.clip_skip (SD1/SD2)
    max_token_length: int = 75  # data.max_token_length: tokens per caption (75 = one CLIP window)

    def text_encoders(self) -> dict[str, nn.Module]:
        """name -> text encoder module (text_encoder, and text_encoder_2 for SDXL)."""
        return _text_encoders(self.components)

    # -- conditioning -----------------------------------------------------------------------------------
    def token_ids(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        c = self.components
        out = {"input_ids": _tokenize(c.tokenizer, captions, self.max_token_length).to(device)}
        if c.family == "sdxl":
            out["input_ids_2"] = _tokenize(c.tokenizer_2, captions, self.max_token_length).to(device)
        return out

    @torch.no_grad()
    def text_features(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """What the text encoder(s) make of captions: per-token states (+ SDXL's pooled embedding).
        This is the part a text-embedding cache stores; with text-encoder training these are the trained
        encoders (a LoRA is injected in place, a full fine-tune trains these very modules)."""
        c = self.components
        ids = self.token_ids(captions, device)
        return run_text_encoders(c.family, c.text_encoder, c.text_encoder_2, ids["input_ids"],
                                 ids.get("input_ids_2"), self.clip_skip)

    def assemble(self, features: dict[str, torch.Tensor], device: torch.device, sizes: Sizes | None = None
                 ) -> dict[str, torch.Tensor]:
        """UNet conditioning from text features (+ SDXL's time ids: original size, crop, target size)."""
        states = features["states"].to(device, self.weight_dtype)
        if self.components.family != "sdxl":
            return {"encoder_hidden_states": states}
        return {"encoder_hidden_states": states, "text_embeds": features["pooled"].to(device, self.weight_dtype),
                "time_ids": _time_ids(sizes, states.shape[0], self.sample_size * 8, device, self.weight_dtype)}

    def encode_captions(self, captions: list[str], device: torch.device, sizes: Sizes | None = None
                        ) -> dict[str, torch.Tensor]:
        return self.assemble(self.text_features(captions, device), device, sizes)

    @staticmethod
    def batch_sizes(batch: dict[str, Any]) -> Sizes | None:
        if "original_size" not in batch:
            return None
        return [(tuple(int(v) for v in o), tuple(int(v) for v in c), tuple(int(v) for v in t))  # type: ignore[misc]
                for o, c, t in zip(batch["original_size"], batch["crop_top_left"], batch["target_size"])]

    def encode_batch(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning of a training batch; token ids (+ SDXL's time ids) when the text encoders train, so
        SDDenoiser.forward runs them with gradients."""
        sizes = self.batch_sizes(batch) if self.components.family == "sdxl" else None
        if not self.train_text:
            return self.encode_captions(batch["captions"], device, sizes)
        cond = self.token_ids(batch["captions"], device)
        if self.components.family == "sdxl":
            cond["time_ids"] = _time_ids(sizes, len(batch["captions"]), self.sample_size * 8, device,
                                         self.weight_dtype)
        return cond

    def text_encoder_identity(self) -> str:
        """The text encoder(s): base model files, configs and dtype (the text cache's namespace)."""
        import hashlib

        c = self.components
        parts = [self.architecture.get("base", ""), str(self.weight_dtype),
                 json.dumps(c.text_encoder.config.to_dict(), sort_keys=True, default=str), str(len(c.tokenizer))]
        if c.text_encoder_2 is not None:
            parts.append(json.dumps(c.text_encoder_2.config.to_dict(), sort_keys=True, default=str))
        parts += _file_stamps(self.architecture.get("base", ""))
        if self.clip_skip != 1 or self.max_token_length != 75:  # (absent at the defaults: older caches stay valid)
            parts.append(f"clip_skip={self.clip_skip}|max_token_length={self.max_token_length}")
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
    def _trained_modules(self) -> dict[str, nn.Module]:
        """prefix -> module whose trained weights a checkpoint stores."""
        modules: dict[str, nn.Module] = {"unet": self.components.unet}
        if self.train_text:
            modules.update(self.text_encoders())
        return modules

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """"unet.<key>" (+ "text_encoder.<key>", "text_encoder_2.<key>"): the peft adapter tensors of a LoRA
        run, the whole state dicts of a full fine-tune."""
        return trained_state(self._trained_modules(), lora=self.lora)

    def load_trainable_state(self, weights: dict[str, torch.Tensor], source: Path) -> None:
        load_trained_state(self._trained_modules(), weights, source, lora=self.lora,
                           title=self.model_family.short_title,
                           hint="were lora.text_encoder / train.train_text_encoder changed?")

    def save_extra(self, folder: Path) -> None:
        (folder / "model.json").write_text(json.dumps(self.architecture, indent=1), encoding="utf-8")


def _file_stamps(source: str) -> list[str]:
    """path:size:mtime of a model file, or of every weights file in a model folder."""
    if not source:
        return []
    path = Path(source)
    files = sorted(path.rglob("*.safetensors")) + sorted(path.rglob("*.bin")) if path.is_dir() else [path]
    return [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]


def _tokenize(tokenizer: Any, captions: list[str], max_tokens: int = 75) -> torch.Tensor:
    """Token ids, B x 77; with ``max_tokens`` > 75 (data.max_token_length), B x (n * 77): the caption's first
    ``max_tokens`` tokens cut into n windows of 75, each framed BOS ... EOS and padded (kohya's layout)."""
    width = tokenizer.model_max_length
    if max_tokens <= width - 2:
        return tokenizer(captions, padding="max_length", truncation=True, max_length=width,
                         return_tensors="pt").input_ids
    inner = width - 2
    windows = -(-max_tokens // inner)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for seq in tokenizer(captions, truncation=True, max_length=max_tokens + 2).input_ids:
        body = list(seq[1:-1])
        row: list[int] = []
        for k in range(windows):
            chunk = [bos, *body[k * inner:(k + 1) * inner], eos]
            row += chunk + [pad] * (width - len(chunk))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def _weight_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision, torch.float32)


def _text_encoders(comps: SDComponents) -> dict[str, nn.Module]:
    return {name: module for name in TEXT_ENCODERS if (module := getattr(comps, name)) is not None}


def _freeze_unused_clip_tail(text_encoder: nn.Module) -> None:
    """SDXL's first encoder contributes its penultimate hidden states only: its last layer and final norm never
    reach the loss. Freeze them (as kohya's sdxl_train does), so no parameter goes without a gradient (DDP)."""
    inner = _clip_text_model(text_encoder)
    inner.encoder.layers[-1].requires_grad_(False)
    inner.final_layer_norm.requires_grad_(False)


def _train_text_encoders(comps: SDComponents, config: RunConfig, device: torch.device, wdtype: torch.dtype,
                         lora: bool, plan: Any = None) -> dict[str, Any]:
    """Make the text encoder(s) trainable: a peft LoRA injected in place (adapter "default", seeded, fp32
    adapters on base weights in the weight dtype), or the whole encoder in fp32. Returns what model.json
    records: the LoRA target modules per encoder."""
    from peft import inject_adapter_in_model

    targets: dict[str, Any] = {}
    for index, (name, te) in enumerate(_text_encoders(comps).items()):
        # SDXL's first encoder: its last layer feeds nothing the UNet sees (penultimate states, no pooling)
        skip_last = comps.family == "sdxl" and name == "text_encoder"
        if lora:
            layers = len(_clip_text_model(te).encoder.layers)
            target = text_lora_targets(config.lora.targets, layers - 1 if skip_last else None)
            lora_dict, pattern = config.lora.model_dump(), None
            if plan is not None:  # lora.init_from: the file's modules, kind, ranks
                target, lora_dict, pattern = plan.targets(name), plan.lora_section(lora_dict), plan.rank_pattern.get(name)
                if not target:
                    continue
            te.requires_grad_(False)
            te.to(device, dtype=wdtype)
            torch.manual_seed(config.train.seed + 1 + index)  # seeded, one stream per encoder
            lora_config = peft_adapter_config(lora_dict, target, pattern)
            inject_adapter_in_model(lora_config, te, adapter_name="default")
            for p in te.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # trainable parameters are always fp32
            targets[name] = target
        else:
            te.to(device, dtype=torch.float32)
            te.requires_grad_(True)
            if skip_last:
                _freeze_unused_clip_tail(te)
        te.train()
    return targets


def _init_plan(config: RunConfig, comps: SDComponents) -> Any:
    """lora.init_from: what the file holds, matched to this model's layers (mismatches logged)."""
    import logging

    from ...lora_tools.init import plan_init

    parts = {"unet": comps.unet, **_text_encoders(comps)}
    plan = plan_init(config.lora.init_from, config.lora.model_dump(), parts, family=comps.family,
                     layers_per_block=int(comps.unet.config.layers_per_block))
    for note in plan.notes:
        logging.getLogger("sdstudio").warning("lora.init_from %s: %s", config.lora.init_from, note)
    return plan


def build_sd_model(config: RunConfig, device: torch.device, *, denoiser_device: torch.device | None = None) -> SDBundle:
    """``denoiser_device``: where a LoRA run's UNet goes (default ``device``); the CPU when the family places it
    itself (block swap: the swapped blocks stay in CPU memory)."""
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
    lora = config.lora.enabled
    train_text = config.lora.text_encoder if lora else config.train.train_text_encoder
    # a fully trained encoder goes to fp32 from the file's weights, never through the weight dtype (rounding)
    te_dtype = torch.float32 if (train_text and not lora) else wdtype
    comps.text_encoder.to(device, dtype=te_dtype)
    if comps.text_encoder_2 is not None:
        comps.text_encoder_2.to(device, dtype=te_dtype)
    # SDXL's VAE overflows in fp16 (NaN latents): fp32 there unless bf16 was asked for.
    vae_dtype = torch.float32 if (get_family(comps.family).vae_needs_fp32_for_fp16 and wdtype == torch.float16) \
        else wdtype
    comps.vae.to(device, dtype=vae_dtype)
    unet = comps.unet
    plan = None
    lora_section = config.lora.model_dump()
    if lora and config.lora.init_from:
        plan = _init_plan(config, comps)
        lora_section = plan.lora_section(lora_section)
    if lora:
        unet.requires_grad_(False)
        unet.to(denoiser_device or device, dtype=wdtype)
        torch.manual_seed(config.train.seed)
        if plan is None:
            unet.add_adapter(peft_adapter_config(lora_section,
                                                 get_family(comps.family).lora_targets[config.lora.targets]))
        else:
            unet.add_adapter(peft_adapter_config(lora_section, plan.targets("unet"), plan.rank_pattern.get("unet")))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable parameters are always fp32
        if m.quantize != "none":  # frozen base linears (peft's base layers included) stored in 8 / 4 bits
            from ..quantize import quantize_frozen_linears
            from .files import stored_fp8_unet_weights

            files = stored_fp8_unet_weights(Path(m.path).expanduser(), unet.config) if m.quantize == "fp8" else {}
            _count, kept = quantize_frozen_linears(unet, m.quantize, stored_fp8=files)
            if kept:
                logging.getLogger("sdstudio").info("model.quantize = 'fp8': %d linear layers keep the file's fp8 "
                                                   "weights as they are", kept)
    else:
        unet.requires_grad_(True)
        unet.to(device, dtype=torch.float32)
    unet.train()
    text_targets = _train_text_encoders(comps, config, device, wdtype, lora, plan) if train_text else {}
    if plan is not None:
        from ...lora_tools.init import load_plan

        load_plan(plan, {"unet": unet, **_text_encoders(comps)})
    arch = {"family": comps.family, "base": str(Path(m.path).expanduser().resolve()),
            "vae": str(Path(m.vae_path).expanduser().resolve()) if m.vae_path else "", "lora": lora_section if lora else None,
            "prediction_type": comps.prediction_type, "zero_terminal_snr": comps.zero_terminal_snr,
            "layers_per_block": int(unet.config.layers_per_block),
            "quantize": m.quantize}
    if train_text:
        arch["train_text_encoder"] = True
        if lora:
            arch["text_encoder_lora_targets"] = text_targets
    text_encoders = _text_encoders(comps) if train_text else {}
    bundle = SDBundle(family=comps.family,
                      trainable=SDDenoiser(unet, text_encoders, family=comps.family, weight_dtype=wdtype,
                                                   clip_skip=config.model.clip_skip),
                      save_modules={"unet": unet, **text_encoders},
                      prediction_type=comps.prediction_type, in_channels=int(unet.config.in_channels),
                      sample_size=config.data.resolution // 8, architecture=arch, tokenizer=comps.tokenizer)
    bundle.components = comps
    bundle.weight_dtype = wdtype
    bundle.lora = lora
    bundle.train_text = train_text
    bundle.clip_skip = config.model.clip_skip
    bundle.max_token_length = config.data.max_token_length
    return bundle
