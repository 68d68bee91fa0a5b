"""The training recipe's terms beyond the plain denoising loss, added by ``DiffusionObjective``:

- the variational bound of a learned-variance model (model.learned_variance, loss.vlb_weight; ``core/vlb.py``),
- the contrastive caption term (loss.contrastive_*): InfoNCE over the denoising error under each caption,
- the learned noise schedule (diffusion.learned_schedule; ``core/learned_schedule.py``): the noisy input built
  from its alpha-bar, the scheduler kept in step with it, and its variance-of-the-bound gradient.
Each is off (adds nothing, draws nothing) unless its key is set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import events as ev
from ..atomic import write_text_atomic
from ..config import RunConfig
from ..learned_schedule import (
    GradientSlot,
    LearnedNoiseSchedule,
    ScheduleGradient,
    bound_weights,
    curve_points,
    learned_schedule_of,
    sync_scheduler,
    variance_objective,
)
from ..vlb import split_learned_variance, vlb_terms


def roll_condition(cond: Any, shift: int, batch: int) -> Any:
    """``cond`` with every per-sample tensor (first dimension ``batch``) rolled by ``shift`` along it."""
    if isinstance(cond, torch.Tensor):
        return torch.roll(cond, shift, 0) if cond.ndim and cond.shape[0] == batch else cond
    if isinstance(cond, dict):
        return {k: roll_condition(v, shift, batch) for k, v in cond.items()}
    return cond


def concat_conditions(conds: list[Any], batch: int) -> Any:
    """Several conditionings of one batch as one (per-sample tensors concatenated, others kept)."""
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(conds) if first.ndim and first.shape[0] == batch else first
    if isinstance(first, dict):
        return {k: concat_conditions([c[k] for c in conds], batch) for k in first}
    return first


def info_nce(errors: torch.Tensor, same: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over denoising errors: ``errors`` (B, 1 + K), column 0 under the image's own caption, the others
    under other captions; ``same`` (B, K) marks other captions equal to the own one (left out). The mean of
    -log softmax(-errors / temperature)[own]."""
    logits = -errors.float() / temperature
    masked = torch.zeros_like(logits, dtype=torch.bool)
    masked[:, 1:] = same
    logits = logits.masked_fill(masked, float("-inf"))
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


