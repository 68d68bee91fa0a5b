"""diffusers pipeline folders of from-scratch (pixel) runs.

- Unconditional model: a standard ``DDPMPipeline`` folder (``unet/`` + ``scheduler/``);
  ``DiffusionPipeline.from_pretrained(folder)`` loads it and ``pipe()`` runs with no arguments. Two cases need
  the folder's own DDPMPipeline subclass (``SDStudioDDPMPipeline``, loaded with ``trust_remote_code=True``): a
  LeakyReLU model, and DDIM with v-prediction, whose step must recompute its noise estimate from the clipped
  image as sdstudio's sampler does (``diffusion.step_kwargs``); DDPMPipeline passes no such argument.
- Conditional model: diffusers has no pipeline for a pixel-space UNet conditioned on a CLIP text encoder, so the
  folder ships its own, ``pipeline_sdstudio_pixel.py`` (class ``SDStudioPixelPipeline``), and
  ``model_index.json`` names it as ``["pipeline_sdstudio_pixel", "SDStudioPixelPipeline"]``. diffusers 0.42
  finds such a file inside a local folder by itself, but runs code from a folder only with
  ``trust_remote_code=True``: ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``. The
  pipeline needs nothing but torch, diffusers and transformers and samples exactly as sdstudio's own sampler
  (``core/sampling/sampler.py``): same noise per seed (``seed=``), same classifier-free guidance, same timesteps.

Both carry ``sdstudio.json`` (the run's diffusion and sampling settings and its training metadata, which
``sdstudio sample --model`` reads) and a README.md saying how to load the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_folder_atomic
from ..errors import UserError
from ..models.registry import get_family
from .source import ExportSource

PIPELINE_MODULE = "pipeline_sdstudio_pixel"
PIPELINE_CLASS = "SDStudioPixelPipeline"
# unconditional models that a plain DDPMPipeline cannot sample as sdstudio does: LeakyReLU (diffusers cannot build
# it by name) or DDIM with v-prediction and a clipped image (DDPMPipeline keeps the unclipped noise estimate)
UNCONDITIONAL_CLASS = "SDStudioDDPMPipeline"
SDSTUDIO_FILE = "sdstudio.json"
FOLDER_FORMAT = "sdstudio-pixel-folder"

# The pipeline written into the folder. Self-contained on purpose: it must run where sdstudio is not installed.
PIPELINE_SOURCE = '''\
"""sdstudio's pixel-space text-to-image pipeline (written by `sdstudio export --format diffusers-folder`).

Load the folder with
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)
    images = pipe("a red circle on white", num_images_per_prompt=4, seed=0).images

It needs torch, diffusers and transformers only. With `seed=S` image k of every prompt starts from the noise
`torch.randn(generator=torch.Generator().manual_seed(S + k))` and a DDPM sampler draws its step noise from a
generator seeded with S + 7919: the same numbers `sdstudio sample --seed S` uses, so the images match.
"""

import inspect
from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, ImagePipelineOutput
from diffusers.models import activations as _activations
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

# sdstudio models may use LeakyReLU, which diffusers does not know by name; registered before the UNet loads.
_activations.ACT2CLS.setdefault("leaky_relu", nn.LeakyReLU)


def _step_kwargs(sched):
    """As sdstudio samples: DDIM with v-prediction recomputes its noise estimate from the clipped image."""
    clipped_v = (sched.config.get("clip_sample") and sched.config.get("prediction_type") == "v_prediction"
                 and "use_clipped_model_output" in inspect.signature(sched.step).parameters)
    return {"use_clipped_model_output": True} if clipped_v else {}


class SDStudioDDPMPipeline(DDPMPipeline):
    """DDPMPipeline for unconditional sdstudio models: diffusers' own loop, plus LeakyReLU (registered above)
    and DDIM's v-prediction step as sdstudio takes it (``_step_kwargs``)."""

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        extra = _step_kwargs(self.scheduler)
        if not extra:
            return super().__call__(*args, **kwargs)
        sched = self.scheduler
        step = sched.step
        sched.step = lambda *a, **k: step(*a, **{**extra, **k})  # the instance attribute shadows the method
        try:
            return super().__call__(*args, **kwargs)
        finally:
            del sched.step


