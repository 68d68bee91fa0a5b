"""The one training loop: ``train(config, control) -> Iterator[Event]``, used by the CLI, the app, the
tests and the benchmarks alike. Built on accelerate (device placement, mixed precision, several
processes); only the main process writes files and yields UI events."""

from __future__ import annotations

import logging
import math
import shutil
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import events as ev
from ..config import RunConfig
from ..control import TrainingControl
from ..errors import UserError
from ..export.api import export
from ..export.formats import get_format, torch_dtype
from ..runs import MetricsWriter, RunFolder, RunLock, close_run_log, metrics_row
from .evaluation import evaluate
from .prewarm import prewarm_events
from .progress import StepTimer
from .recipe import schedule_snapshot
from .session import TrainingSession
from .step import NonFiniteLoss
from .tensorboard_log import TensorBoardLog, open_tensorboard
from .wandb_log import with_wandb

log = logging.getLogger("sdstudio")
__all__ = ["NonFiniteLoss", "train"]


@dataclass
class _Window:
    """Metrics accumulated between two log lines: device tensors while the steps return them unread (no sync
    per step; float64, so the sums equal the host's), floats otherwise; a skipped (NaN) step is not averaged."""

    loss_sum: Any = 0.0
    grad_sum: Any = 0.0
    steps: Any = 0
    images: int = 0
    t0: float = field(default_factory=time.perf_counter)
    # the recipe's extra loss terms (loss.vlb_weight, loss.contrastive_weight), summed unread like the loss
    term_sums: dict[str, Any] = field(default_factory=dict)
    term_steps: dict[str, int] = field(default_factory=dict)

    def add(self, loss: Any, grad_norm: Any) -> None:
        if isinstance(loss, torch.Tensor):
            good = torch.isfinite(loss)
            self.loss_sum = torch.where(good, loss, 0.0) + self.loss_sum
            self.grad_sum = torch.where(good, grad_norm, 0.0) + self.grad_sum
            self.steps = good.to(torch.float64) + self.steps
        elif math.isfinite(loss):
            self.loss_sum += loss
            self.grad_sum += grad_norm
            self.steps += 1

    def add_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """The recipe's terms of the step just taken (its last micro-batch), detached; taken out of ``terms``
        so a step that computes none adds nothing."""
        for name in list(terms):
            value = terms.pop(name).detach().to(torch.float64)
            self.term_sums[name] = value + self.term_sums.get(name, 0.0)
            self.term_steps[name] = self.term_steps.get(name, 0) + 1

    def term_means(self) -> dict[str, float]:
        """Mean of each recipe term over the window's steps (read when the window is logged)."""
        return {name: float(total) / self.term_steps[name] for name, total in self.term_sums.items()}

    def means(self) -> tuple[float, float]:
        """(mean loss, mean grad norm) of the window's good steps (NaN without one): one read of the device."""
        loss_sum, grad_sum, steps = (float(v) for v in (
            torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self._device()) for v in
                         (self.loss_sum, self.grad_sum, self.steps)]).tolist()))
        return (loss_sum / steps, grad_sum / steps) if steps else (float("nan"), float("nan"))

    def _device(self) -> torch.device:
        for v in (self.loss_sum, self.grad_sum, self.steps):
            if isinstance(v, torch.Tensor):
                return v.device
        return torch.device("cpu")


