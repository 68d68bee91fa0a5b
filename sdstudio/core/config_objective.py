"""The config sections of the training objective: the noise process (``diffusion``), the loss and its timestep
density (``loss``) and flow matching's own (``flow``). Part of the one run config (``config.RunConfig``, which
imports them from here); the settings form and docs/config.md list them in RunConfig's order."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .config_input import Section


class DiffusionConfig(Section):
    schedule: Literal["linear", "scaled_linear", "cosine"] = Field("cosine", description="Noise schedule "
                                                                   "(beta schedule).")
    num_timesteps: int = Field(1000, ge=10, le=10000, description="Training timesteps.")
    beta_start: float = Field(0.0001, gt=0.0, lt=0.1, description="First beta (linear schedules).")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="Last beta (linear schedules).")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field("epsilon", description="What "
                                                                          "the model predicts.")
    zero_terminal_snr: bool = Field(False, description="Rescale betas to zero terminal SNR.")
    learned_schedule: bool = Field(False, description="Learn the noise schedule with the model (models trained "
                                   "from scratch; Variational Diffusion Models): a monotone network warps the "
                                   "schedule above on the discrete timestep grid, log-SNR endpoints fixed at the "
                                   "schedule's own, trained to lower the variance of the variational bound. Saved "
                                   "with checkpoints; samplers and validation use the learned curve.")
    learned_schedule_units: int = Field(32, ge=1, le=1024, description="Sigmoid units of the learned "
                                        "schedule's monotone network (more: a more flexible curve).")


class LossConfig(Section):
    kind: Literal["mse", "l1", "huber", "pseudo_huber"] = Field(
        "mse", description="Loss between prediction and target (pseudo_huber: kohya's 'huber', "
        "2c(sqrt(e^2 + c^2) - c) with c = loss.huber_delta).")
    huber_delta: float = Field(0.1, gt=0.0, le=10.0, description="Huber loss delta (kohya's huber_c); with "
                               "loss.huber_schedule the delta at the noisiest timestep.")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "constant", description="Huber / pseudo-Huber delta per timestep (kohya's huber_schedule): constant = "
        "huber_delta; exponential = exp(-t ln(1/huber_delta) / T), 1 at t = 0 down to huber_delta at T; snr = "
        "(1 - huber_delta) / (1 + sigma_t)^2 + huber_delta, sigma_t = sqrt((1 - alpha_bar) / alpha_bar).")
    debiased_estimation: bool = Field(False, description="Debiased estimation loss weighting (kohya): "
                                      "1/sqrt(SNR) for epsilon, 1/(SNR + 1) for v prediction, sqrt(SNR) for "
                                      "sample prediction (SNR clamped to 1000).")
    pyramid_noise_iterations: int = Field(0, ge=0, le=16, description="Multi-resolution (pyramid) noise: levels "
                                          "of coarser noise added to the noise (0 = off; 6-10 is usual).")
    pyramid_noise_discount: float = Field(0.3, gt=0.0, le=1.0, description="Pyramid noise: weight of each "
                                          "coarser level relative to the one above (discount^level).")
    timestep_distribution: Literal["uniform", "logit_normal", "mode"] = Field(
        "uniform", description="How training timesteps are drawn within [timestep_min, timestep_max): uniform, "
        "logit_normal (SD3: sigmoid of a normal) or mode (SD3's mode sampling).")
    timestep_logit_mean: float = Field(0.0, ge=-5.0, le=5.0, description="logit_normal: mean of the normal "
                                       "(> 0 = noisier timesteps).")
    timestep_logit_std: float = Field(1.0, gt=0.0, le=5.0, description="logit_normal: std of the normal.")
    timestep_mode_scale: float = Field(1.29, ge=-1.0, le=1.75, description="mode: scale s (> 0 favours the "
                                       "middle timesteps, < 0 the ends, 0 = uniform).")
    timestep_shift: float = Field(1.0, ge=0.05, le=20.0, description="Shift the drawn timesteps as SD3 / Flux "
                                  "do, u -> shift u / (1 + (shift - 1) u) (> 1 = noisier, 1 = off); applies to "
                                  "every distribution.")
    min_snr_gamma: float = Field(0.0, ge=0.0, le=100.0, description="Min-SNR weighting gamma (0 = off, "
                                 "5 is usual).")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="Noise offset (0.03-0.1 helps very "
                                "dark/bright images).")
    input_perturbation: float = Field(0.0, ge=0.0, le=1.0, description="Input perturbation of the noise "
                                      "(0.1 is usual).")
    prior_loss_weight: float = Field(1.0, ge=0.0, le=10.0, description="DreamBooth: weight of the loss on "
                                     "class images (data.reg_path).")
    masked: bool = Field(False, description="Masked training: weigh each pixel's loss by the image's mask "
                         "(name.mask.png beside it, masks/<name> beside the images, or its alpha channel with "
                         "data.mask_from_alpha; white = train, black = ignore), cropped and flipped with the "
                         "image, scaled to the latents, cached with them. Images without a mask train fully.")
    unmasked_weight: float = Field(0.0, ge=0.0, le=1.0, description="Masked training: loss weight of the "
                                   "masked-out (black) pixels (0 = ignored; 0.1 keeps some background).")
    timestep_min: int = Field(0, ge=0, description="Lowest training timestep.")
    timestep_max: int = Field(0, ge=0, description="Highest training timestep + 1 (0 = num_timesteps).")
    vlb_weight: float = Field(0.001, ge=0.0, le=1.0, description="With model.learned_variance: lambda of the "
                              "hybrid loss L_simple + lambda L_vlb (Improved DDPM; L_vlb is num_timesteps times "
                              "the bound's term at the drawn timestep, in bits per dimension, with the predicted "
                              "mean's gradient stopped, so only the variance learns from it).")
    contrastive_weight: float = Field(0.0, ge=0.0, le=10.0, description="Contrastive caption term (0 = off; "
                                      "captioned models): InfoNCE over the denoising error, so an image's error "
                                      "under its own caption is lower than under the batch's other captions. "
                                      "Costs loss.contrastive_negatives extra forward passes per step. 0.01 raised "
                                      "the compositional test's adherence; 0.1 hurt shapes (docs/benchmarks.md).")
    contrastive_temperature: float = Field(0.01, ge=1e-4, le=10.0, description="Contrastive caption term: "
                                           "temperature of the softmax over minus the per-image error (mean "
                                           "squared error units; smaller = sharper).")
    contrastive_negatives: int = Field(1, ge=1, le=16, description="Contrastive caption term: other captions of "
                                       "the batch each image is also denoised under (batch rolled by 1..N).")


class FlowConfig(Section):
    """Flow-matching families (Flux, SD3): how training timesteps are drawn and weighted (core/flow.py)."""

    timestep_sampling: Literal["logit_normal", "uniform", "mode"] = Field(
        "logit_normal", description="How training timesteps t in (0, 1) are drawn (SD3 paper): logit-normal "
        "(flow.logit_mean / flow.logit_std), uniform, or mode (flow.mode_scale).")
    logit_mean: float = Field(0.0, ge=-5.0, le=5.0, description="Mean of the logit-normal timestep density "
                              "(above 0 = more time near noise).")
    logit_std: float = Field(1.0, gt=0.0, le=5.0, description="Std of the logit-normal timestep density.")
    mode_scale: float = Field(1.29, ge=-1.0, le=1.75, description="Scale of the 'mode' timestep density "
                              "(SD3 paper: 1.29; 0 = uniform).")
    shift: Literal["auto", "none", "fixed", "resolution"] = Field(
        "auto", description="Shift of the drawn timesteps towards noise: auto = as the base model samples (Flux "
        "dev: by resolution; schnell: none), fixed = flow.shift_value (SD3's shift), resolution = Flux's "
        "shift from flow.base_shift .. flow.max_shift by image size.")
    shift_value: float = Field(3.0, gt=0.0, le=20.0, description="The fixed shift (flow.shift = 'fixed'; "
                               "1 = none, SD3 uses 3).")
    base_shift: float = Field(0.5, ge=0.0, le=3.0, description="Resolution shift: log-shift at 256 image "
                              "tokens (256 px).")
    max_shift: float = Field(1.15, ge=0.0, le=3.0, description="Resolution shift: log-shift at 4096 image "
                             "tokens (1024 px).")
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description="Loss weighting over timesteps (SD3 paper): none, sigma_sqrt (1/t^2), cosmap.")
    guidance: float = Field(1.0, ge=0.0, le=20.0, description="Guidance-distilled models (Flux dev): the guidance "
                            "value fed to the model while training (1.0 is what kohya / ai-toolkit users train "
                            "with; sampling uses sample.guidance).")