class TrainingRecipe:
    """The recipe's extra terms for one objective. ``model``: the prepared training model (its learned
    schedule, when it has one, is its ``noise_schedule``); ``sched``: the run's DDPM scheduler, kept in step with
    a learned schedule so validation, previews and loss weights use the learned curve."""

    def __init__(self, config: RunConfig, model: torch.nn.Module, sched: Any) -> None:
        self.config, self.model, self.sched = config, model, sched
        self.prediction_type = str(sched.config.prediction_type)
        self.schedule: LearnedNoiseSchedule | None = learned_schedule_of(model)
        self._gamma: torch.Tensor | None = None
        self._slot = GradientSlot()
        # the latest value of each term, detached (no device sync per step; for tests and inspection)
        self.last: dict[str, torch.Tensor] = {}

    def begin(self) -> None:
        """Before a micro-batch: the learned schedule's curve for this step (and the scheduler synced to it)."""
        if self.schedule is None:
            return
        self._gamma = self.schedule.gamma()
        sync_scheduler(self.sched, torch.sigmoid(-self._gamma))
        self._slot = GradientSlot()

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, model_noise: torch.Tensor, t: torch.Tensor, *,
               learn: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(noisy input, target) from the learned schedule (None without one); ``learn``: the schedule gets the
        variance gradient through this input."""
        if self._gamma is None:
            return None
        a = torch.sigmoid(-self._gamma)[t]
        a = ScheduleGradient.apply(a, self._slot) if learn else a.detach()
        a = a.to(clean.dtype).view(-1, *([1] * (clean.ndim - 1)))
        noisy = a.sqrt() * clean + (1 - a).sqrt() * model_noise
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, a.sqrt() * noise - (1 - a).sqrt() * clean
        return noisy, clean

    def terms(self, *, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, pred: torch.Tensor,
              v: torch.Tensor | None, target: torch.Tensor, cond: Any, captions: list[str],
              per_sample: torch.Tensor) -> torch.Tensor:
        """The extra loss of a micro-batch (a 0-d tensor; 0 when every option is off)."""
        total = pred.new_zeros((), dtype=torch.float32)
        loss_cfg = self.config.loss
        if v is not None and loss_cfg.vlb_weight > 0:
            terms = vlb_terms(self.sched.alphas_cumprod, clean, noisy, t, pred.detach(), v, self.prediction_type)
            vlb = terms.mean() * int(self.sched.config.num_train_timesteps)
            self.last["vlb"] = vlb.detach()
            total = total + loss_cfg.vlb_weight * vlb
        if loss_cfg.contrastive_weight > 0 and len(captions) > 1:
            term = self.contrastive(noisy, t, pred, target, cond, captions)
            self.last["contrastive"] = term.detach()
            total = total + loss_cfg.contrastive_weight * term
        if self._gamma is not None:
            weights = bound_weights(self._gamma, t, self.prediction_type)
            total = total + variance_objective(per_sample, weights, self._slot)
        return total

    def contrastive(self, noisy: torch.Tensor, t: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                    cond: Any, captions: list[str]) -> torch.Tensor:
        """The InfoNCE caption term: the same noisy images denoised under the batch's captions rolled by 1..K."""
        b = noisy.shape[0]
        k = min(self.config.loss.contrastive_negatives, b - 1)
        rolled = [roll_condition(cond, s, b) for s in range(1, k + 1)]
        # the prepared model's forward runs under autocast itself
        others = self.model(noisy.repeat(k, *([1] * (noisy.ndim - 1))), t.repeat(k), concat_conditions(rolled, b))
        others, _ = split_learned_variance(others, target.shape[1])
        dims = tuple(range(1, target.ndim))
        own = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=dims)
        other = F.mse_loss(others.float(), target.float().repeat(k, *([1] * (target.ndim - 1))),
                           reduction="none").mean(dim=dims).view(k, b).T
        same = torch.tensor([[captions[i] == captions[(i - s) % b] for s in range(1, k + 1)] for i in range(b)],
                            device=noisy.device)
        # an image trained without its caption (data.caption_dropout) has no own caption to prefer
        rows = torch.tensor([bool(c.strip()) for c in captions], device=noisy.device)
        if not bool(rows.any()):
            return (others.sum() * 0.0).float()
        errors = torch.cat([own[:, None], other], dim=1)
        return info_nce(errors[rows], same[rows], self.config.loss.contrastive_temperature)


SCHEDULE_FILE = "noise_schedule.json"


def schedule_snapshot(model: torch.nn.Module, step: int, run_dir: Path | None) -> ev.LearnedSchedule | None:
    """The learned schedule's curve as an event (None without one), also written atomically to the run folder's
    noise_schedule.json (``run_dir`` None: not written)."""
    schedule = learned_schedule_of(model)
    if schedule is None:
        return None
    values = curve_points(schedule)
    n = schedule.num_timesteps
    steps = [round(i * (n - 1) / (len(values) - 1)) for i in range(len(values))]
    if run_dir is not None:
        text = json.dumps({"step": step, "timesteps": steps, "log10_snr": values})
        write_text_atomic(Path(run_dir) / SCHEDULE_FILE, text, fsync=False)
    return ev.LearnedSchedule(step, steps, values)


def read_schedule_snapshot(run_dir: Path) -> ev.LearnedSchedule | None:
    """A finished or stopped run's learned schedule as its noise_schedule.json holds it (None when the run has
    none or the file does not read as one), for showing a past run's curve."""
    path = Path(run_dir) / SCHEDULE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        steps = [int(v) for v in data["timesteps"]]
        values = [float(v) for v in data["log10_snr"]]
        step = int(data["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ev.LearnedSchedule(step, steps, values) if steps and len(steps) == len(values) else None
