"""The from-scratch model's training-recipe options: the learned-variance output head
(model.learned_variance) and the learned noise schedule carried by the model (diffusion.learned_schedule), so
the optimizer, EMA, checkpoints and resume treat its parameters as the model's own."""

from __future__ import annotations

from torch import nn

from ...config import RunConfig
from ...learned_schedule import LearnedNoiseSchedule


def output_channels(config: RunConfig, channels: int) -> int:
    """The UNet's output channels: the prediction, and with a learned-variance head its v as many again."""
    return 2 * channels if config.model.learned_variance else channels


def attach_learned_schedule(trainable: nn.Module, save_modules: dict[str, nn.Module], config: RunConfig) -> None:
    """diffusion.learned_schedule: the schedule as the trainable module's ``noise_schedule`` (saved as such)."""
    if not config.diffusion.learned_schedule:
        return
    # the base curve comes from the run's schedule when the objective makes it (DiffusionObjective.schedule)
    schedule = LearnedNoiseSchedule(config.diffusion.num_timesteps, units=config.diffusion.learned_schedule_units)
    trainable.noise_schedule = schedule
    save_modules["noise_schedule"] = schedule