def train(config: RunConfig, control: TrainingControl | None = None, *, run_dir: Path | None = None,
          resume: bool = False) -> Iterator[ev.Event]:
    """Run (or resume) training; always ends with ``Finished`` or ``Failed``; never raises for user errors.

    ``run_dir``: where the run writes (created; must be new unless ``resume``).
    """
    control = control or TrainingControl()
    session: TrainingSession | None = None
    lock: RunLock | None = None
    handler = None
    created = False
    try:
        problems = config.readiness_problems()
        if problems:
            raise UserError("; ".join(problems))
        session = TrainingSession(config, run_dir=run_dir, resume=resume)
        if session.is_main and run_dir is not None:
            folder = RunFolder(run_dir)
            if not resume:
                folder.create()
                created = True
            lock = folder.lock()
            lock.acquire()
            handler = folder.open_log()
            if not resume:
                folder.save_config(config)
        yield from _run(session, control)
    except UserError as exc:
        log.error("%s", exc)
        if created and session is not None and not session.progress.started:
            # bad input found before training began: leave nothing half-written behind
            _remove_new_run_dir(run_dir, handler, lock)
            handler = lock = None
            run_dir = None
        yield ev.Failed(str(exc), "", _resumable(session), run_dir, kind="input")
    except NonFiniteLoss as exc:
        log.error("%s", exc)
        yield ev.Failed(str(exc), "", _resumable(session), run_dir, kind="nan")
    except torch.cuda.OutOfMemoryError as exc:
        msg = (f"CUDA out of memory: {str(exc).splitlines()[0]}. Lower train.batch_size or data.resolution, "
               "or enable train.gradient_checkpointing, latent caching, adamw8bit or a smaller LoRA rank")
        log.error("%s", msg)
        saved = _emergency_save(session)
        yield ev.Failed(msg, traceback.format_exc(), saved or _resumable(session), run_dir, kind="oom")
    except Exception as exc:  # noqa: BLE001 - reported as Failed with the traceback in run.log
        details = traceback.format_exc()
        log.error("unexpected failure: %s\n%s", exc, details)
        yield ev.Failed(f"unexpected error: {type(exc).__name__}: {exc}", details, _resumable(session), run_dir,
                        kind="error")
    finally:
        if session is not None:
            session.close()
        if handler is not None:
            close_run_log(handler)
        if lock is not None:
            lock.release()


def _remove_new_run_dir(run_dir: Path | None, handler: logging.Handler | None, lock: RunLock | None) -> None:
    if handler is not None:
        close_run_log(handler)
    if lock is not None:
        lock.release()
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)


def _resumable(session: TrainingSession | None) -> Path | None:
    if session is None or session.run_dir is None:
        return None
    return RunFolder(session.run_dir).newest_valid_checkpoint_or_none()


def _emergency_save(session: TrainingSession | None) -> Path | None:
    if session is None or session.run_dir is None or not session.ready:
        return None
    try:
        torch.cuda.empty_cache()
        return session.save_checkpoint()
    except Exception:
        log.exception("could not save a checkpoint after the out-of-memory error")
        return None


def _warning(text: str) -> ev.Warning:
    """A warning for the user that run.log keeps as well (for warnings not logged where they arose)."""
    log.warning("%s", text)
    return ev.Warning(text)


def _run(s: TrainingSession, control: TrainingControl) -> Iterator[ev.Event]:
    cfg = s.config
    for warning in s.init_warnings:
        yield _warning(warning)
    yield ev.Status("scanning", f"scanning {s.data_root}")
    for warning in s.prepare_data() + s.evaluation.data_warnings(len(s.batches.data.val)):
        yield _warning(warning)  # e.g. files skipped: kept in run.log too
    s.write_run_card()
    yield ev.Status("building", f"building the {cfg.model.family} model")
    s.build()
    if cfg.data.cache_latents and not s.bundle.model_family.pixel_space:
        yield ev.Status("caching", "caching latents")
        for done, total in s.caches.cache_latents(s.batches):
            yield ev.Progress(done, total, "caching latents")
        for warning in s.caches.warnings:
            yield _warning(warning)
    if cfg.data.cache_text_embeddings and s.bundle.model_family.text_embeddings_cacheable:
        yield ev.Status("caching", "caching text embeddings")
        for done, total in s.caches.cache_text(s.batches.data.train):
            yield ev.Progress(done, total, "caching text embeddings")
    s.park_frozen()
    memory_warning = s.check_memory()
    if memory_warning:
        yield _warning(memory_warning)
    p = s.progress
    if s.resume:
        yield ev.Status("loading", "loading the newest valid checkpoint")
        for warning in s.load_latest():
            yield ev.Warning(warning)
        if s.is_main and s.run_dir is not None:
            RunFolder(s.run_dir).truncate_metrics_after(p.step)
            s.memorisation.replay(RunFolder(s.run_dir).metrics_rows())  # alarms already said stay said
        if p.finished:
            ended = _resume_at_the_end(s)
            if ended is not None:  # nothing left to do: said once, nothing written (resume is idempotent)
                text = (f"this run already {ended.replace('_', ' ')} at step {p.step} of {p.total_steps}; nothing "
                        f"to do (to train further resume with a larger train.max_steps, e.g. "
                        f"train.max_steps = {p.total_steps * 2}, or train.epochs)")
                log.info("%s", text)
                yield ev.Warning(text)
                yield ev.Finished(s.run_dir or Path("."), ended, p.step)
                return
    tensorboard = open_tensorboard(cfg.train.tensorboard, s.run_dir, is_main=s.is_main,
                                   resumed_step=p.step if s.resume else None)
    tensorboard = with_wandb(tensorboard, cfg, s.run_dir, is_main=s.is_main, resumed=s.resume)  # train.wandb
    mirror = tensorboard.row if tensorboard is not None else None
    metrics = None
    if s.is_main and s.run_dir is not None:
        metrics = MetricsWriter(RunFolder(s.run_dir).metrics_file, mirror)
    try:
        p.begin()
        yield ev.Started(s.run_dir or Path("."), cfg.to_dict(), p.total_steps, p.step if s.resume else 0)
        log.info("training %s: %d steps, %d images per epoch (%d train, %d validation), %d steps per epoch",
                 cfg.model.family, p.total_steps, s.batches.images_per_epoch, len(s.batches.data.train),
                 len(s.batches.data.val), p.steps_per_epoch)
        if metrics and not s.resume:
            metrics.write(metrics_row("event", 0, 0, event="started", total_steps=p.total_steps))
        shapes = s.prewarm_shapes()  # train.compile_prewarm: every batch shape compiled before step 1
        if shapes:
            yield from prewarm_events(s, shapes, metrics)
            yield ev.Status("training", "training")
        elif cfg.train.compile:
            yield ev.Status("compiling", "compiling the model with torch.compile: the first steps take minutes")
        else:
            yield ev.Status("training", "training")
        yield from _epochs(s, control, metrics, tensorboard)
    finally:
        if metrics:
            metrics.close()
        if tensorboard is not None:
            tensorboard.close()