class SDStudioPixelPipeline(DiffusionPipeline):
    """Pixel-space UNet2DConditionModel conditioned on a CLIPTextModel, with classifier-free guidance."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str], device: torch.device):
        """(hidden states, attention mask) of the text encoder for a list of prompts."""
        enc = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        te = self.text_encoder
        if getattr(te.config, "sdstudio_bidirectional", False):  # every token sees the whole caption
            body = getattr(te, "text_model", te)
            hidden = body.embeddings(input_ids=ids)
            pad = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
            states = body.final_layer_norm(body.encoder(inputs_embeds=hidden, attention_mask=pad).last_hidden_state)
        else:
            states = te(input_ids=ids, attention_mask=mask)[0]
        return states, mask

    def caption_inputs(self, states: torch.Tensor, mask: torch.Tensor) -> dict:
        """The UNet's caption arguments; a UNet with a projection class embedding also gets the pooled caption
        (mean of the unpadded token states) added to its timestep embedding."""
        kwargs = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if self.unet.config.get("class_embed_type") == "projection":
            weights = mask.to(states.dtype).unsqueeze(-1)
            kwargs["class_labels"] = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Union[str, List[str]] = "",
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        seed: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images for every prompt (prompt-major order: all images of prompt 0 first).

        guidance_scale <= 1 turns classifier-free guidance off. `seed` (sdstudio's convention, see the module
        docstring) or `generator` (one, or a list with one per image) make the result reproducible.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = int(num_images_per_prompt)
        total = len(prompts) * n
        device = self._execution_device
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (total, cfg.in_channels, h, w)
        sched = self.scheduler
        if (sched.config.get("timestep_spacing") == "leading" and sched.config.get("steps_offset", 0)
                and num_inference_steps >= sched.config.num_train_timesteps):
            raise ValueError(f"num_inference_steps={num_inference_steps}: use fewer than "
                             f"{sched.config.num_train_timesteps} steps with this scheduler (steps_offset=1)")
        if seed is not None:
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(int(seed) + k))
                               for _ in prompts for k in range(n)])
            step_generator = torch.Generator(device=device).manual_seed(int(seed) + 7919)
        else:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            step_generator = generator
        use_cfg = guidance_scale > 1.0
        texts = [p for p in prompts for _ in range(n)]
        if use_cfg:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
            texts += [neg for neg in negatives for _ in range(n)]
        states, mask = self.encode_prompt(texts, device)
        states = states.to(self.unet.dtype)

        total = int(sched.config.num_train_timesteps)
        steps = max(1, min(int(num_inference_steps), total))
        while True:  # as sdstudio does: fewer steps where "leading" spacing would leave the schedule
            sched.set_timesteps(steps, device=device)
            ts = sched.timesteps
            starts_high = int(ts.max()) >= total - 1.5 * total / steps - 1
            if (int(ts.max()) < total and len(set(ts.tolist())) == len(ts) and starts_high) or steps == 1:
                break
            steps -= 1
        x = noise.to(device) * sched.init_noise_sigma
        step_kwargs = _step_kwargs(sched)
        for t in self.progress_bar(sched.timesteps):
            inp = sched.scale_model_input(x, t)
            tt = torch.full((inp.shape[0],), int(t), device=device, dtype=torch.long)
            if use_cfg:
                pred = self.unet(torch.cat([inp, inp]).to(self.unet.dtype), torch.cat([tt, tt]),
                                 **self.caption_inputs(states, mask)).sample.float()
                p_cond, p_uncond = pred.chunk(2)
                pred = p_uncond + guidance_scale * (p_cond - p_uncond)
                if pred.shape[1] == 2 * x.shape[1]:  # a learned variance: the conditional one, unguided
                    pred = torch.cat([pred[:, :x.shape[1]], p_cond[:, x.shape[1]:]], dim=1)
            else:
                pred = self.unet(inp.to(self.unet.dtype), tt, **self.caption_inputs(states, mask)).sample.float()
            if pred.shape[1] == 2 * x.shape[1] and sched.config.get("variance_type") != "learned_range":
                pred = pred[:, :x.shape[1]]  # a deterministic sampler has no use for the learned variance
            x = sched.step(pred, t, x, generator=step_generator, **step_kwargs).prev_sample

        x = x.float().clamp(-1, 1)
        if output_type == "pt":
            images = (x + 1) / 2
        elif output_type == "np":
            images = ((x + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        else:
            from PIL import Image

            arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images = [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
'''


def pixel_modules(source: ExportSource) -> tuple[Any, Any, Any]:
    """(unet, text encoder or None, tokenizer or None) with the checkpoint's weights, CPU, fp32, eval."""
    from ..models.pixel.model import build_pixel_model

    tok_file = source.checkpoint / "tokenizer.json"
    if source.config.model.conditional and not tok_file.is_file():
        raise UserError(f"{source.checkpoint}: tokenizer.json is missing, so the captions' vocabulary is lost; "
                        "export another checkpoint of the run")
    with torch.random.fork_rng(devices=[]):  # building a model seeds the global RNG
        bundle = build_pixel_model(source.config, [], tokenizer_file=tok_file if tok_file.is_file() else None)
    bundle.load_trainable_state(source.weights, source.checkpoint)
    unet = bundle.trainable.unet.float().eval()
    te = bundle.trainable.text_encoder
    if te is not None:
        te = te.float().eval()
    return unet, te, bundle.tokenizer


