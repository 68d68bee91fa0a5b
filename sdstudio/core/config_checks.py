"""The cross-field checks of a RunConfig: settings that are valid one by one but do not fit together, each
problem one sentence naming the field and what to change. `RunConfig`'s validator runs them."""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

from .export.formats import export_problem
from .models.registry import get_family

if TYPE_CHECKING:
    from .config import RunConfig, TrainConfig


def run_config_problems(c: RunConfig) -> list[str]:
    """Every cross-field problem of ``c`` (empty when it fits together)."""
    problems: list[str] = []
    m, t, lo = c.model, c.train, c.loss
    if len(m.attention_levels) != len(m.block_channels):
        problems.append(f"model.attention_levels: {len(m.attention_levels)} entries given but "
                        f"model.block_channels has {len(m.block_channels)} levels; give one per level")
    bad = [ch for ch in m.block_channels if ch % m.norm_groups]
    if bad:
        problems.append(f"model.block_channels: {bad} not divisible by model.norm_groups="
                        f"{m.norm_groups}; use multiples of {m.norm_groups}")
    family = get_family(m.family)
    problems += family.config_problems(c)
    if m.text_width % m.text_heads:
        problems.append(f"model.text_heads: {m.text_heads} does not divide model.text_width="
                        f"{m.text_width}")
    if t.max_steps == 0 and t.epochs == 0:
        problems.append("train.max_steps and train.epochs: both 0; set one of them to say when the "
                        "run ends")
    tmax = lo.timestep_max or c.diffusion.num_timesteps
    if tmax > c.diffusion.num_timesteps:
        problems.append(f"loss.timestep_max: {lo.timestep_max} exceeds diffusion.num_timesteps="
                        f"{c.diffusion.num_timesteps}")
    if lo.timestep_min >= tmax:
        problems.append(f"loss.timestep_min: {lo.timestep_min} must be below the timestep maximum "
                        f"{tmax}")
    if not 0.0 < t.betas[0] < 1.0 or not 0.0 < t.betas[1] < 1.0:
        problems.append(f"train.betas: {list(t.betas)}; both must be in (0, 1)")
    if t.mixed_precision != "no" and t.device == "cpu":
        problems.append(f"train.mixed_precision: {t.mixed_precision!r} needs a GPU but train.device "
                        "is 'cpu'; use 'no' on the CPU")
    if c.diffusion.schedule != "cosine" and c.diffusion.beta_end <= c.diffusion.beta_start:
        problems.append(f"diffusion.beta_end: {c.diffusion.beta_end} must be above "
                        f"diffusion.beta_start={c.diffusion.beta_start}")
    for fmt in c.export.formats:
        reason = export_problem(fmt, family, lora=c.lora.enabled)
        if reason:
            problems.append(f"export.formats: {fmt!r} does not fit this run. {reason}")
    if c.lora.enabled and c.lora.type in ("loha", "lokr", "oft") and "diffusers" in c.export.formats:
        problems.append(f"export.formats: 'diffusers' cannot hold a {c.lora.type} adapter (diffusers "
                        "loads LoRA and DoRA only); use 'kohya' (LyCORIS keys)")
    if t.train_text_encoder and c.lora.enabled:
        problems.append("train.train_text_encoder: true trains the whole text encoder, but this is a LoRA run "
                        "(lora.enabled = true); use lora.text_encoder for a text-encoder LoRA")
    if c.lora.text_encoder and not c.lora.enabled:
        problems.append("lora.text_encoder: true, but lora.enabled = false (a full fine-tune); use "
                        "train.train_text_encoder to train the whole text encoder")
    trains_text = (c.lora.text_encoder if c.lora.enabled else t.train_text_encoder)
    if trains_text and family.text_embeddings_cacheable and c.data.cache_text_embeddings:
        key = "lora.text_encoder" if c.lora.enabled else "train.train_text_encoder"
        problems.append(f"data.cache_text_embeddings: true, but {key} = true trains the text encoder, so its "
                        "embeddings change every step; turn one of them off")
    problems += _memory_lever_problems(c)
    if m.clip_skip > 1 and not family.clip_skip_applies:
        problems.append(f"model.clip_skip: {m.clip_skip}, but the {family.short_title} family has no CLIP "
                        "layer to skip (it fixes which layer it reads); leave it at 1")
    if c.data.max_token_length > 75 and not family.long_captions:
        problems.append(f"data.max_token_length: {c.data.max_token_length}, but the {family.short_title} "
                        "family does not read captions in CLIP windows; leave it at 75")
    if c.export.ema and not t.ema:
        problems.append("export.ema: true needs train.ema = true")
    problems += _schedule_problems(t)
    problems += _recipe_problems(c)
    problems += _memorisation_problems(c)
    problems += _flow_loss_problems(c)
    return problems


