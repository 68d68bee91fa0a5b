"""Reverse diffusion for previews and `sdstudio sample`: fixed prompts and seeds -> uint8 images/grids."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..diffusion import sampling_scheduler, set_sampling_timesteps, step_kwargs
from ..flow import FlowSchedule
from ..learned_schedule import refresh_scheduler
from ..models.bundle import ModelBundle


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Sampling must not change the training run: save and restore every global RNG."""
    py = random.getstate()
    npy = np.random.get_state()
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@torch.no_grad()
def generate(bundle: ModelBundle, model: torch.nn.Module, train_sched: Any, prompts: Sequence[str],
             seeds: Sequence[int], *, steps: int, guidance: float, sampler: str, negative_prompt: str = "",
             device: torch.device, autocast_dtype: torch.dtype | None = None,
             max_batch: int = 64, size: tuple[int, int] | None = None) -> np.ndarray:
    """Images for every (prompt, seed) pair, prompt-major: uint8 array (P*S, H, W, 3); ``size``: (width,
    height) in pixels (default: the model's square training size)."""
    was_training = model.training
    model.eval()
    try:
        pairs = [(p, s) for p in prompts for s in seeds]
        out = []
        for i in range(0, len(pairs), max_batch):
            out.append(generate_pairs(bundle, model, train_sched, pairs[i:i + max_batch], steps, guidance,
                                       sampler, negative_prompt, device, autocast_dtype, size))
        return np.concatenate(out, axis=0)
    finally:
        model.train(was_training)


def generate_pairs(bundle: ModelBundle, model: torch.nn.Module, train_sched: Any, pairs: list[tuple[str, int]],
                   steps: int, guidance: float, sampler: str, negative: str, device: torch.device,
                   autocast_dtype: torch.dtype | None, size: tuple[int, int] | None = None) -> np.ndarray:
    """One batch: an image per (prompt, seed) pair, in order (the model in eval mode, under no_grad);
    ``size``: (width, height) in pixels, default the model's square training size (flow families: always)."""
    if bundle.model_family.objective == "flow_matching":
        return flow_pairs(bundle, model, train_sched, pairs, steps, guidance, negative, device, autocast_dtype)
    refresh_scheduler(train_sched, model)  # diffusion.learned_schedule: sample with the schedule as learned
    sched = sampling_scheduler(train_sched, sampler)
    set_sampling_timesteps(sched, train_sched, steps, device)
    c, side = bundle.in_channels, bundle.sample_size
    height, width = side, side
    family = bundle.model_family
    if size is not None:
        width, height = max(1, size[0] // family.latent_downscale), max(1, size[1] // family.latent_downscale)
    noise = torch.cat([torch.randn((1, c, height, width), generator=torch.Generator().manual_seed(int(s)))
                       for _, s in pairs]).to(device)
    x = noise * sched.init_noise_sigma
    use_cfg = guidance > 1.0 and bundle.tokenizer is not None
    prompts = [p for p, _ in pairs]
    texts = prompts + ([negative] * len(pairs) if use_cfg else [])
    if size is not None and family.unet_addition_embed_type == "text_time":  # SDXL: the size conditioning
        px = (height * family.latent_downscale, width * family.latent_downscale)
        cond = bundle.encode_captions(texts, device, [(px, (0, 0), px)] * len(texts))  # type: ignore[call-arg]
    else:
        cond = bundle.encode_captions(texts, device)
    gen = torch.Generator(device=device).manual_seed(int(pairs[0][1]) + 7919)
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(device.type, enabled=False))
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        tt = torch.full((inp.shape[0],), int(t), device=device, dtype=torch.long)
        with ctx:
            if use_cfg:
                pred = model(torch.cat([inp, inp]), torch.cat([tt, tt]), cond).float()
                p_cond, p_uncond = pred.chunk(2)
                pred = p_uncond + guidance * (p_cond - p_uncond)
                if p_cond.shape[1] == 2 * c:  # a learned variance: the conditional one, unguided (as GLIDE)
                    pred = torch.cat([pred[:, :c], p_cond[:, c:]], dim=1)
            else:
                pred = model(inp, tt, cond).float()
        if pred.shape[1] == 2 * c:  # learned-variance head: the ddpm sampler reads v, the others do not
            if sched.config.get("variance_type") != "learned_range":
                sched = sampling_scheduler(train_sched, sampler, learned_variance=True)
                set_sampling_timesteps(sched, train_sched, steps, device)
            if sampler != "ddpm":
                pred = pred[:, :c]
        x = sched.step(pred, t, x, generator=gen, **step_kwargs(sched)).prev_sample
    return _to_uint8(bundle, x)