def learned_schedule(source: ExportSource, train_sched: Any) -> None:
    """diffusion.learned_schedule: the checkpoint's learned schedule into ``train_sched`` (its betas then go
    into the folder's scheduler config as ``trained_betas``)."""
    from ..learned_schedule import LearnedNoiseSchedule, sync_scheduler

    prefix = "noise_schedule."
    weights = {k[len(prefix):]: v for k, v in source.weights.items() if k.startswith(prefix)}
    if not weights:
        return
    schedule = LearnedNoiseSchedule(train_sched.alphas_cumprod, units=int(weights["scale"].shape[0]))
    schedule.load_state_dict(weights)
    with torch.no_grad():
        sync_scheduler(train_sched, schedule.alphas_cumprod())


def export_scheduler(source: ExportSource) -> Any:
    """The scheduler of the folder: the run's own sampler on the run's schedule (schedule, prediction type,
    zero terminal SNR, timesteps, clipping), with the timestep spacing sdstudio samples with.

    A DDPMPipeline folder gets DDIM or DDPM (that pipeline neither scales inputs nor starts at a sigma) and
    ``steps_offset = 0``: DDPMPipeline's default of 1000 steps would otherwise ask for timestep 1000."""
    from ..diffusion import sampling_scheduler, training_scheduler

    cfg = source.config
    sampler = cfg.sample.sampler
    train_sched = training_scheduler(cfg.diffusion, pixel_space=True)
    learned_schedule(source, train_sched)
    learned_variance = cfg.model.learned_variance
    if cfg.model.conditional:
        return sampling_scheduler(train_sched, sampler, learned_variance=learned_variance)
    if learned_variance:  # DDPMPipeline passes the whole output to the scheduler: only ddpm reads v
        sampler = "ddpm"
    sched = sampling_scheduler(train_sched, sampler if sampler in ("ddpm", "ddim") else "ddim",
                               learned_variance=learned_variance)
    if sched.config.timestep_spacing == "leading":
        sched = type(sched).from_config(sched.config, steps_offset=0)
    return sched


def folder_facts(source: ExportSource, scheduler: Any) -> dict[str, Any]:
    """sdstudio.json: what `sdstudio sample --model` needs beyond the diffusers files, plus provenance."""
    from .metadata import training_metadata

    cfg = source.config
    s = cfg.sample
    try:
        meta = training_metadata(source, title=source.run_dir.name if source.run_dir else source.checkpoint.name,
                                 lora=False)
    except (OSError, ValueError) as exc:  # provenance only: never fail an export over it
        meta = {"error": str(exc)}
    return {"format": FOLDER_FORMAT, "version": 1, "family": "pixel", "conditional": cfg.model.conditional,
            "resolution": cfg.data.resolution, "diffusion": cfg.diffusion.model_dump(mode="json"),
            "sample": {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                       "negative_prompt": s.negative_prompt, "prompts": list(s.prompts), "seeds": list(s.seeds)},
            "scheduler_class": type(scheduler).__name__, "step": source.step, "epoch": source.epoch,
            "ema": source.ema, "checkpoint": str(source.checkpoint), "metadata": meta}


