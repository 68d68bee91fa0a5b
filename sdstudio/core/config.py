"""The typed run config: one pydantic model with sections, defaults and people-readable validation.

Every field carries a description (the app's settings form shows it as a tooltip) and, where it has
one, a range (the form uses it for spin boxes). `RunConfig.from_dict` turns pydantic's errors into one
`ConfigError` whose lines each name the field, the value given and what is allowed.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .export.formats import DTYPE_NAMES, FORMAT_NAMES, export_problem
from .models.registry import FAMILY_NAMES, get_family

SCHEMA_VERSION = 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    path: str = Field("", description="Image folder: a plain folder, a kohya parent of N_name folders, "
                      "or an imagefolder with metadata.jsonl. Empty = the bundled demo dataset.")
    reg_path: str = Field("", description="Folder of regularisation (class) images for DreamBooth prior "
                          "preservation: each step also trains on as many class images (weight: "
                          "loss.prior_loss_weight).")
    class_prompt: str = Field("", description="Caption of class images that have none (DreamBooth), e.g. "
                              "'a photo of a dog'.")
    resolution: int = Field(32, ge=8, le=4096, multiple_of=8, description="Training resolution in pixels "
                            "(square side; with bucketing, the target area is resolution squared).")
    center_crop: bool = Field(True, description="Crop the centre (else a random crop each step).")
    caption_extension: str = Field(".txt", description="Sidecar caption extension tried first "
                                   "(.caption is always tried too).")
    instance_prompt: str = Field("", description="Caption for images that have none (DreamBooth).")
    caption_template: str = Field("", description="Template applied to every caption, e.g. "
                                  "'a photo of {caption}'. Empty = captions as written.")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags each step.")
    keep_tokens: int = Field(0, ge=0, le=100, description="Tags kept in place at the start when shuffling.")
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Probability of training with an "
                                   "empty caption (enables classifier-free guidance at sampling).")
    flip_p: float = Field(0.0, ge=0.0, le=1.0, description="Probability of a horizontal flip.")
    rotation_degrees: float = Field(0.0, ge=0.0, le=45.0, description="Maximum random rotation (degrees).")
    color_jitter: float = Field(0.0, ge=0.0, le=1.0, description="Strength of brightness/contrast/"
                                "saturation jitter (0 = off).")
    hue_jitter: float = Field(0.0, ge=0.0, le=0.5, description="Maximum hue shift (fraction of the wheel).")
    random_scale: float = Field(0.0, ge=0.0, le=0.5, description="Random crop/scale: crop up to this "
                                "fraction of the side before resizing (0 = off).")
    background: tuple[int, int, int] = Field((255, 255, 255), description="RGB colour transparent "
                                             "images are composited on.")
    val_split: float = Field(0.05, ge=0.0, le=0.5, description="Fraction of images held out for "
                             "validation (fixed by val_seed).")
    val_path: str = Field("", description="Separate validation folder (overrides val_split).")
    val_seed: int = Field(1234, description="Seed of the validation split.")
    num_workers: int = Field(0, ge=0, le=64, description="Data-loader worker processes (0 = in the "
                             "training process; fine for small images).")
    bucketing: bool = Field(False, description="Aspect-ratio bucketing: each image trains at the bucket size "
                            "closest to its aspect ratio (area about resolution squared) instead of a square crop.")
    bucket_step: int = Field(64, ge=8, le=256, multiple_of=8, description="Side step of the bucket sizes in "
                             "pixels (8 is used below 128 px).")
    min_bucket_side: int = Field(0, ge=0, le=8192, description="Shortest bucket side (0 = half the resolution).")
    max_bucket_side: int = Field(0, ge=0, le=8192, description="Longest bucket side (0 = twice the resolution).")
    cache_latents: bool = Field(False, description="Latent models: encode every image once with the VAE into a "
                                "disk cache (reused across runs, rebuilt when anything changes); random crop, "
                                "rotation and colour jitter then do not apply.")
    cache_flip_variants: bool = Field(False, description="With the latent cache: also cache each image flipped, "
                                      "so data.flip_p still applies.")
    cache_text_embeddings: bool = Field(False, description="Latent models with frozen text encoders: encode each "
                                        "caption once into a disk cache (captions not seen before, e.g. shuffled "
                                        "tags, are encoded when first met and cached too).")
    verify_images: bool = Field(True, description="Decode every image once before training and skip broken "
                                "files with a warning (remembered, so later runs only check new files).")
    cache_in_memory: bool = Field(True, description="Keep decoded, resized images in memory "
                                  "(small datasets) so later epochs skip decoding.")


class ModelConfig(Section):
    # the registry's families (core/models/registry.py)
    family: Literal[FAMILY_NAMES] = Field(  # type: ignore[valid-type]
        "pixel", description="pixel: a small model trained from scratch in pixel space; sd1/sd2/sdxl: Stable "
        "Diffusion fine-tunes.")
    path: str = Field("", description="Base model: a diffusers folder or a .safetensors/.ckpt file "
                      "(SD families).")
    vae_path: str = Field("", description="Optional separate VAE file or folder.")
    config_folder: str = Field("", description="diffusers config folder for a single-file model (empty = the "
                               "one sdstudio ships for the detected family).")
    conditional: bool = Field(True, description="Condition on captions (pixel family).")
    block_channels: list[int] = Field([32, 64, 64], min_length=1, max_length=6,
                                      description="Channels of each UNet level (its depth and width).")
    layers_per_block: int = Field(1, ge=1, le=4, description="ResNet layers per UNet level.")
    attention_levels: list[bool] = Field([False, True, True], description="Which levels have "
                                         "(cross-)attention; one entry per level.")
    attention_head_dim: int = Field(16, ge=4, le=256, description="Channels per attention head.")
    activation: Literal["silu", "relu", "leaky_relu", "gelu"] = Field("silu", description="Activation.")
    dropout: float = Field(0.0, ge=0.0, le=0.5, description="Dropout inside ResNet blocks.")
    norm_groups: int = Field(8, ge=1, le=64, description="GroupNorm groups.")
    init: Literal["default", "normal", "xavier", "kaiming"] = Field("default", description="Weight "
                                                                    "initialisation of a new model.")
    init_std: float = Field(0.02, gt=0.0, le=1.0, description="Std of the 'normal' initialisation.")
    text_width: int = Field(64, ge=8, le=1024, description="Hidden size of the from-scratch text encoder.")
    text_layers: int = Field(2, ge=1, le=12, description="Layers of the from-scratch text encoder.")
    text_heads: int = Field(4, ge=1, le=16, description="Attention heads of the from-scratch text encoder.")
    max_caption_tokens: int = Field(16, ge=4, le=77, description="Caption length in tokens "
                                    "(from-scratch text encoder).")
    prediction_type: Literal["auto", "epsilon", "v_prediction", "sample"] = Field(
        "auto", description="Override the prediction type the base model file says (auto = detect).")


class DiffusionConfig(Section):
    schedule: Literal["linear", "scaled_linear", "cosine"] = Field("cosine", description="Noise schedule "
                                                                   "(beta schedule).")
    num_timesteps: int = Field(1000, ge=10, le=10000, description="Training timesteps.")
    beta_start: float = Field(0.0001, gt=0.0, lt=0.1, description="First beta (linear schedules).")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="Last beta (linear schedules).")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field("epsilon", description="What "
                                                                          "the model predicts.")
    zero_terminal_snr: bool = Field(False, description="Rescale betas to zero terminal SNR.")


class LossConfig(Section):
    kind: Literal["mse", "l1", "huber"] = Field("mse", description="Loss between prediction and target.")
    huber_delta: float = Field(0.1, gt=0.0, le=10.0, description="Huber loss delta.")
    min_snr_gamma: float = Field(0.0, ge=0.0, le=100.0, description="Min-SNR weighting gamma (0 = off, "
                                 "5 is usual).")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="Noise offset (0.03-0.1 helps very "
                                "dark/bright images).")
    input_perturbation: float = Field(0.0, ge=0.0, le=1.0, description="Input perturbation of the noise "
                                      "(0.1 is usual).")
    prior_loss_weight: float = Field(1.0, ge=0.0, le=10.0, description="DreamBooth: weight of the loss on "
                                     "class images (data.reg_path).")
    timestep_min: int = Field(0, ge=0, description="Lowest training timestep.")
    timestep_max: int = Field(0, ge=0, description="Highest training timestep + 1 (0 = num_timesteps).")


class TrainConfig(Section):
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd", "adafactor", "adamw8bit"] = Field(
        "adamw", description="Optimizer.")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Peak learning rate.")
    text_encoder_lr: float = Field(0.0, ge=0.0, le=1.0, description="Learning rate of a trained text "
                                   "encoder (0 = same as learning_rate).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD / RMSprop momentum.")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="Weight decay.")
    eps: float = Field(1e-8, gt=0.0, le=1e-2, description="Optimizer epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear", "step",
                          "reduce_on_plateau"] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_step_size: int = Field(1000, ge=1, description="Step decay: steps between decays.")
    lr_gamma: float = Field(0.5, gt=0.0, le=1.0, description="Step decay / plateau factor.")
    plateau_patience: int = Field(3, ge=1, description="Reduce-on-plateau: validations without "
                                  "improvement before the LR drops.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine/linear: final LR as a "
                                "fraction of the peak.")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per step per process.")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="Batches accumulated per "
                                       "optimizer step.")
    epochs: int = Field(0, ge=0, description="Epochs to train (used when max_steps is 0).")
    max_steps: int = Field(1500, ge=0, description="Optimizer steps to train (0 = use epochs).")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 = off).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Mixed precision (GPU).")
    ema: bool = Field(False, description="Keep an exponential moving average of the weights.")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="EMA decay (with warm-up).")
    ema_on_cpu: bool = Field(False, description="Keep the EMA weights in CPU memory.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    compile: bool = Field(False, description="torch.compile the model (GPU; slow warm-up).")
    seed: int = Field(0, ge=0, description="Seed for initialisation, data order, noise and augmentations.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where to train.")
    log_every: int = Field(10, ge=1, description="Steps between logged metrics.")
    val_every_steps: int = Field(0, ge=0, description="Steps between validations (0 = each epoch).")
    early_stopping_patience: int = Field(0, ge=0, description="Stop after this many validations without an "
                                         "improvement of the validation loss (0 = off).")
    early_stopping_min_delta: float = Field(0.0, ge=0.0, description="Smallest decrease of the validation loss "
                                            "that counts as an improvement.")
    nan_skip_steps: int = Field(0, ge=0, description="Bad (NaN/inf) steps skipped before stopping.")
    oom_skip_batches: int = Field(0, ge=0, le=100, description="CUDA out-of-memory batches skipped before "
                                  "stopping (the run then stops with a checkpoint and advice).")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0 = torch's default).")
    train_text_encoder: bool = Field(False, description="Full fine-tune (SD families): also train the text "
                                     "encoder(s), at train.text_encoder_lr. For a LoRA run use lora.text_encoder.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files into RUN_DIR/tensorboard "
                              "(needs the tensorboard package: pip install 'sdstudio[tensorboard]').")
    wandb: bool = Field(False, description="Also log the metrics and sample grids to Weights & Biases (needs the "
                        "wandb package: pip install 'sdstudio[wandb]'); the run's files go to RUN_DIR/wandb.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: W&B files only in RUN_DIR/wandb (upload later with `wandb sync`); "
                               "online: sent as the run trains (needs `wandb login`).")
    wandb_project: str = Field("sdstudio", min_length=1, max_length=128, description="The W&B project name.")


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts of the preview grid.")
    negative_prompt: str = Field("", description="Negative prompt (with guidance).")
    seeds: list[int] = Field([0, 1, 2, 3], min_length=1, description="Seeds: one image per seed and "
                             "prompt.")
    every_epochs: int = Field(1, ge=0, description="Sample every N epochs (0 = off).")
    every_steps: int = Field(0, ge=0, description="Sample every N steps (0 = off).")
    steps: int = Field(25, ge=1, le=1000, description="Sampler steps.")
    guidance: float = Field(3.0, ge=1.0, le=30.0, description="Classifier-free guidance scale "
                            "(1 = off).")
    sampler: Literal["ddpm", "ddim", "euler", "dpmpp_2m"] = Field("ddim", description="Sampler.")
    at_end: bool = Field(True, description="Sample once more when the run ends.")


class CheckpointConfig(Section):
    every_steps: int = Field(500, ge=0, description="Save every N steps (0 = off).")
    every_epochs: int = Field(0, ge=0, description="Save every N epochs (0 = off).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept (the newest valid one is never "
                           "deleted).")
    keep_best: bool = Field(False, description="Save a checkpoint whenever the validation loss improves and keep "
                            "it (marked in checkpoints/best.json) whatever keep_last says; on whenever early "
                            "stopping is.")
    save_optimizer: bool = Field(True, description="Save optimizer state (needed for exact resume).")


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train a LoRA instead of the full model (SD families).")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, le=0.9, description="LoRA dropout.")
    targets: Literal["attention", "attention_ff", "all"] = Field("attention", description="Which "
                                                                 "layers get adapters.")
    text_encoder: bool = Field(False, description="Also train a LoRA on the text encoder(s) (both for SDXL), at "
                               "train.text_encoder_lr; exported as lora_te_ / lora_te1_ / lora_te2_ keys.")


class EvalConfig(Section):
    inception_weights: str = Field("", description="The FID Inception-v3 weights file "
                                   "(pt_inception-2015-12-05-6726825d.pth, see docs/metrics.md). Empty = FID and "
                                   "KID are off; they are never estimated without it.")
    fid_every_epochs: int = Field(0, ge=0, description="Compute FID/KID every N epochs (0 = not per epoch).")
    fid_every_steps: int = Field(0, ge=0, description="Compute FID/KID every N steps (0 = not by steps).")
    fid_at_end: bool = Field(True, description="Compute FID/KID when the run ends (when inception_weights is set).")
    num_samples: int = Field(64, ge=2, le=50000, description="Images generated for FID/KID, from the validation "
                             "captions with fixed seeds; the validation images are the reference set.")
    sampler_steps: int = Field(0, ge=0, le=1000, description="Sampler steps of the FID/KID images (0 = "
                               "sample.steps).")
    batch_size: int = Field(16, ge=1, le=512, description="Images generated (and fed to Inception) per batch.")


class ExportConfig(Section):
    formats: list[Literal[FORMAT_NAMES]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Export automatically at the end of the run (into the run's exports/ "
        "folder) in these formats; empty = no automatic export.")
    every_epochs: int = Field(0, ge=0, description="Also export every N epochs (0 = only at the end).")
    dtype: Literal[DTYPE_NAMES] = Field("fp16", description="Tensor dtype of automatic exports.")  # type: ignore[valid-type]
    ema: bool = Field(False, description="Export the EMA weights (needs train.ema).")


class RunConfig(BaseModel):
    """Everything a run needs. TOML sections map one-to-one to these fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    schema_version: int = Field(SCHEMA_VERSION, description="Config schema version (for migrations).")
    name: str = Field("", description="Run name (used in the run folder's name).")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        problems: list[str] = []
        m, t, lo = self.model, self.train, self.loss
        if len(m.attention_levels) != len(m.block_channels):
            problems.append(f"model.attention_levels: {len(m.attention_levels)} entries given but "
                            f"model.block_channels has {len(m.block_channels)} levels; give one per level")
        bad = [c for c in m.block_channels if c % m.norm_groups]
        if bad:
            problems.append(f"model.block_channels: {bad} not divisible by model.norm_groups="
                            f"{m.norm_groups}; use multiples of {m.norm_groups}")
        family = get_family(m.family)
        problems += family.config_problems(self)
        if m.text_width % m.text_heads:
            problems.append(f"model.text_heads: {m.text_heads} does not divide model.text_width="
                            f"{m.text_width}")
        if t.max_steps == 0 and t.epochs == 0:
            problems.append("train.max_steps and train.epochs: both 0; set one of them to say when the "
                            "run ends")
        tmax = lo.timestep_max or self.diffusion.num_timesteps
        if tmax > self.diffusion.num_timesteps:
            problems.append(f"loss.timestep_max: {lo.timestep_max} exceeds diffusion.num_timesteps="
                            f"{self.diffusion.num_timesteps}")
        if lo.timestep_min >= tmax:
            problems.append(f"loss.timestep_min: {lo.timestep_min} must be below the timestep maximum "
                            f"{tmax}")
        if not 0.0 < t.betas[0] < 1.0 or not 0.0 < t.betas[1] < 1.0:
            problems.append(f"train.betas: {list(t.betas)}; both must be in (0, 1)")
        if t.mixed_precision != "no" and t.device == "cpu":
            problems.append(f"train.mixed_precision: {t.mixed_precision!r} needs a GPU but train.device "
                            "is 'cpu'; use 'no' on the CPU")
        if self.diffusion.schedule != "cosine" and self.diffusion.beta_end <= self.diffusion.beta_start:
            problems.append(f"diffusion.beta_end: {self.diffusion.beta_end} must be above "
                            f"diffusion.beta_start={self.diffusion.beta_start}")
        for fmt in self.export.formats:
            reason = export_problem(fmt, family, lora=self.lora.enabled)
            if reason:
                problems.append(f"export.formats: {fmt!r} does not fit this run. {reason}")
        if t.train_text_encoder and self.lora.enabled:
            problems.append("train.train_text_encoder: true trains the whole text encoder, but this is a LoRA run "
                            "(lora.enabled = true); use lora.text_encoder for a text-encoder LoRA")
        if self.lora.text_encoder and not self.lora.enabled:
            problems.append("lora.text_encoder: true, but lora.enabled = false (a full fine-tune); use "
                            "train.train_text_encoder to train the whole text encoder")
        trains_text = (self.lora.text_encoder if self.lora.enabled else t.train_text_encoder)
        if trains_text and family.text_embeddings_cacheable and self.data.cache_text_embeddings:
            key = "lora.text_encoder" if self.lora.enabled else "train.train_text_encoder"
            problems.append(f"data.cache_text_embeddings: true, but {key} = true trains the text encoder, so its "
                            "embeddings change every step; turn one of them off")
        if self.export.ema and not t.ema:
            problems.append("export.ema: true needs train.ema = true")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- conversions -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        """Validate a (possibly partial) nested dict; errors become one ConfigError naming each field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A new config with dotted-key overrides (``{"train.learning_rate": 1e-4}``) applied."""
        data = self.to_dict()
        for key, value in overrides.items():
            set_dotted(data, key, value)
        return RunConfig.from_dict(data, source="override")

    def readiness_problems(self) -> list[str]:
        """What still stops this (valid) config from running: presets may leave paths for the user."""
        problems = []
        if get_family(self.model.family).fine_tunes_base_model and not self.model.path:
            problems.append(f"model.path: empty, but model.family = {self.model.family!r} fine-tunes a base model; "
                            "set it to a diffusers folder or a .safetensors/.ckpt file")
        return problems

    def resolved_timestep_range(self) -> tuple[int, int]:
        return self.loss.timestep_min, (self.loss.timestep_max or self.diffusion.num_timesteps)