def _resume_at_the_end(s: TrainingSession) -> str | None:
    """A resume from a checkpoint of the run's last step (e.g. a kill during the end-of-run samples or exports):
    what was already logged at that step is not done again (the rows before the checkpoint are kept, so
    steps never repeat). Returns how the run ended when it had ended already (then there is nothing to do)."""
    p = s.progress
    rows = [r for r in RunFolder(s.run_dir).metrics_rows() if r.get("step") == p.step] if s.run_dir else []
    ended = [str(r["event"]) for r in rows if r.get("kind") == "event" and r.get("event") in
             ("completed", "early_stopped")]
    if ended:
        return ended[-1]
    for r in rows:
        if r.get("kind") == "val" and "val_loss" in r:
            p.validated()
        if r.get("kind") == "val" and "fid" in r:
            s.evaluation.evaluated(p.step)
        if r.get("kind") == "sample":
            p.sampled()
    return None


def _epochs(s: TrainingSession, control: TrainingControl, metrics: MetricsWriter | None,
            tensorboard: TensorBoardLog | None) -> Iterator[ev.Event]:
    cfg = s.config
    p = s.progress
    window = _Window()
    step_times = StepTimer(s.device)  # CUDA events on a GPU
    reason = "completed"
    while not p.finished:
        epoch = p.epoch
        for group in s.batches.batch_groups(p.epoch, p.step_in_epoch):
            if _should_stop(s, control):
                reason = "stopped"
                break
            while control.paused and not control.stop_requested:
                yield ev.Status("paused", "paused")
                while control.paused and not control.stop_requested:
                    control.wait_while_paused(0.1)
                yield ev.Status("training", "training")
            step_times.start()
            loss, grad_norm, lr = s.optimizer_step(group)  # the loss may stay on the device until logged
            step_times.stop()
            p.step_done()
            window.add(loss, grad_norm)  # a skipped (NaN / out-of-memory) step is not averaged in
            recipe = getattr(s.objective, "recipe", None)
            if recipe is not None and recipe.last:
                window.add_terms(recipe.last)
            window.images += s.batches.global_batch
            if p.step % cfg.train.log_every == 0 or p.step == p.total_steps:
                s.steps.settle()  # NaN steps not read yet: warned about, or the run fails as at the step
                yield _log_window(s, window, lr, step_times, metrics)
                window = _Window()
                if (curve := schedule_snapshot(s.model, p.step, s.run_dir if s.is_main else None)) is not None:
                    yield curve  # diffusion.learned_schedule: its curve for the app, noise_schedule.json
            if cfg.train.val_every_steps and p.step % cfg.train.val_every_steps == 0:
                yield from _validate(s, metrics)
                if s.early.stopped:
                    reason = "early_stopped"
                    break
            if s.evaluation.due_at_step(p.step):
                yield from evaluate(s, metrics, lambda: control.stop_requested)
            if (cfg.sample.every_steps and p.step % cfg.sample.every_steps == 0) or control.take_sample_request():
                yield from _sample(s, metrics, tensorboard)
            if (cfg.checkpoint.every_steps and p.step % cfg.checkpoint.every_steps == 0) or control.take_save_request():
                yield from _checkpoint(s, metrics)
            if p.finished:
                break
        else:
            # the epoch ran to its end
            if p.epoch_complete:
                p.epoch_done()
                yield from _epoch_end(s, epoch, metrics, tensorboard, control)
                if s.early.stopped:
                    reason = "early_stopped"
                    break
            continue
        break
    if reason in ("completed", "early_stopped"):
        on_the_val_schedule = cfg.train.val_every_steps and p.step % cfg.train.val_every_steps == 0
        if not on_the_val_schedule and p.last_val_step != p.step:
            yield from _validate(s, metrics)
        if cfg.sample.at_end and p.last_sample_step != p.step:
            yield from _sample(s, metrics, tensorboard)
        if s.evaluation.due_at_end(p.step):
            yield from evaluate(s, metrics, lambda: control.stop_requested)
    if p.last_checkpoint_step != p.step:
        yield from _checkpoint(s, metrics)
    if reason in ("completed", "early_stopped"):
        yield from _auto_export(s, metrics)
    if metrics:
        metrics.write(metrics_row("event", p.step, p.epoch, event=reason))
    log.info("run %s at step %d", reason, p.step)
    yield ev.Finished(s.run_dir or Path("."), reason, p.step)