def _own_class_reasons(source: ExportSource, scheduler: Any) -> list[str]:
    """Why an unconditional folder needs its own DDPMPipeline subclass (none: a standard DDPMPipeline)."""
    from ..diffusion import step_kwargs

    reasons = []
    if source.config.model.activation == "leaky_relu":
        reasons.append("the model uses LeakyReLU, which diffusers does not know by name (the file registers it)")
    if step_kwargs(scheduler):
        reasons.append("DDIM with v-prediction must recompute its noise estimate from the clipped image, as "
                       "sdstudio samples, which a plain DDPMPipeline does not ask its scheduler to do")
    return reasons


def _readme(source: ExportSource, facts: dict[str, Any], class_name: Any, reasons: list[str]) -> str:
    cfg = source.config
    s = facts["sample"]
    d = facts["diffusion"]
    name = source.run_dir.name if source.run_dir else source.checkpoint.name
    head = (f"# {name} (step {source.step}{', EMA weights' if source.ema else ''})\n\n"
            f"A from-scratch pixel-space diffusion model trained with sdstudio ({cfg.data.resolution} px, "
            f"{d['schedule']} schedule, {d['num_timesteps']} timesteps, predicts {d['prediction_type']}"
            f"{', zero terminal SNR' if d['zero_terminal_snr'] else ''}).\n\n")
    example = s["prompts"][0] if s["prompts"] else "a photo of a cat"
    prompt = json.dumps(example) if cfg.model.conditional else '""'
    sample_cli = (f"## With sdstudio\n\n```\nsdstudio sample --model FOLDER --prompt {prompt} --n 4 --seed 0 "
                  f"--out samples\n```\nsamples with the run's settings ({s['sampler']}, {s['steps']} steps"
                  f"{', guidance ' + str(s['guidance']) if cfg.model.conditional else ''}): the images "
                  f"`sdstudio sample --run`{' --raw' if cfg.train.ema and not source.ema else ''} makes.\n")
    if not cfg.model.conditional:
        if d["zero_terminal_snr"]:
            timesteps = (f"The scheduler is {facts['scheduler_class']} with 'trailing' timestep spacing (zero "
                         "terminal SNR), the timesteps of sdstudio's previews.")
        else:
            timesteps = (f"The scheduler is {facts['scheduler_class']} with `steps_offset = 0` so that the "
                         "pipeline's default of 1000 steps works; sdstudio's previews sample with `steps_offset = 1` "
                         "(the Stable Diffusion convention). For the run's exact timesteps with fewer steps than the "
                         "schedule has, use\n`pipe.scheduler = pipe.scheduler.__class__.from_config("
                         "pipe.scheduler.config, steps_offset=1)`.")
        remote = class_name != "DDPMPipeline"
        load = ("DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)" if remote
                else "DiffusionPipeline.from_pretrained(FOLDER)")
        why = (f"\nThe folder's `{PIPELINE_MODULE}.py` is needed because " + "; and ".join(reasons)
               + ", hence `trust_remote_code=True`.\n" if remote else "")
        return head + (
            "## With diffusers\n\n"
            + ("A `DDPMPipeline` folder (`unet/`, `scheduler/`; the pipeline class is a DDPMPipeline subclass "
               "in the folder's code):" if remote else "A standard `DDPMPipeline` folder (`unet/`, `scheduler/`):")
            + "\n\n```python\n"
            "from diffusers import DiffusionPipeline\nimport torch\n\n"
            f"pipe = {load}\n"
            "images = pipe(batch_size=4, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images\n"
            "```\n" + why + "\n" + timesteps + "\n\n" + sample_cli)
    return head + (
        "## With diffusers\n\ndiffusers has no built-in pipeline for a pixel-space UNet conditioned on a text "
        f"encoder, so this folder carries its own: `{PIPELINE_MODULE}.py` (class `{PIPELINE_CLASS}`, needs "
        "torch, diffusers and transformers only; read it before you run it). diffusers runs code from a folder "
        "only when asked to:\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
        "pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)\n"
        f"images = pipe({example!r}, num_images_per_prompt=4, num_inference_steps={s['steps']}, "
        f"guidance_scale={s['guidance']}, seed=0).images\n```\n\n"
        "`seed=S` gives image k of each prompt the noise of seed S + k, as `sdstudio sample --seed S` does "
        "(a `generator=` works too). `guidance_scale` <= 1 turns classifier-free guidance off; "
        "`negative_prompt` is the unconditional text (empty by default, as in training's caption dropout).\n\n"
        f"The scheduler is the run's sampler ({facts['scheduler_class']}, timestep spacing "
        f"'{'trailing' if d['zero_terminal_snr'] else 'leading'}'). Other samplers: e.g.\n"
        "`pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`.\n\n"
        "Components: `unet/` (UNet2DConditionModel), `text_encoder/` (CLIPTextModel), `tokenizer/` "
        "(a word-level PreTrainedTokenizerFast over the training captions' words; unknown words become <unk>), "
        "`scheduler/`.\n\n" + sample_cli)


