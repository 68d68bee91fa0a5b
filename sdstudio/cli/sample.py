"""`sdstudio sample`: images from a trained run or checkpoint, or from a model file / diffusers folder (plus a
LoRA), with fixed seeds, plus a grid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..core.atomic import write_file_atomic
from ..core.errors import UserError
from .common import EXIT_OK

# core messages about a model given with --model name it as model.path (see cli_text)
# the separate part files of a model kept as split single files: config key -> flag (named after the key)
PART_FLAGS = {"model.vae_path": "--vae", "model.text_encoder_path": "--text-encoder",
              "model.text_encoder_2_path": "--text-encoder-2", "model.clip_g_path": "--clip-g"}
FLAGS = {"model.path": "--model", "lora": "--lora", "prediction_type": "--prediction-type", "out": "--out",
         "model.config_folder": "--config-folder", **PART_FLAGS}
MODEL_SUBJECTS = ("model.path", "lora", "prediction_type", "model.config_folder", *PART_FLAGS)


def register(sub: Any) -> None:
    p = sub.add_parser("sample", help="generate images from a run, a checkpoint or a model file / folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run folder (uses its newest valid checkpoint)")
    src.add_argument("--model", type=Path, help="a Stable Diffusion .safetensors/.ckpt file, a transformer "
                     ".safetensors file (with its part files, below), a diffusers folder, or a folder made by "
                     "`sdstudio export --format diffusers-folder`")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint folder of the run")
    p.add_argument("--lora", type=Path, help="a LoRA file (kohya or diffusers format) applied to --model")
    p.add_argument("--config-folder", type=Path, default=None, help="with --model FILE: the diffusers config "
                   "folder of the single-file model (default: the one sdstudio ships for the detected family)")
    parts = p.add_argument_group("split single files", "with --model TRANSFORMER.safetensors of Flux, SD3 or Chroma: "
                                  "the separate files a run gives as model.* config keys (as ComfyUI keeps them)")
    parts.add_argument("--vae", type=Path, default=None, metavar="FILE",
                       help="the VAE file (model.vae_path; ae.safetensors for Flux / Chroma); also replaces the VAE "
                       "of a Stable Diffusion model or a diffusers folder")
    parts.add_argument("--text-encoder", type=Path, default=None, metavar="FILE",
                       help="the CLIP-L file (model.text_encoder_path: clip_l.safetensors; Flux, SD3)")
    parts.add_argument("--text-encoder-2", type=Path, default=None, metavar="FILE",
                       help="the T5-XXL file (model.text_encoder_2_path: t5xxl_fp16.safetensors; Flux, SD3, Chroma)")
    parts.add_argument("--clip-g", type=Path, default=None, metavar="FILE",
                       help="the CLIP-G file (model.clip_g_path: clip_g.safetensors; SD3)")
    p.add_argument("--prediction-type", choices=["auto", "epsilon", "v_prediction", "sample"], default="auto",
                   help="with --model: override what the model file says (e.g. a v-prediction SD2/SDXL file "
                   "without the marker keys); default: detect")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable: one grid row each)")
    p.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                   help="prompts in kohya's format, after any --prompt: one a line, '#' comments, per-prompt "
                   "--n negative, --w/--h size, --s steps, --l guidance, --d seed (docs/cli.md)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0; image k uses seed+k")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "dpmpp_2m"], default=None)
    p.add_argument("--raw", action="store_true", help="use the raw weights even when the checkpoint has EMA")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run, flags=FLAGS)


def run(args: argparse.Namespace) -> int:
    if args.lora is not None and args.model is None:
        raise UserError(f"--lora {args.lora}: a LoRA is applied to a base model; give it with --model BASE_MODEL "
                        "(a run's LoRA is sampled with --run RUN_DIR alone)")
    if args.model is not None and args.checkpoint is not None:
        raise UserError(f"--checkpoint {args.checkpoint}: belongs with --run RUN_DIR, not with --model")
    if args.model is not None and args.raw:
        raise UserError("--raw: belongs with --run RUN_DIR (a checkpoint's raw vs EMA weights), not with --model")
    if args.model is None and args.prediction_type != "auto":
        raise UserError(f"--prediction-type {args.prediction_type}: only for --model (a run knows what it predicts)")
    if args.model is None and args.config_folder is not None:
        raise UserError(f"--config-folder {args.config_folder}: only for --model with a single-file model")
    given_parts = {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in PART_FLAGS.items()}
    if args.model is None and any(given_parts.values()):
        flag = next(PART_FLAGS[key] for key, v in given_parts.items() if v is not None)
        raise UserError(f"{flag}: only for --model (a run loads the files its config names)")
    if not args.prompt and args.prompts_file is None:
        raise UserError("give at least one --prompt or a --prompts-file")
    if args.n < 1:
        raise UserError(f"--n {args.n}: give at least 1 image per prompt")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")
    # the sampling modules import torch and diffusers: on demand, so `sdstudio --help` and `presets` start fast
    from PIL import Image

    from ..core.sampling.sampler import make_grid

    if args.model is not None:
        from ..core.sampling.from_files import load_model

        args.flag_subjects = MODEL_SUBJECTS  # with --run, model.path is the run's base model, not a flag

        loaded: Any = load_model(args.model, lora=args.lora, config_folder=args.config_folder,
                                 prediction_type=args.prediction_type,
                                 files={k: v for k, v in given_parts.items() if v is not None})
        what = loaded.describe()
    else:
        from ..core.sampling.from_run import load_trained

        loaded = load_trained(args.run, args.checkpoint, use_ema=not args.raw)
        what = f"checkpoint {loaded.checkpoint.name}{', EMA weights' if loaded.ema_used else ''}"
    from ..core.sampling.prompts_file import PromptSpec, read_prompts_file
    from ..core.sampling.sampler import stack_padded

    specs = [PromptSpec(p) for p in args.prompt]
    if args.prompts_file is not None:
        specs += read_prompts_file(args.prompts_file)
        for spec in specs:
            if spec.ignored:
                print(f"note: {', '.join(spec.ignored)} ignored for prompt {spec.prompt!r}", file=sys.stderr)
    if any(spec.settings() for spec in specs):
        rows = []
        for spec in specs:  # the line's own settings; the flags, then the model's defaults, for the rest
            first = args.seed if spec.seed is None else spec.seed
            side = loaded.bundle.sample_size * loaded.bundle.model_family.latent_downscale
            size = (spec.width or side, spec.height or side) if (spec.width or spec.height) else None
            rows.append(loaded.generate(
                [spec.prompt], [first + k for k in range(args.n)], steps=spec.steps or args.steps,
                guidance=args.guidance if spec.guidance is None else spec.guidance,
                sampler=spec.sampler or args.sampler,
                negative_prompt=args.negative if spec.negative is None else spec.negative, size=size))
        images = stack_padded(rows)
        singles = [image for row in rows for image in row]  # each at its own size
    else:
        seeds = [args.seed + k for k in range(args.n)]
        images = loaded.generate([s.prompt for s in specs], seeds, steps=args.steps, guidance=args.guidance,
                                 sampler=args.sampler, negative_prompt=args.negative)
        singles = list(images)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for i in range(len(specs)):
            for k in range(args.n):
                _save(Image.fromarray(singles[i * args.n + k]), args.out / f"{i}-{k}.png")
        _save(Image.fromarray(make_grid(images, rows=len(specs))), args.out / "grid.png")
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write images ({exc.strerror or exc})") from None
    print(f"{len(images)} images and grid.png written to {args.out} ({what})")
    return EXIT_OK


def _save(image: Any, path: Path) -> None:
    write_file_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