def _should_stop(s: TrainingSession, control: TrainingControl) -> bool:
    return s.agree(control.stop_requested)


def _log_window(s: TrainingSession, w: _Window, lr: float, step_times: StepTimer,
                metrics: MetricsWriter | None) -> ev.StepMetrics:
    p = s.progress
    loss, grad = w.means()  # the one read of the device in this window
    elapsed = max(time.perf_counter() - w.t0, 1e-9)
    ips = w.images / elapsed
    eta = step_times.median() * (p.total_steps - p.step)
    if metrics:
        metrics.write(metrics_row("train", p.step, p.epoch, loss=loss, lr=lr, grad_norm=grad, img_per_s=ips,
                                  **w.term_means()))
    return ev.StepMetrics(p.step, p.epoch, loss, lr, grad, ips, p.total_steps, eta)


def _epoch_end(s: TrainingSession, epoch: int, metrics: MetricsWriter | None, tensorboard: TensorBoardLog | None,
               control: TrainingControl) -> Iterator[ev.Event]:
    cfg = s.config
    p = s.progress
    n = epoch + 1
    if not cfg.train.val_every_steps:
        yield from _validate(s, metrics)
    if cfg.sample.every_epochs and n % cfg.sample.every_epochs == 0 and p.last_sample_step != p.step:
        yield from _sample(s, metrics, tensorboard)
    if s.evaluation.due_at_epoch(n, p.step):
        yield from evaluate(s, metrics, lambda: control.stop_requested)
    if cfg.checkpoint.every_epochs and n % cfg.checkpoint.every_epochs == 0 and p.last_checkpoint_step != p.step:
        yield from _checkpoint(s, metrics)
    if cfg.export.every_epochs and n % cfg.export.every_epochs == 0 and not p.finished:
        if p.last_checkpoint_step != p.step:
            yield from _checkpoint(s, metrics)
        yield from _auto_export(s, metrics)


def _validate(s: TrainingSession, metrics: MetricsWriter | None) -> Iterator[ev.Event]:
    if not s.batches.data.val:
        return
    p, early = s.progress, s.early
    yield ev.Status("validating", "validation loss")
    result = s.validate()
    p.validated()
    if result is None:
        return
    val_loss, per_bucket = result
    s.steps.observe_validation(val_loss)
    improved = early.observe(val_loss, p.step)
    if metrics:
        metrics.write(metrics_row("val", p.step, p.epoch, val_loss=val_loss, val_buckets=per_bucket,
                                  best=improved))
    yield ev.ValidationResult(p.step, p.epoch, val_loss, {f"t{i}": v for i, v in enumerate(per_bucket)})
    keep_best = s.config.checkpoint.keep_best or s.config.train.early_stopping_patience > 0
    if improved and keep_best and s.is_main and s.run_dir is not None:
        if p.last_checkpoint_step != p.step:
            yield from _checkpoint(s, metrics)
        s.mark_best(val_loss)
    if early.stopped:
        log.info("early stopping: no improvement of the validation loss in %d validations (best %.6f at step %d)",
                 s.config.train.early_stopping_patience, early.best_val, early.best_step)
        yield ev.Warning(f"early stopping at step {p.step}: the validation loss has not improved for "
                         f"{s.config.train.early_stopping_patience} validations (best {early.best_val:.5f} at step "
                         f"{early.best_step})")
    yield ev.Status("training", "training")