def _portable_tokenizer_class(config_file: Path) -> None:
    """transformers 5 records its fast tokenizer as "TokenizersBackend", a name transformers 4 does not know;
    "PreTrainedTokenizerFast" names the same class in both (the class model_index.json names too)."""
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> Any:
    """nn.Module's own casts (diffusers' ``to(dtype)`` logs a warning each time)."""
    return {torch.float16: module.half, torch.bfloat16: module.bfloat16}.get(dtype, module.float)()


def _write_folder(tmp: Path, source: ExportSource, dtype: torch.dtype) -> None:
    import diffusers
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" bars; sdstudio reports its own phases

    unet, text_encoder, tokenizer = pixel_modules(source)
    scheduler = export_scheduler(source)
    facts = folder_facts(source, scheduler)
    cfg = source.config
    reasons = [] if cfg.model.conditional else _own_class_reasons(source, scheduler)
    tmp.mkdir(parents=True)
    if cfg.model.conditional:
        _cast(unet, dtype).save_pretrained(str(tmp / "unet"), safe_serialization=True)
        _cast(text_encoder, dtype).save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        _portable_tokenizer_class(tmp / "tokenizer" / "tokenizer_config.json")
        scheduler.save_pretrained(str(tmp / "scheduler"))
        class_name: Any = [PIPELINE_MODULE, PIPELINE_CLASS]
        index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", type(scheduler).__name__],
                 "text_encoder": ["transformers", type(text_encoder).__name__],
                 "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                 "unet": ["diffusers", type(unet).__name__]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    else:
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=_cast(unet, dtype), scheduler=scheduler).save_pretrained(str(tmp), safe_serialization=True)
        class_name = "DDPMPipeline"
        if reasons:  # an unconditional model a plain DDPMPipeline cannot sample as sdstudio does
            index_path = tmp / "model_index.json"
            index = json.loads(index_path.read_text(encoding="utf-8"))
            class_name = index["_class_name"] = [PIPELINE_MODULE, UNCONDITIONAL_CLASS]
            index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if cfg.model.conditional or reasons:
        (tmp / f"{PIPELINE_MODULE}.py").write_text(PIPELINE_SOURCE, encoding="utf-8")
    (tmp / SDSTUDIO_FILE).write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(_readme(source, facts, class_name, reasons), encoding="utf-8")


def export_pixel_folder(source: ExportSource, folder: Path, *, dtype: torch.dtype = torch.float16,
                        force: bool = False) -> Path:
    """A complete diffusers pipeline folder of a pixel run, written next to its final place and renamed."""
    if not get_family(source.family).pixel_space:
        raise UserError(f"{source.checkpoint}: not a from-scratch (pixel) run")
    from .full_model import check_folder_target

    check_folder_target(folder, force)
    try:
        return write_folder_atomic(folder, lambda tmp: _write_folder(tmp, source, dtype))
    except OSError as exc:
        raise UserError(f"{folder}: could not write the export ({exc.strerror or exc}); nothing was written") from None


def is_pixel_folder(folder: Path) -> bool:
    """A folder this module wrote (or any DDPMPipeline folder)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    cls = index.get("_class_name")
    if isinstance(cls, list) and len(cls) == 2 and cls[0] == PIPELINE_MODULE:
        return True
    return cls == "DDPMPipeline" or (folder / SDSTUDIO_FILE).is_file()
