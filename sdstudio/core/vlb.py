"""The variational lower bound of a DDPM with learned variances (Improved DDPM, Nichol & Dhariwal 2021): the
model predicts its usual target plus ``v`` per value, and the reverse step's log-variance is
``frac * log(beta_t) + (1 - frac) * log(beta-tilde_t)`` with ``frac = (v + 1) / 2`` (diffusers'
``learned_range``, so the DDPM sampler reads the same output). The bound's term at timestep t is the KL between
the true posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian (t > 0), or the discretized decoder's negative
log-likelihood of 8-bit data (t = 0), in bits per dimension.

Pure functions of tensors and a schedule's ``alphas_cumprod``; the objective wires them in."""

from __future__ import annotations

import math

import torch

LOG2 = math.log(2.0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) elementwise for data ``x`` in [-1, 1] quantised to 256 levels (bin width 2/255), under a Gaussian
    of ``mean`` and std ``exp(log_scale)``; the edge bins take the tails."""
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    plus = inv_std * (centred + 1.0 / 255.0)
    minus = inv_std * (centred - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus)
    log_one_minus_cdf_minus = torch.special.log_ndtr(-minus)
    delta = (torch.special.ndtr(plus) - torch.special.ndtr(minus)).clamp_min(1e-12)
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_minus, torch.log(delta)))


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device)[t].to(torch.float64).view(-1, *([1] * (like.ndim - 1)))


def posterior(alphas_cumprod: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
              t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, clipped log-variance) of q(x_{t-1} | x_t, x_0); at t = 0 the log-variance is t = 1's (the true one
    is 0, whose log the learned range cannot use)."""
    ac = alphas_cumprod.to(torch.float64)
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1.0 - ac / prev
    var = betas * (1.0 - prev) / (1.0 - ac)
    log_var = torch.log(torch.cat([var[1:2], var[1:]]).clamp_min(1e-20))
    coef_x0 = betas * prev.sqrt() / (1.0 - ac)
    coef_xt = (1.0 - prev) * (ac / prev).sqrt() / (1.0 - ac)
    mean = _gather(coef_x0, t, x0) * x0.double() + _gather(coef_xt, t, xt) * xt.double()
    return mean, _gather(log_var, t, x0).expand_as(mean)


def learned_log_variance(alphas_cumprod: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's log-variance from its ``v`` output (in [-1, 1]: beta-tilde_t .. beta_t)."""
    ac = alphas_cumprod.to(torch.float64)
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1.0 - ac / prev
    var = betas * (1.0 - prev) / (1.0 - ac)
    min_log = _gather(torch.log(torch.cat([var[1:2], var[1:]]).clamp_min(1e-20)), t, v)
    max_log = _gather(torch.log(betas.clamp_min(1e-20)), t, v)
    frac = (v.double() + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def predicted_x0(alphas_cumprod: torch.Tensor, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor,
                 prediction_type: str) -> torch.Tensor:
    """x_0 implied by the model's prediction (epsilon, v_prediction or sample)."""
    a = _gather(alphas_cumprod.to(torch.float64), t, xt)
    x, p = xt.double(), pred.double()
    if prediction_type == "epsilon":
        return (x - (1.0 - a).sqrt() * p) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1.0 - a).sqrt() * p
    return p


def vlb_terms(alphas_cumprod: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, pred: torch.Tensor,
              v: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The bound's term L_t of each sample (B,), bits per dimension: KL for t > 0, decoder NLL at t = 0. Pass
    ``pred`` detached for Improved DDPM's hybrid loss (only the variance learns from the bound)."""
    true_mean, true_log_var = posterior(alphas_cumprod, x0, xt, t)
    model_x0 = predicted_x0(alphas_cumprod, xt, pred, t, prediction_type)
    model_mean, _ = posterior(alphas_cumprod, model_x0, xt, t)
    model_log_var = learned_log_variance(alphas_cumprod, v, t)
    dims = tuple(range(1, x0.ndim))
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=dims) / LOG2
    nll = -discretized_gaussian_log_likelihood(x0.double(), model_mean, 0.5 * model_log_var).mean(dim=dims) / LOG2
    return torch.where(t == 0, nll, kl).float()


def split_learned_variance(pred: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, v) of an output with a learned-variance head (2x ``channels``); (pred, None) without one."""
    if pred.shape[1] == 2 * channels:
        return pred[:, :channels], pred[:, channels:]
    return pred, None