def _recipe_problems(c: RunConfig) -> list[str]:
    """The training-recipe options (learned variance, learned schedule, contrastive caption term)."""
    family = get_family(c.model.family)
    problems = []
    from_scratch = not family.fine_tunes_base_model and family.objective == "diffusion"
    for key, on in (("model.learned_variance", c.model.learned_variance),
                    ("diffusion.learned_schedule", c.diffusion.learned_schedule)):
        if on and not from_scratch:
            problems.append(f"{key}: true needs a diffusion model trained from scratch; the "
                            f"{family.short_title} family fine-tunes a base model made for its own output and "
                            "schedule; turn it off")
    if c.diffusion.learned_schedule and c.diffusion.zero_terminal_snr:
        problems.append("diffusion.learned_schedule: true keeps the schedule's log-SNR endpoints, but "
                        "diffusion.zero_terminal_snr = true puts the last one at minus infinity; turn one off")
    if c.loss.contrastive_weight > 0:
        if family.objective != "diffusion":
            problems.append(f"loss.contrastive_weight: {c.loss.contrastive_weight}, but the "
                            f"{family.short_title} family trains by flow matching, which has no contrastive "
                            "caption term yet; set it to 0")
        elif not c.model.conditional:
            problems.append(f"loss.contrastive_weight: {c.loss.contrastive_weight}, but model.conditional = "
                            "false: an unconditional model has no captions to contrast; set it to 0")
        if c.train.batch_size < 2:
            problems.append(f"loss.contrastive_weight: {c.loss.contrastive_weight} compares an image's captions "
                            f"with the batch's others, but train.batch_size = {c.train.batch_size}; use 2 or more")
    return problems


def _memorisation_problems(c: RunConfig) -> list[str]:
    e = c.eval
    if not e.memorisation:
        return []
    if e.memorisation_features == "inception" and not e.inception_weights:
        return [("eval.memorisation_features: 'inception' needs eval.inception_weights (the FID Inception file); "
                "use 'pixels' or 'auto' without it")]
    if e.memorisation_features == "clip" and not e.memorisation_clip_model:
        return [("eval.memorisation_features: 'clip' needs eval.memorisation_clip_model (a CLIP model folder); "
                "use 'pixels' or 'auto' without it")]
    return []


def _schedule_problems(t: TrainConfig) -> list[str]:
    """Learning-rate schedule and optimizer settings that do not fit together."""
    problems = []
    if t.lr_scheduler == "piecewise":
        steps, values = t.lr_piecewise_steps, t.lr_piecewise_values
        if not steps or len(steps) != len(values):
            problems.append(f"train.lr_piecewise_steps: {len(steps)} steps and {len(values)} values "
                            "(train.lr_piecewise_values) given; the piecewise schedule needs one value per step, "
                            "at least one point")
        if any(b <= a for a, b in pairwise(steps)) or any(s < 0 for s in steps):
            problems.append(f"train.lr_piecewise_steps: {steps}; steps must be >= 0 and increasing")
        if any(v < 0 for v in values):
            problems.append(f"train.lr_piecewise_values: {values}; values must be >= 0")
    if t.optimizer == "adamw_schedulefree" and t.lr_scheduler not in ("constant", "constant_with_warmup"):
        problems.append(f"train.lr_scheduler: {t.lr_scheduler!r} decays the LR, but train.optimizer = "
                        "'adamw_schedulefree' replaces the schedule (it averages the weights instead); use "
                        "'constant' or 'constant_with_warmup'")
    return problems


