"""Sampling from a model that is not an sdstudio run (`sdstudio sample --model PATH [--lora FILE]`).

PATH is a Stable Diffusion 1.x / 2.x / XL base model (a diffusers folder, including sdstudio's own SD
``diffusers-folder`` exports, or a single .safetensors/.ckpt file, loaded offline through
``models/sd/files.py``), or a from-scratch model exported with ``sdstudio export --format diffusers-folder``
(``export/pixel_folder.py``). The model becomes an ordinary ``ModelBundle`` and the images come from
``core/sampling/sampler.py``, so every sampler behaves exactly as in a run's previews and in ``sdstudio sample --run``.
A LoRA (kohya or diffusers format) is applied to the pipeline's UNet (and text encoders, when the file has
text-encoder modules) with diffusers' own ``load_lora_weights``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..models.bundle import ModelBundle
from ..models.family import ModelFamily
from ..models.registry import family_of_lora, get_family, recognise_model
from ..models.sd.files import SINGLE_FILE_SUFFIXES, ModelFileError
from ..runs import is_run_dir

# What a model samples with when the command line does not say: its family's ``sampling`` defaults.
SAMPLERS = ("ddpm", "ddim", "euler", "dpmpp_2m")


class LoraFileError(UserError):
    """A LoRA file that is missing, not a LoRA, or does not fit the model."""


@dataclass
class LoadedBaseModel:
    """A model loaded for sampling only (no run, no checkpoint)."""

    bundle: ModelBundle
    scheduler: Any  # the training schedule (a DDPMScheduler); samplers derive from it as in a run
    device: torch.device
    source: Path
    kind: str  # the model family's name
    defaults: dict[str, Any] = field(default_factory=dict)
    lora: Path | None = None
    lora_modules: int = 0  # modules the LoRA patched
    autocast_dtype: torch.dtype | None = None

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None = None,
                 guidance: float | None = None, sampler: str | None = None,
                 negative_prompt: str | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
        from .sampler import generate

        d = self.defaults
        return generate(self.bundle, self.bundle.trainable, self.scheduler, list(prompts), list(seeds),
                        steps=steps or int(d["steps"]), guidance=float(d["guidance"]) if guidance is None else guidance,
                        sampler=sampler or str(d["sampler"]),
                        negative_prompt=str(d["negative_prompt"]) if negative_prompt is None else negative_prompt,
                        device=self.device, autocast_dtype=self.autocast_dtype, size=size)

    def describe(self) -> str:
        what = get_family(self.kind).short_title
        lora = f" + LoRA {self.lora.name} ({self.lora_modules} modules)" if self.lora else ""
        return f"{what} model {self.source.name}{lora}"


# -- entry point ------------------------------------------------------------------------------------------
def load_model(path: Path, *, lora: Path | None = None, device: str = "auto",
               config_folder: Path | None = None, prediction_type: str = "auto",
               files: Mapping[str, Path] | None = None) -> LoadedBaseModel:
    """Load PATH for sampling. ``config_folder``: the diffusers config folder of a single-file model (default:
    the one sdstudio ships for the detected family). ``prediction_type``: override what the SD file says
    (a v-prediction model without the marker keys); "auto" = detect. ``files``: the separate part files of a
    model kept as split single files, by config key ("model.vae_path", "model.text_encoder_path", ...: the
    family's ``sampling_file_keys``), loaded as a run loads them."""
    from ..train.setup import pick_device

    path = Path(path).expanduser()
    lora = Path(lora).expanduser() if lora is not None else None
    family = get_family(detect_model(path))
    files = {key: Path(p).expanduser() for key, p in (files or {}).items() if p is not None}
    check_part_files(family, path, files)
    dev = pick_device(device)
    _quiet_loading()
    return family.load_for_sampling(path, dev, lora=lora, config_folder=config_folder,
                                    prediction_type=prediction_type, files=files)


def check_part_files(family: ModelFamily, path: Path, files: Mapping[str, Path]) -> None:
    """Refuse part files the family does not take, text-encoder files beside a diffusers folder (which holds
    its own) and part files that do not exist, each with a sentence naming its config key."""
    takes = family.sampling_file_keys
    for key, part in files.items():
        if key not in takes:
            instead = (f"it takes only {', '.join(f'`{k}`' for k in takes)}" if takes
                       else "it is loaded whole from `model.path`")
            raise ModelFileError(f"{key} {part}: a {family.title} model has no such separate file; {instead}")
        if path.is_dir() and key != "model.vae_path":
            raise ModelFileError(f"{key} {part}: belongs with a single transformer file; the diffusers folder "
                                 f"{path} holds its own text encoders (only `model.vae_path` replaces a part of it)")
        if not part.is_file() and not (key == "model.vae_path" and part.is_dir()):
            raise ModelFileError(f"{key} {part}: no such file")


def cast_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move and cast floating-point weights (nn.Module's own casts: diffusers' ``to(dtype)`` warns each time)."""
    torch.nn.Module.to(module, device)
    return {torch.float16: module.half, torch.bfloat16: module.bfloat16}.get(dtype, module.float)()


def _quiet_loading() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def detect_model(path: Path) -> str:
    """The family name of a model file or folder (the registry asks each family), or a UserError naming the
    path and what to pass instead."""
    from ..models.sd.files import inspect_model_file

    if not path.exists():
        raise ModelFileError(f"model.path {path}: no such file or folder; give a Stable Diffusion .safetensors/.ckpt "
                             "file, a diffusers model folder, or a folder made by `sdstudio export --format "
                             "diffusers-folder`")
    if path.is_dir() and not (path / "model_index.json").is_file():
        if is_run_dir(path):  # a checkpoint folder holds the run's config.toml too
            raise ModelFileError(f"model.path {path}: this is an sdstudio run or checkpoint folder; sample it with "
                                 f"`sdstudio sample --run {path}` (or export it with `sdstudio export`)")
        raise ModelFileError(f"model.path {path}: not a diffusers model folder (no model_index.json); give the "
                             "folder that holds model_index.json, or a .safetensors/.ckpt file")
    if path.is_file() and path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelFileError(f"model.path {path}: expected a .safetensors/.ckpt model file or a diffusers folder")
    family = recognise_model(path)
    if family is not None:
        return family.name
    if path.is_dir():  # no family claims it: say what it is
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"model.path {path}: model_index.json cannot be read ({exc})") from None
        cls = str(index.get("_class_name", ""))
        raise ModelFileError(f"model.path {path}: a {cls or 'unknown'} folder; sdstudio samples Stable Diffusion "
                             "1.x / 2.x / XL models and its own diffusers-folder exports")
    info = inspect_model_file(path)
    if info.kind == "lora":
        raise ModelFileError(f"model.path {path}: this is a LoRA; pass it as `lora` together with a base `model.path`")
    raise ModelFileError(f"model.path {path}: this is {info.detail}, not a Stable Diffusion checkpoint")


# -- Stable Diffusion -------------------------------------------------------------------------------------
def sd_schedule(scheduler_config: dict[str, Any], prediction_type: str, zero_terminal_snr: bool) -> Any:
    """The base model's noise schedule as a DDPMScheduler, set up as sdstudio's training schedule is."""
    from diffusers import DDPMScheduler

    c = scheduler_config
    return DDPMScheduler(num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
                         beta_start=float(c.get("beta_start", 0.00085)), beta_end=float(c.get("beta_end", 0.012)),
                         beta_schedule=str(c.get("beta_schedule", "scaled_linear")),
                         trained_betas=c.get("trained_betas"), prediction_type=prediction_type,
                         rescale_betas_zero_snr=zero_terminal_snr, clip_sample=False, timestep_spacing="trailing")


def load_sd_base(path: Path, family: str, device: torch.device, *, lora: Path | None,
                 config_folder: Path | None, prediction_type: str = "auto",
                 vae_path: Path | None = None) -> LoadedBaseModel:
    """A Stable Diffusion base model (file or folder) for sampling, with an optional LoRA on it (and a separate
    VAE instead of its own, ``vae_path``)."""
    from ..config import RunConfig
    from ..errors import ConfigError
    from ..models.sd.model import build_sd_model

    overrides: dict[str, Any] = {"model.family": family, "model.path": str(path), "train.device": "cpu",
                                 "train.mixed_precision": "no", "lora.enabled": False, "data.resolution": 512,
                                 "model.prediction_type": prediction_type}
    if config_folder is not None:
        overrides["model.config_folder"] = str(Path(config_folder).expanduser())
    if vae_path is not None:
        overrides["model.vae_path"] = str(Path(vae_path).expanduser())
    try:
        config = RunConfig().with_overrides(overrides)
    except ConfigError as exc:
        raise ModelFileError(f"model.path {path}: {exc}") from None
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers warns on every to(dtype) of a model
    try:
        bundle = build_sd_model(config, torch.device("cpu"))  # fp32 on the CPU; moved below
    finally:  # its ModelFileErrors already name model.path (the CLI words it as --model)
        diffusers_logging.set_verbosity(level)
    comps = bundle.components
    unet = comps.unet
    unet.requires_grad_(False)
    sched = sd_schedule(comps.scheduler_config, comps.prediction_type, comps.zero_terminal_snr)
    lora_modules = apply_lora(bundle, lora, family=family, model=path, sched=sched) if lora is not None else 0
    wdtype = torch.float16 if device.type == "cuda" else torch.float32
    for module in (unet, comps.text_encoder, comps.text_encoder_2):
        if module is not None:
            cast_module(module, device, wdtype).eval()
    # SDXL's VAE overflows in fp16 (NaN latents): it stays fp32
    cast_module(comps.vae, device, torch.float32 if get_family(family).vae_needs_fp32_for_fp16 else wdtype).eval()
    bundle.weight_dtype = wdtype
    if hasattr(bundle.trainable, "weight_dtype"):
        bundle.trainable.weight_dtype = wdtype
    bundle.trainable.eval()
    bundle.sample_size = int(unet.config.sample_size)  # the model's native size (latent side)
    return LoadedBaseModel(bundle, sched, device, path, family, get_family(family).sampling.as_dict(), lora,
                           lora_modules,
                           autocast_dtype=wdtype if wdtype != torch.float32 else None)


def _lora_modules_in_file(keys: list[str]) -> int:
    return sum(1 for k in keys if k.endswith((".lora_down.weight", ".lora_A.weight")))


def _first_reason(exc: BaseException) -> str:
    """One line out of a long loader error: the first size mismatch if there is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(exc).__name__)
    return line if len(line) <= 240 else line[:240] + "..."


