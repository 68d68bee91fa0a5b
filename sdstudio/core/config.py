"""The typed run config: one pydantic model with sections, defaults and people-readable validation.

Every field carries a description (the app's settings form shows it as a tooltip) and, where it has
one, a range (the form uses it for spin boxes). `RunConfig.from_dict` turns pydantic's errors into one
`ConfigError` whose lines each name the field, the value given and what is allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config_checks import run_config_problems
from .config_input import Section, format_validation_error, set_dotted
from .config_objective import DiffusionConfig, FlowConfig, LossConfig
from .errors import ConfigError
from .export.formats import DTYPE_NAMES, FORMAT_NAMES
from .models.registry import FAMILY_NAMES, get_family

SCHEMA_VERSION = 1
__all__ = ["SCHEMA_VERSION", "CheckpointConfig", "DataConfig", "DiffusionConfig", "EvalConfig", "ExportConfig",
           "FlowConfig", "LoraConfig", "LossConfig", "ModelConfig", "RunConfig", "SampleConfig", "Section",
           "TrainConfig"]


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
    keep_tokens: int = Field(0, ge=0, le=100, description="Tags (comma-separated) kept in place at the start "
                             "when shuffling or dropping tags (the trigger word, prefix and folder tag count).")
    tag_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of dropping each comma-separated "
                               "tag (after the first data.keep_tokens) from a caption each step (0 = off).")
    caption_prefix: str = Field("", description="Text put in front of every caption (a trigger word), "
                                "joined with ', '; not on DreamBooth class images.")
    caption_suffix: str = Field("", description="Text put after every caption, joined with ', '; not on "
                                "DreamBooth class images.")
    max_token_length: int = Field(75, ge=75, le=225, multiple_of=75, description="Caption tokens the CLIP "
                                  "text encoders read: 75 (one window), 150 or 225 (the caption cut into windows "
                                  "of 75 tokens, encoded apart and concatenated, as A1111 and kohya do); "
                                  "families with CLIP encoders.")
    mask_from_alpha: bool = Field(False, description="Masked training (loss.masked): an image without a mask "
                                  "file uses its alpha channel as the mask (transparent = not trained).")
    folder_trigger: bool = Field(False, description="kohya layout: put each folder's name without the repeats "
                                 "('10_sks dog' -> 'sks dog') in front of its images' captions, as their first "
                                 "tag (a per-folder trigger word).")
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
    prefetch_batches: int = Field(2, ge=0, le=16, description="With data.num_workers = 0: batches a background "
                                  "thread reads ahead while the model trains, so loading images overlaps the GPU's "
                                  "work (0 = read each batch when it is needed). Same batches, same order.")
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
        "Diffusion fine-tunes; flux-dev/flux-schnell: Flux.1 LoRAs (flow matching); sd3: SD3 / SD3.5 medium and "
        "large LoRAs (flow matching); chroma: Chroma1 LoRAs (flow matching, T5 only).")
    path: str = Field("", description="Base model: a diffusers folder or a .safetensors/.ckpt file "
                      "(SD families; Flux / SD3 / Chroma: the transformer file, e.g. flux1-dev.safetensors, "
                      "sd3.5_large.safetensors, Chroma1-HD.safetensors, bf16, fp8 or ComfyUI scaled fp8).")
    vae_path: str = Field("", description="Optional separate VAE file or folder (Flux / SD3 / Chroma as split files: "
                          "ae.safetensors, required).")
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
    text_layers: int = Field(2, ge=0, le=12, description="Layers of the from-scratch text encoder (0 = word and "
                             "position embeddings only: each word reaches the UNet as itself).")
    text_heads: int = Field(4, ge=1, le=16, description="Attention heads of the from-scratch text encoder.")
    max_caption_tokens: int = Field(16, ge=4, le=77, description="Caption length in tokens "
                                    "(from-scratch text encoder).")
    text_causal: bool = Field(True, description="From-scratch text encoder: causal (CLIP's mask: each word sees "
                              "only the words before it) or, off, bidirectional (every word sees the whole "
                              "caption; better at composing attributes, docs/benchmarks.md).")
    text_pooled_to_time: bool = Field(False, description="From-scratch model: add the pooled caption (mean of the "
                                      "text encoder's token states, projected) to the UNet's timestep embedding, "
                                      "as SDXL does with its pooled text, so every ResNet block sees the caption.")
    cross_attention_everywhere: bool = Field(False, description="From-scratch model: levels that "
                                             "attention_levels leaves off get cross-attention to the caption "
                                             "too (cross-attention only, no self-attention, so it stays cheap "
                                             "at high resolution).")
    clip_skip: int = Field(1, ge=1, le=12, description="CLIP layer the captions are read from, counted from "
                           "the end as A1111 / kohya do: 1 = the last (off), 2 = the penultimate (usual for "
                           "anime models); families whose CLIP output is the last layer (SD1, SD2).")
    prediction_type: Literal["auto", "epsilon", "v_prediction", "sample"] = Field(
        "auto", description="Override the prediction type the base model file says (auto = detect).")
    quantize: Literal["none", "fp8", "int8", "nf4"] = Field(
        "none", description="LoRA runs: store the frozen base weights of the denoiser's linear layers quantized "
        "(fp8 e4m3fn or int8 with per-row scales; nf4 = QLoRA's 4 bit, needs pip install 'sdstudio[quant]'), "
        "computed in the weight dtype; the LoRA stays fp32 and exports are unchanged.")
    text_encoder_path: str = Field("", description="Flow-matching families given as split files: the CLIP-L "
                                   "text-encoder file (clip_l.safetensors); empty = from model.path (a diffusers "
                                   "folder).")
    text_encoder_2_path: str = Field("", description="Flow-matching families given as split files: the T5-XXL "
                                     "text-encoder file (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors); "
                                     "empty = from model.path (a diffusers folder).")
    t5_max_length: int = Field(0, ge=0, le=512, description="Caption length in T5 tokens (Flux: 0 = the "
                               "family's default, 512 for dev and Chroma, 256 for schnell; SD3: 256); shorter is faster "
                               "and smaller in the text cache.")
    clip_g_path: str = Field("", description="SD3 given as split files: the CLIP-G (OpenCLIP bigG) text-encoder "
                             "file (clip_g.safetensors); empty = from model.path (a diffusers folder).")
    learned_variance: bool = Field(False, description="Improved-DDPM output head (models trained from scratch): "
                                   "the UNet also predicts v per pixel, the log-variance of each reverse step "
                                   "interpolated between beta_t and beta-tilde_t, trained by loss.vlb_weight x the "
                                   "variational bound. The ddpm (ancestral) sampler uses it; ddim, euler and "
                                   "dpmpp_2m are deterministic and ignore it.")


class TrainConfig(Section):
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd", "adafactor", "adamw8bit", "paged_adamw8bit", "prodigy",
                       "adamw_schedulefree", "lion", "lion8bit", "came", "ademamix", "ademamix8bit"] = Field(
        "adamw", description="Optimizer. prodigy (set learning_rate = 1.0), adamw_schedulefree (no decaying "
        "schedule), lion / came / ademamix need the optimizers extra: pip install 'sdstudio[optimizers]'; "
        "the *8bit ones bitsandbytes: pip install 'sdstudio[bnb]' (they keep optimizer states in 8 bits; paged_ "
        "pages them out to the CPU under memory pressure); adafactor keeps factored second moments (least memory).")
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Peak learning rate.")
    text_encoder_lr: float = Field(0.0, ge=0.0, le=1.0, description="Learning rate of a trained text "
                                   "encoder (0 = same as learning_rate).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD / RMSprop momentum.")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="Weight decay.")
    eps: float = Field(1e-8, gt=0.0, le=1e-2, description="Optimizer epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear", "step",
                          "reduce_on_plateau", "cosine_with_restarts", "polynomial", "warmup_stable_decay",
                          "rex", "piecewise"] = Field("cosine", description="Learning-rate schedule (after "
                                                      "train.warmup_steps).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_step_size: int = Field(1000, ge=1, description="Step decay: steps between decays.")
    lr_gamma: float = Field(0.5, gt=0.0, le=1.0, description="Step decay / plateau factor.")
    plateau_patience: int = Field(3, ge=1, description="Reduce-on-plateau: validations without "
                                  "improvement before the LR drops.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine/linear: final LR as a "
                                "fraction of the peak.")
    lr_cycles: int = Field(1, ge=1, le=100, description="cosine_with_restarts: cosine cycles (hard restarts to "
                           "the peak).")
    lr_power: float = Field(1.0, gt=0.0, le=10.0, description="polynomial: power of the decay (1 = linear).")
    lr_decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="warmup_stable_decay: fraction of the "
                                     "steps after warm-up spent decaying (linearly to min_lr_ratio).")
    lr_piecewise_steps: list[int] = Field(default_factory=list, description="piecewise: steps of the points, "
                                          "increasing; the LR is linear between them and flat beyond.")
    lr_piecewise_values: list[float] = Field(default_factory=list, description="piecewise: LR at each step of "
                                             "lr_piecewise_steps as a fraction of learning_rate (0-1+).")
    prodigy_d_coef: float = Field(1.0, gt=0.0, le=100.0, description="prodigy: d_coef, scales the estimated "
                                  "step size (0.5 = half).")
    prodigy_d0: float = Field(1e-6, gt=0.0, le=1.0, description="prodigy: initial step-size estimate d0.")
    prodigy_safeguard_warmup: bool = Field(False, description="prodigy: safeguard_warmup (use with warm-up).")
    prodigy_bias_correction: bool = Field(False, description="prodigy: use_bias_correction (Adam's).")
    beta3: float = Field(0.9999, gt=0.0, lt=1.0, description="came: confidence beta; ademamix: the slow EMA's "
                         "beta.")
    ademamix_alpha: float = Field(5.0, ge=0.0, le=100.0, description="ademamix: weight of the slow EMA.")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per step per process.")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="Batches accumulated per "
                                       "optimizer step.")
    epochs: int = Field(0, ge=0, description="Epochs to train (used when max_steps is 0).")
    max_steps: int = Field(1500, ge=0, description="Optimizer steps to train (0 = use epochs).")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 = off).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Mixed precision (GPU).")
    ema: bool = Field(False, description="Keep an exponential moving average of the weights.")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0, description="EMA decay (with warm-up).")
    ema_on_cpu: bool = Field(False, description="Keep the EMA weights in CPU memory (GPU runs): the weights are "
                             "copied into pinned CPU buffers without waiting and averaged in a background thread.")
    ema_every: int = Field(1, ge=1, le=1000, description="Update the EMA every N optimizer steps with the decay of "
                           "the N steps multiplied (decay**N): N times fewer updates (and copies to the CPU with "
                           "train.ema_on_cpu); close to the per-step average when the weights move little in N steps.")
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
    blocks_to_swap: int = Field(0, ge=0, le=200, description="LoRA runs: keep this many of the denoiser's largest "
                                "blocks in (pinned) CPU memory and move each to the GPU just before it runs, "
                                "forward and backward (0 = off). Bit-exact; costs transfer time.")
    fused_backward: bool = Field(False, description="Update each parameter as soon as its gradient is ready and "
                                 "free the gradient (no full set of gradients in memory). Needs "
                                 "train.gradient_accumulation = 1 and train.max_grad_norm = 0.")
    offload_activations: bool = Field(False, description="Keep the activations saved for the backward pass in CPU "
                                      "memory (torch's save_on_cpu); with gradient_checkpointing only the "
                                      "checkpoints move. Bit-exact; costs transfer time.")
    offload_frozen: bool = Field(False, description="Move the frozen VAE / text encoders to the CPU once the latent "
                                 "/ text-embedding caches are complete (back to the GPU only for previews).")
    fsdp: bool = Field(False, description="Several GPUs, full fine-tune: shard weights, gradients and optimizer "
                       "states across the processes with FSDP (through accelerate) instead of copying them.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files into RUN_DIR/tensorboard "
                              "(needs the tensorboard package: pip install 'sdstudio[tensorboard]').")
    wandb: bool = Field(False, description="Also log the metrics and sample grids to Weights & Biases (needs the "
                        "wandb package: pip install 'sdstudio[wandb]'); the run's files go to RUN_DIR/wandb.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: W&B files only in RUN_DIR/wandb (upload later with `wandb sync`); "
                               "online: sent as the run trains (needs `wandb login`).")
    wandb_project: str = Field("sdstudio", min_length=1, max_length=128, description="The W&B project name.")
    compile_mode: Literal["regional", "whole"] = Field(
        "regional", description="With train.compile: regional compiles the repeated blocks (the UNet's transformer "
        "and resnet blocks, Flux's double / single blocks) once per shape (a fraction of the warm-up, the same "
        "speed); whole compiles the entire denoiser as one graph.")
    compile_dynamic: bool = Field(False, description="With train.compile: false compiles one graph per shape "
                                  "(each aspect-ratio bucket once: before step 1 with train.compile_prewarm, else when it "
                                  "first comes up; the fastest kernels); "
                                  "true marks batch and image sizes dynamic (one graph for every bucket).")
    compile_cache: bool = Field(True, description="With train.compile: keep compiled graphs and kernels in the "
                                "sdstudio cache folder (compile/), so a later run with the same shapes skips "
                                "most of the warm-up.")
    compile_prewarm: bool = Field(True, description="With train.compile and static shapes "
                                  "(train.compile_dynamic = false): before step 1 (and after a resume), run the "
                                  "compiled model forward and backward once per batch shape the run will train on "
                                  "(each aspect-ratio bucket), then discard the gradients, so no bucket compiles "
                                  "mid-run and step times are steady from step 1. Changes no weight, loss or data "
                                  "order; the warm-up time is reported on its own (warmup_s). Matters with "
                                  "data.bucketing (several shapes); false compiles each shape when it first comes up.")
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math", "default"] = Field(
        "auto", description="Attention kernel order (GPU): auto tries FlashAttention, then memory-efficient, then "
        "cuDNN, then the plain math kernel (the first that supports the shapes and dtype runs); flash / efficient "
        "/ cudnn: that kernel, else math; math: the plain kernel (exact reference); default: torch's own order.")


class SampleConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="Prompts of the preview grid.")
    prompts_file: str = Field("", description="A prompts file in kohya's format, its prompts shown after "
                              "sample.prompts: one a line, '#' comments, options --n negative prompt, --w / --h "
                              "size, --s steps, --l guidance, --d seed (see docs/cli.md).")
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
    type: Literal["lora", "loha", "lokr", "dora", "oft"] = Field(
        "lora", description="Adapter kind (peft): lora; loha (Hadamard product of two low-rank pairs); lokr "
        "(Kronecker product, see lora.factor); dora (LoRA with a learned per-row magnitude); oft (orthogonal "
        "rotation of the input features, see lora.oft_block_size; lora.rank and lora.alpha unused). Exported in "
        "the LyCORIS key formats A1111 / Forge / ComfyUI read (ss_network_module = lycoris.kohya).")
    factor: int = Field(-1, ge=-1, le=1024, description="LoKr: the Kronecker factor the layer sizes are split "
                        "by (-1 = as square as possible, as LyCORIS' default).")
    decompose_both: bool = Field(False, description="LoKr: also factor the smaller Kronecker matrix into a "
                                 "low-rank pair (LyCORIS' decompose_both).")
    oft_block_size: int = Field(32, ge=1, le=1024, description="OFT: size of the orthogonal blocks; it must "
                                "divide the input size of every targeted layer (320, 640, 1280, 768 all take 32).")
    init_from: str = Field("", description="Start the adapter from this LoRA / LyCORIS file (kohya, LyCORIS or "
                           "diffusers keys, from any trainer): its type, rank, alpha and layers replace "
                           "lora.type / rank / alpha / targets (a mismatch is logged). Empty = a new adapter.")


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
    memorisation: bool = Field(True, description="At every sample grid, measure how close the samples are to "
                               "their nearest training image and how much one prompt's samples differ across "
                               "seeds (metrics.jsonl memo_ratio, diversity) and warn once when samples reproduce "
                               "training images or collapse to one look (see docs/metrics.md).")
    memorisation_features: Literal["auto", "pixels", "inception", "clip"] = Field(
        "auto", description="Features the memorisation distances use: pixels (32 x 32, no weights needed), "
        "inception (the FID network of eval.inception_weights), clip (eval.memorisation_clip_model); auto = clip "
        "when a CLIP model is given, else inception when its weights are, else pixels.")
    memorisation_clip_model: str = Field("", description="A CLIP vision model folder (transformers: CLIPModel or "
                                         "CLIPVisionModelWithProjection) for the memorisation features; empty = "
                                         "none.")
    memorisation_threshold: float = Field(0.3, gt=0.0, le=2.0, description="Copy alarm: samples whose median "
                                          "distance to the nearest training image is below this multiple of the "
                                          "training images' own nearest-neighbour distance reproduce training "
                                          "images.")
    collapse_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="Collapse alarm: the samples of one "
                                     "prompt collapsed to one look when their diversity across seeds falls below "
                                     "this fraction of its reference (the smaller of the first measurement and the "
                                     "training set's own diversity).")
    memorisation_max_images: int = Field(4096, ge=2, le=1_000_000, description="Training images compared with "
                                         "(an evenly spaced subset of larger sets); their features are computed "
                                         "once and cached in the run folder.")


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
    flow: FlowConfig = Field(default_factory=FlowConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        problems = run_config_problems(self)
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