def _memory_lever_problems(c: RunConfig) -> list[str]:
    """Combinations of the memory levers (model.quantize, train.blocks_to_swap, train.fused_backward, ...) that
    cannot work, each with what to change."""
    problems = []
    t = c.train
    if c.model.quantize != "none" and not c.lora.enabled:
        problems.append(f"model.quantize: {c.model.quantize!r} stores the frozen base weights quantized, but this is "
                        "a full fine-tune (lora.enabled = false); quantize only under a LoRA")
    if t.blocks_to_swap and not c.lora.enabled:
        problems.append(f"train.blocks_to_swap: {t.blocks_to_swap} swaps frozen weights only, but this is a full "
                        "fine-tune (lora.enabled = false); use it with a LoRA (or train.fsdp on several GPUs)")
    if t.fused_backward and t.gradient_accumulation > 1:
        problems.append(f"train.fused_backward: true updates each weight during the backward pass, so gradients "
                        f"cannot accumulate; set train.gradient_accumulation = 1 (now {t.gradient_accumulation})")
    if t.fused_backward and t.max_grad_norm > 0:
        problems.append(f"train.fused_backward: true updates each weight before the whole gradient is known, so it "
                        f"cannot be clipped by norm; set train.max_grad_norm = 0 (now {t.max_grad_norm:g})")
    if t.fsdp and c.lora.enabled:
        problems.append("train.fsdp: true shards a full fine-tune; a LoRA run is small enough to copy to every GPU "
                        "(set train.fsdp = false)")
    if t.fsdp and (t.blocks_to_swap or t.fused_backward):
        problems.append("train.fsdp: true cannot be combined with train.blocks_to_swap or train.fused_backward")
    return problems


def _flow_loss_problems(c: RunConfig) -> list[str]:
    """What every flow-matching family refuses: DDPM-only loss keys (each with the flow key that does its job) and a
    resolution its 2x2 latent patches cannot tile."""
    family = get_family(c.model.family)
    if family.objective != "flow_matching":
        return []
    problems = []
    lo = c.loss
    if lo.min_snr_gamma > 0:
        problems.append(f"loss.min_snr_gamma: {lo.min_snr_gamma} is a DDPM weighting; {family.short_title} trains by "
                        "flow matching: set it to 0 and use flow.weighting")
    if c.data.resolution % 16:
        problems.append(f"data.resolution: {c.data.resolution} is not a multiple of 16 ({family.short_title} packs "
                        "2x2 latent patches); use 512, 768, 1024, ...")
    if lo.debiased_estimation:
        problems.append(f"loss.debiased_estimation: true is a DDPM (SNR) weighting; {family.short_title} trains by "
                        "flow matching: set it to false and use flow.weighting")
    if lo.huber_schedule != "constant" and lo.kind in ("huber", "pseudo_huber"):
        problems.append(f"loss.huber_schedule: {lo.huber_schedule!r} follows DDPM timesteps; {family.short_title} "
                        "trains by flow matching with a constant delta: set it to 'constant'")
    if lo.timestep_distribution != "uniform" or lo.timestep_shift != 1.0:
        problems.append(f"loss.timestep_distribution / loss.timestep_shift: DDPM timesteps; {family.short_title} "
                        "draws its timesteps by flow.timestep_sampling and flow.shift: set those instead (and "
                        "leave these at 'uniform' / 1.0)")
    if lo.timestep_min or lo.timestep_max:
        problems.append(f"loss.timestep_min / loss.timestep_max: DDPM timestep bounds; {family.short_title} trains "
                        "by flow matching over the whole range: set them to 0")
    return problems