def apply_lora(bundle: Any, lora: Path, *, family: str, model: Path, sched: Any) -> int:
    """Load a kohya or diffusers LoRA file onto the bundle's UNet (and text encoders) with diffusers'
    ``load_lora_weights``; returns the number of patched modules. Anything that does not fit is a UserError."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..models.sd.files import classify_keys

    if not lora.is_file():
        raise LoraFileError(f"lora {lora}: no such file")
    if lora.suffix.lower() != ".safetensors":
        raise LoraFileError(f"lora {lora}: expected a .safetensors LoRA file (kohya or diffusers format)")
    from safetensors import safe_open

    try:
        with safe_open(str(lora), framework="pt") as fh:
            keys = list(fh.keys())
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise LoraFileError(f"lora {lora}: not a readable safetensors file ({exc}); download it again") from None
    kind, detail = classify_keys(keys)
    if kind != "lora":
        raise LoraFileError(f"lora {lora}: this is {detail}, not a LoRA")
    claimed = family_of_lora(meta)
    trained_for = claimed.name if claimed is not None else None
    if trained_for is not None and trained_for != family:
        raise LoraFileError(f"lora {lora}: a LoRA for {trained_for} models, but `model.path` {model} is {family}; "
                            f"use a {family} LoRA or the base model it was trained on")
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SD pipelines warn about scheduler configs they were not made with
        pipe = get_family(family).pipeline(bundle.components, sched)  # type: ignore[attr-defined]
    level = diffusers_logging.get_verbosity()
    # diffusers logs the whole failing state dict as an error, and a warning for each text encoder a UNet-only
    # LoRA leaves alone; the outcome is reported below in one line instead
    diffusers_logging.set_verbosity(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="sdstudio")
    except Exception as exc:  # noqa: BLE001 - size mismatches, unknown keys, peft errors: all "does not fit"
        raise LoraFileError(f"lora {lora}: does not fit the {family} model {model} ({_first_reason(exc)})") from None
    finally:
        diffusers_logging.set_verbosity(level)
    modules = [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    patched = sum(1 for m in modules if m is not None for sub in m.modules() if isinstance(sub, BaseTunerLayer))
    expected = _lora_modules_in_file(keys)
    if patched == 0:
        raise LoraFileError(f"lora {lora}: none of its {expected} modules matches a layer of the {family} model "
                            f"{model}; is it a LoRA for another model family?")
    if expected and patched < expected:
        raise LoraFileError(f"lora {lora}: only {patched} of its {expected} modules match layers of the {family} "
                            f"model {model}; is it a LoRA for another model?")
    return patched


# -- sdstudio's from-scratch exports ----------------------------------------------------------------------
def load_pixel_export(path: Path, device: torch.device, family: ModelFamily) -> LoadedBaseModel:
    """A from-scratch model exported as diffusers-folder, for sampling with the run's own settings."""
    import diffusers
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from ..config import DiffusionConfig
    from ..diffusion import training_scheduler
    from ..export.pixel_folder import SDSTUDIO_FILE
    from ..models.pixel.model import (  # also registers LeakyReLU for the UNet config
        PixelBundle,
        PixelDenoiser,
    )

    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        facts_file = path / SDSTUDIO_FILE
        facts = json.loads(facts_file.read_text(encoding="utf-8")) if facts_file.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"model.path {path}: cannot read the folder's model_index.json / {SDSTUDIO_FILE} "
                             f"({exc}); export it again") from None
    unet_cls_name = (index.get("unet") or [None, ""])[1]
    unet_cls = getattr(diffusers, unet_cls_name, None) if unet_cls_name in ("UNet2DModel",
                                                                            "UNet2DConditionModel") else None
    if unet_cls is None:
        raise ModelFileError(f"model.path {path}: unet is {unet_cls_name!r}; expected a UNet2DModel or "
                             "UNet2DConditionModel")
    conditional = unet_cls_name == "UNet2DConditionModel"
    try:
        unet = unet_cls.from_pretrained(str(path), subfolder="unet", local_files_only=True)
        text_encoder = tokenizer = None
        if conditional:
            text_encoder = CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        sched_cfg = dict(DDPMScheduler.load_config(str(path), subfolder="scheduler", local_files_only=True))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFileError(f"model.path {path}: could not be loaded ({str(exc).splitlines()[0]}); export it "
                             "again") from None
    if "diffusion" in facts:
        # the run's own schedule: exactly what its previews and `sdstudio sample --run` sample with
        train_sched = training_scheduler(DiffusionConfig(**facts["diffusion"]), pixel_space=True)
        if sched_cfg.get("trained_betas"):  # diffusion.learned_schedule: the schedule the run learned
            from ..learned_schedule import sync_scheduler

            betas = torch.tensor(sched_cfg["trained_betas"], dtype=torch.float64)
            sync_scheduler(train_sched, torch.cumprod(1.0 - betas, 0))
    else:
        train_sched = DDPMScheduler.from_config(sched_cfg)
    defaults = family.sampling.as_dict()
    defaults.update({k: v for k, v in facts.get("sample", {}).items() if k in defaults})
    if defaults["sampler"] not in SAMPLERS:
        defaults["sampler"] = "ddim"
    if not conditional:
        defaults["guidance"] = 1.0
    unet = cast_module(unet, device, torch.float32).eval()
    if text_encoder is not None:
        text_encoder = cast_module(text_encoder, device, torch.float32).eval()
    size = unet.config.sample_size
    side = int(size if isinstance(size, int) else size[0])
    bundle = PixelBundle(family=family.name, trainable=PixelDenoiser(unet, text_encoder).eval(), save_modules={},
                         prediction_type=str(train_sched.config.prediction_type),
                         in_channels=int(unet.config.in_channels), sample_size=side,
                         architecture={"family": family.name}, tokenizer=tokenizer)
    return LoadedBaseModel(bundle, train_sched, device, path, family.name, defaults)