def _sample(s: TrainingSession, metrics: MetricsWriter | None,
            tensorboard: TensorBoardLog | None) -> Iterator[ev.Event]:
    p, previews = s.progress, s.previews
    if not s.is_main or not previews.prompts:
        p.sampled()
        return
    yield ev.Status("sampling", f"sampling {len(previews.prompts)} prompts")
    grid, path = previews.grid(p.step, p.epoch)
    p.sampled()
    if path is None:
        yield ev.Warning(f"could not save the sample grid of step {p.step} (see run.log); training goes on")
    scores = previews.prompt_adherence()
    if scores:
        log.info("prompt adherence at step %d: %s", p.step, ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    memo, alarms = s.memorisation.observe(s, previews.last_images, len(previews.prompts), p.step)
    if metrics and path is not None:
        metrics.write(metrics_row("sample", p.step, p.epoch, path=str(path.name), **scores, **memo))
    yield from _memorisation_events(s, memo, alarms, metrics)
    if tensorboard is not None:
        tensorboard.image("samples", p.step, grid)
    yield ev.SampleGrid(p.step, p.epoch, grid, tuple(previews.prompts), tuple(s.config.sample.seeds), path,
                        scores)
    yield ev.Status("training", "training")


def _memorisation_events(s: TrainingSession, memo: dict, alarms: list[str],
                         metrics: MetricsWriter | None) -> Iterator[ev.Event]:
    """eval.memorisation: the numbers of this grid, and each alarm once (run.log, an event row, a Warning)."""
    if not memo:
        return
    p = s.progress
    log.info("memorisation at step %d: ratio %s, diversity %s", p.step, memo.get("memo_ratio"), memo.get("diversity"))
    for text in alarms:
        event = "memorisation" if text.startswith("memorisation") else "collapse"
        began = s.memorisation.alarm.alarms()[event]
        if metrics:
            metrics.write(metrics_row("event", p.step, p.epoch, event=event, began=began, text=text))
        yield _warning(text)
    yield ev.MemorisationResult(p.step, p.epoch, memo.get("memo_ratio"), memo.get("memo_nearest"),
                                memo.get("memo_copies"), memo.get("diversity"), s.memorisation.kind, tuple(alarms))


def _auto_export(s: TrainingSession, metrics: MetricsWriter | None) -> Iterator[ev.Event]:
    """export.formats: written from the checkpoint of this step into RUN_DIR/exports; a failure is a
    warning (the run and its checkpoints are fine, the export can be redone with `sdstudio export`)."""
    cfg = s.config.export
    if not cfg.formats or not s.is_main or s.run_dir is None:
        return
    dtype = torch_dtype(cfg.dtype)
    folder = RunFolder(s.run_dir)
    checkpoint = folder.checkpoint_dir(s.step)
    name = s.config.name or s.run_dir.name
    for fmt in cfg.formats:
        out = folder.export_path(name, f"step{s.step:08d}", fmt, get_format(fmt).suffix)
        yield ev.Status("exporting", f"exporting {fmt}")
        try:
            path = export(checkpoint, fmt, out, dtype=dtype, use_ema=cfg.ema, force=True)
        except UserError as exc:
            log.warning("automatic %s export failed: %s", fmt, exc)
            yield ev.Warning(f"automatic {fmt} export failed: {exc}; retry with `sdstudio export {s.run_dir} "
                             f"--format {fmt} --out ...`")
            continue
        log.info("exported %s: %s", fmt, path)
        if metrics:
            metrics.write(metrics_row("event", s.step, s.progress.epoch, event="exported", format=fmt,
                                      path=path.name))
        yield ev.Status("exported", f"exported {fmt}: {path}")


def _checkpoint(s: TrainingSession, metrics: MetricsWriter | None) -> Iterator[ev.Event]:
    p = s.progress
    p.checkpointed()
    if not s.is_main or s.run_dir is None:
        return
    yield ev.Status("saving", f"saving checkpoint at step {p.step}")
    path = s.save_checkpoint()
    if metrics:
        metrics.write(metrics_row("checkpoint", p.step, p.epoch, path=path.name))
    yield ev.CheckpointSaved(path, p.step)
    yield ev.Status("training", "training")