def _to_uint8(bundle: ModelBundle, x: torch.Tensor) -> np.ndarray:
    pixels = bundle.to_pixels(x).float().clamp(-1, 1)
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def flow_pairs(bundle: ModelBundle, model: torch.nn.Module, schedule: FlowSchedule, pairs: list[tuple[str, int]],
               steps: int, guidance: float, negative: str, device: torch.device,
               autocast_dtype: torch.dtype | None) -> np.ndarray:
    """A flow-matching model: Euler steps of diffusers' FlowMatchEulerDiscreteScheduler from t = 1 (noise),
    shifted as the base model's pipeline does. A guidance-distilled model (its conditioning holds
    ``guidance``, Flux dev) gets ``guidance`` as its guidance input; others use classifier-free guidance with
    ``negative`` when guidance > 1 (``sample.sampler`` does not apply: there is one flow sampler)."""
    c, side = bundle.in_channels, bundle.sample_size
    x = torch.cat([torch.randn((1, c, side, side), generator=torch.Generator().manual_seed(int(s)))
                   for _, s in pairs]).to(device)
    patch = int(bundle.architecture.get("patch_size", 2))
    sched = schedule.sampling_timesteps(max(1, int(steps)), (side // patch) ** 2, device)
    prompts = [p for p, _ in pairs]
    cond = bundle.encode_captions(prompts, device)
    distilled = "guidance" in cond
    use_cfg = not distilled and guidance > 1.0
    if distilled:
        cond["guidance"] = torch.full_like(cond["guidance"], float(guidance))
    if use_cfg:
        cond = bundle.encode_captions(prompts + [negative] * len(pairs), device)
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(device.type, enabled=False))
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), float(t) / 1000.0, device=device)
        with ctx:
            if use_cfg:
                pred = model(torch.cat([x, x]), torch.cat([tt, tt]), cond).float()
                p_cond, p_uncond = pred.chunk(2)
                pred = p_uncond + guidance * (p_cond - p_uncond)
            else:
                pred = model(x, tt, cond).float()
        x = sched.step(pred, t, x).prev_sample
    return _to_uint8(bundle, x)


def stack_padded(rows: Sequence[np.ndarray], fill: int = 255) -> np.ndarray:
    """(N_i, H_i, W_i, 3) image arrays of possibly different sizes as one (N, H, W, 3) array: each image
    centred on ``fill`` at the largest height and width (a grid of prompts sampled at their own sizes)."""
    h = max(r.shape[1] for r in rows)
    w = max(r.shape[2] for r in rows)
    out = []
    for r in rows:
        padded = np.full((r.shape[0], h, w, 3), fill, dtype=np.uint8)
        y, x = (h - r.shape[1]) // 2, (w - r.shape[2]) // 2
        padded[:, y:y + r.shape[1], x:x + r.shape[2]] = r
        out.append(padded)
    return np.concatenate(out, axis=0)


def make_grid(images: np.ndarray, rows: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into a grid of ``rows`` rows (prompt-major order)."""
    n, h, w, _ = images.shape
    cols = max(1, -(-n // max(1, rows)))
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), fill, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid
