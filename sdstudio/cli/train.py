"""`sdstudio train`: run or resume training headless, with a tqdm progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..core import events as ev
from ..core.control import TrainingControl
from ..core.errors import UserError
from ..core.runs import CONFIG_FILE, RunFolder, default_run_dir
from .common import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_config_args,
    cli_message,
    describe_eval,
    parse_sets,
    resolve_config,
    say,
    stop_on_sigint,
)
from .console import warning_already_shown

# Keys --resume may change: they alter neither the model nor the data order.
RESUME_SAFE_PREFIXES = ("sample.", "checkpoint.", "eval.")
RESUME_SAFE_KEYS = {"train.max_steps", "train.epochs", "train.log_every", "train.val_every_steps",
                    "train.nan_skip_steps", "train.oom_skip_batches", "train.threads", "data.num_workers",
                    "train.device", "train.tensorboard", "train.wandb", "train.wandb_mode", "train.wandb_project"}


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model (default: the demo preset on the bundled demo data)",
                       description="Train headless. Ctrl-C saves a resumable checkpoint and exits (code 130).")
    add_config_args(p)
    p.add_argument("--out", type=Path, help="run folder (default: a new folder in the runs folder)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, flags={"out": "--out", "resume": "--resume"})


def _resume_config(args: argparse.Namespace) -> tuple[Any, Path]:
    run_dir: Path = args.resume
    if args.preset or args.config or args.data:
        raise UserError("--resume continues a run with its own config; --preset/--config/--data cannot be combined")
    if args.out is not None and args.out.resolve() != run_dir.resolve():
        raise UserError(f"--out {args.out}: with --resume the run is written to its own folder {run_dir}")
    run = RunFolder(run_dir)
    if not run_dir.is_dir() or not run.is_run():
        raise UserError(f"--resume {run_dir}: not an sdstudio run folder (no {CONFIG_FILE})")
    config = run.load_config()
    overrides = parse_sets(args.sets)
    refused = [k for k in overrides if k not in RESUME_SAFE_KEYS and not k.startswith(RESUME_SAFE_PREFIXES)]
    if refused:
        raise UserError(f"--set {', '.join(refused)}: cannot change when resuming (it would change the model or "
                        "the data order); allowed: train.max_steps, train.epochs, sample.*, checkpoint.*")
    if overrides:
        config = config.with_overrides(overrides)
        run.save_config(config)
    return config, run_dir


def run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        config, run_dir = _resume_config(args)
        resume = True
    else:
        config, label = resolve_config(args)
        run_dir = args.out.resolve() if args.out is not None else default_run_dir(label)
        resume = False
    return drive_training(config, run_dir, resume=resume, quiet=args.quiet, args=args)


def drive_training(config: Any, run_dir: Path, *, resume: bool, quiet: bool, args: argparse.Namespace) -> int:
    """Train (or resume) ``config`` into ``run_dir`` with a progress bar; the exit code (also `sdstudio rerun`'s)."""
    from ..core.train.loop import train  # torch/diffusers import only when training

    control = TrainingControl()
    bar = None
    phase_bar = None  # caching progress before training starts
    code = EXIT_FAILURE
    with stop_on_sigint(control, ""):
        try:
            for event in train(config, control, run_dir=run_dir, resume=resume):
                if isinstance(event, ev.Started):
                    if not quiet:
                        bar = tqdm(total=event.total_steps, initial=event.resumed_from_step, unit="step",
                                   dynamic_ncols=True, file=sys.stderr)
                    say(f"run folder: {event.run_dir}")
                elif isinstance(event, ev.StepMetrics):
                    if bar is not None:
                        bar.update(event.step - bar.n)
                        bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", img_s=f"{event.img_per_s:.1f}")
                elif isinstance(event, ev.Progress) and not quiet:
                    if phase_bar is None or phase_bar.desc != event.what:
                        if phase_bar is not None:
                            phase_bar.close()
                        phase_bar = tqdm(total=event.total, desc=event.what, unit="item", file=sys.stderr,
                                         dynamic_ncols=True)
                    phase_bar.update(event.done - phase_bar.n)
                    if event.done >= event.total:
                        phase_bar.close()
                        phase_bar = None
                elif isinstance(event, ev.Status) and event.phase == "compiled":  # train.compile_prewarm
                    say(f"torch.compile warm-up: {event.text}")
                elif isinstance(event, ev.Warning) and not warning_already_shown(event.text):
                    say(f"warning: {cli_message(event.text, args)}")
                elif isinstance(event, ev.ValidationResult):
                    say(f"step {event.step}: validation loss {event.val_loss:.5f}")
                elif isinstance(event, ev.EvalResult):
                    say(f"step {event.step}: {describe_eval(event)}")
                elif isinstance(event, ev.MemorisationResult) and event.ratio is not None:  # eval.memorisation
                    div = "" if event.diversity is None else f", diversity across seeds {event.diversity:.3f}"
                    say(f"step {event.step}: memorisation: copy ratio {event.ratio:.3f} (near 0 = copies of "
                        f"training images){div}")
                elif isinstance(event, ev.SampleGrid) and event.path is not None:
                    say(f"step {event.step}: samples {event.path}")
                elif isinstance(event, ev.CheckpointSaved):
                    say(f"step {event.step}: checkpoint {event.path}")
                elif isinstance(event, ev.Finished):
                    if bar is not None:
                        bar.update(event.step - bar.n)
                        bar.close()
                        bar = None
                    if event.reason == "stopped":
                        print(f"stopped at step {event.step}; resume with: sdstudio train --resume {event.run_dir}",
                              file=sys.stderr)
                        code = EXIT_INTERRUPTED
                    else:
                        early = " (early stopping)" if event.reason == "early_stopped" else ""
                        print(f"finished{early}: {event.run_dir}", file=sys.stderr)
                        code = EXIT_OK
                elif isinstance(event, ev.Failed):
                    if bar is not None:
                        bar.close()
                        bar = None
                    where = f" (resumable: sdstudio train --resume {event.run_dir})" if event.resumable_from else ""
                    print(f"sdstudio: {cli_message(event.message, args)}{where}", file=sys.stderr)
                    if event.kind == "error" and event.run_dir is not None:
                        print(f"sdstudio: details in {RunFolder(event.run_dir).log_file}", file=sys.stderr)
                    code = EXIT_BAD_INPUT if event.kind == "input" else EXIT_FAILURE
        finally:
            for open_bar in (bar, phase_bar):
                if open_bar is not None:
                    open_bar.close()
        return code