def _allowed(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    typ = err.get("type", "")
    if typ == "literal_error" and "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for key, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "a multiple of")):
        if key in ctx:
            return f"allowed: {word} {ctx[key]}"
    if typ == "extra_forbidden":
        return "unknown key (check the spelling; `sdstudio presets show demo` lists all keys)"
    return err.get("msg", "invalid")


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        if err.get("type") == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            lines.extend(f"{source}: {part.strip()}" for part in msg.split("\n") if part.strip())
            continue
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if err.get("type") == "literal_error":
            lines.append(f"{source}: {field} = {shown} is invalid ({_allowed(err)})")
        else:
            lines.append(f"{source}: {field} = {shown} is invalid: {err['msg']} ({_allowed(err)})")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["train"]["learning_rate"]`` from ``"train.learning_rate"``; unknown sections are errors."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{key}: not a config key; a key looks like section.name, e.g. train.learning_rate")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def field_docs() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every config field, for docs and the settings form."""
    rows: list[tuple[str, str, str, str]] = []
    default = RunConfig().to_dict()
    for sname, sfield in RunConfig.model_fields.items():
        ann = sfield.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for fname, f in ann.model_fields.items():
                typ = _type_name(f.annotation)
                rows.append((f"{sname}.{fname}", typ, repr(default[sname][fname]), f.description or ""))
        else:
            rows.append((sname, getattr(ann, "__name__", str(ann)), repr(default[sname]),
                         sfield.description or ""))
    return rows
