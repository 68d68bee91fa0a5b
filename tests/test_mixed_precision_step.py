"""The mixed-precision step (issue 14): autocast entered once per forward (accelerate's, from ``prepare``), and
peft's adapter layers not casting each input up to their fp32 weights' dtype only for autocast to cast it back.
A GPU's bf16 run is imitated on the CPU: base weights in bf16, the accelerator in bf16 autocast."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import accelerate
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sdstudio.core.config import RunConfig
from tests.sd_helpers import sd_config

CASTS = ("aten._to_copy.default", "aten.to.dtype", "aten.copy_.default")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator (mixed precision included): these
    tests make bf16 ones, the rest of the suite fp32 ones."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class CastCount(TorchDispatchMode):
    """Counts the dtype conversions (and copies) dispatched while active, by (op, from dtype, to dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if str(func) in CASTS:
            src = args[0].dtype if isinstance(args[0], torch.Tensor) else None
            self.counts[(str(func), str(src), str(getattr(out, "dtype", None)))] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def sd_lora(model: Path, data: Path, preset: str = "sd15-lora", **overrides: Any) -> RunConfig:
    return sd_config(preset, model, data, **{"data.resolution": 32, "train.batch_size": 2, "lora.rank": 4,
                                             "train.gradient_checkpointing": False, **overrides})


def bf16_session(monkeypatch: pytest.MonkeyPatch, cfg: RunConfig):
    """A built training session as a GPU's bf16 run makes it: 16-bit base weights, fp32 adapters, the prepared
    forward under bf16 autocast."""
    from sdstudio.core.models.flux import model as flux
    from sdstudio.core.models.sd import model as sd
    from sdstudio.core.train import session as session_module

    monkeypatch.setattr(sd, "_weight_dtype", lambda config, device: torch.bfloat16)
    monkeypatch.setattr(flux, "_weight_dtype", lambda config, device: torch.bfloat16)
    real = accelerate.Accelerator
    monkeypatch.setattr(session_module, "Accelerator", lambda **kw: real(**{**kw, "mixed_precision": "bf16"}))
    session = session_module.TrainingSession(cfg, run_dir=None, resume=False)
    session.prepare_data()
    session.build()
    assert session.accelerator.native_amp
    return session


def one_step(session, group, *, old_path: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], CastCount,
                                                                 int]:
    """Loss and gradients of one micro-batch, the casts it made and the deepest autocast nesting it reached.
    ``old_path``: as before the fix, peft's input casts on and the forward inside a second autocast region."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in session.bundle.trainable.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m.cast_input_dtype_enabled for m in layers]
    depth = [0]
    increment = torch.autocast_increment_nesting

    def counting() -> int:
        nesting = increment()
        depth[0] = max(depth[0], nesting)
        return nesting

    objective = session.objective
    model = objective.model
    if old_path:
        for m in layers:
            m.cast_input_dtype_enabled = True

        def model_in_autocast(*args):  # type: ignore[no-untyped-def]
            with session.accelerator.autocast():
                return model(*args)

        objective.model = model_in_autocast
    session.optimizer.zero_grad(set_to_none=True)
    try:
        torch.autocast_increment_nesting = counting
        with CastCount() as casts:
            loss = session.compute_loss(group[0], 0)
            loss.backward()
    finally:
        torch.autocast_increment_nesting = increment
        objective.model = model
        for m, was in zip(layers, saved, strict=True):
            m.cast_input_dtype_enabled = was
    grads = {n: p.grad.detach().float().clone() for n, p in session.bundle.trainable.named_parameters()
             if p.grad is not None}
    return loss.detach(), grads, casts, depth[0]


def _cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    return float(F.cosine_similarity(torch.cat([a[k].flatten() for k in keys]),
                                     torch.cat([b[k].flatten() for k in keys]), dim=0))


def test_a_bf16_lora_step_casts_less_with_the_same_loss_and_gradients(tiny_sd1: Path, four_images: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    session = bf16_session(monkeypatch, sd_lora(tiny_sd1, four_images))
    try:
        group = next(iter(session.batches.batch_groups(0, 0)))
        adapters = [n for n, p in session.bundle.trainable.named_parameters() if p.requires_grad]
        assert adapters and all(p.dtype == torch.float32 for p in session.steps.params)
        loss, grads, casts, depth = one_step(session, group)
        old_loss, old_grads, old_casts, old_depth = one_step(session, group, old_path=True)
        n_layers = sum(1 for n in adapters if n.endswith("lora_A.default.weight"))
        # autocast entered once around the model's forward (accelerate's), not nested in a second region
        assert depth == 1 and old_depth == 2
        # no activation cast up to fp32 and back: at least two casts fewer per adapter layer (forward + backward)
        assert casts.total <= old_casts.total - 2 * n_layers, (casts.counts, old_casts.counts)
        up = ("aten._to_copy.default", "torch.bfloat16", "torch.float32")
        assert casts.counts[up] < old_casts.counts[up] - n_layers
        # the same step (bf16 tolerance): loss, every adapter's gradient
        assert torch.allclose(loss, old_loss, rtol=1e-3)
        assert set(grads) == set(old_grads) == set(adapters)
        assert _cosine(grads, old_grads, adapters) > 0.999
        # the optimizer still updates fp32 master weights
        before = {n: p.detach().clone() for n, p in session.bundle.trainable.named_parameters() if p.requires_grad}
        session.optimizer_step(group)
        after = dict(session.bundle.trainable.named_parameters())
        assert all(after[n].dtype == torch.float32 for n in before)
        assert any(not torch.equal(after[n].detach(), before[n]) for n in before)
        assert all(v.dtype == torch.float32 for k, v in session.bundle.trainable_state().items())
    finally:
        session.close()


def test_dora_under_bf16_autocast_starts_as_lora(tiny_sd1: Path, four_images: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """DoRA starts with its magnitude at the weights' norm: its first step is the LoRA step (same loss, lora_B
    gradients parallel to LoRA's). With peft's fp32 input cast under autocast it was not (lora_B gradients
    uncorrelated with LoRA's, cosine about 0 on this model)."""
    lora = bf16_session(monkeypatch, sd_lora(tiny_sd1, four_images))
    try:
        group = next(iter(lora.batches.batch_groups(0, 0)))
        lora_loss, lora_grads, _, _ = one_step(lora, group)
    finally:
        lora.close()
    dora = bf16_session(monkeypatch, sd_lora(tiny_sd1, four_images, **{"lora.type": "dora"}))
    try:
        loss, grads, _, _ = one_step(dora, group)
        _, old_grads, _, _ = one_step(dora, group, old_path=True)
    finally:
        dora.close()
    keys = [k for k in lora_grads if ".lora_B." in k]
    assert keys and torch.allclose(loss, lora_loss, rtol=1e-3)
    assert _cosine(grads, lora_grads, keys) > 0.999
    assert _cosine(old_grads, lora_grads, keys) < 0.9  # the old path, for the record


def test_text_encoder_adapters_keep_their_cast_for_sampling(tiny_sd1: Path, four_images: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A text encoder's LoRA runs outside autocast too (previews encode their prompts before sampling): its
    layers keep peft's input cast; the UNet's, always under autocast, do not. A step and a preview both run."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    session = bf16_session(monkeypatch, sd_lora(tiny_sd1, four_images, **{"lora.text_encoder": True}))
    try:
        encoders = list(session.bundle.text_encoders().values())
        in_encoders = {id(m) for e in encoders for m in e.modules() if isinstance(m, BaseTunerLayer)}
        layers = [m for m in session.bundle.trainable.modules() if isinstance(m, BaseTunerLayer)]
        assert in_encoders and len(layers) > len(in_encoders)
        assert all(m.cast_input_dtype_enabled == (id(m) in in_encoders) for m in layers)
        group = next(iter(session.batches.batch_groups(0, 0)))
        loss, grads, _, _ = one_step(session, group)
        assert torch.isfinite(loss) and any(k.startswith("text") for k in grads)
        images = session.previews.sample_images(["a red circle"], [0])
        assert images.shape[0] == 1
    finally:
        session.close()


def test_fp32_training_leaves_peft_casts_alone(tiny_sd1: Path, four_images: Path) -> None:
    """Without mixed precision no autocast wraps the forward, so the adapters keep peft's own behaviour."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdstudio.core.train.session import TrainingSession

    session = TrainingSession(sd_lora(tiny_sd1, four_images), run_dir=None, resume=False)
    session.prepare_data()
    session.build()
    try:
        layers = [m for m in session.bundle.trainable.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(m.cast_input_dtype_enabled for m in layers)
    finally:
        session.close()


@pytest.mark.parametrize("family", ["sdxl", "flux", "sd1-prior", "sd1-contrastive"])
def test_other_lora_steps_under_bf16(family: str, tiny_sd1: Path, tiny_sdxl: Path, four_images: Path,
                                     class_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL's UNet LoRA, Flux's transformer + CLIP-L LoRA (flow matching), SD1 with DreamBooth's class images
    (one forward of both) and with the contrastive caption term (a second forward): one autocast region, fewer
    casts, the old path's loss and gradients; the text encoder's layers keep peft's cast and a preview samples."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if family == "sdxl":
        cfg = sd_lora(tiny_sdxl, four_images, preset="sdxl-lora", **{"data.resolution": 64})
    elif family == "sd1-prior":
        cfg = sd_lora(tiny_sd1, four_images, **{"data.instance_prompt": "sks", "data.reg_path": str(class_images),
                                                "data.class_prompt": "a shape"})
    elif family == "sd1-contrastive":
        cfg = sd_lora(tiny_sd1, four_images, **{"loss.contrastive_weight": 0.1})
    else:
        from tests.tiny_flux import save_tiny_flux
        from tests.transformer_helpers import tiny_run_config

        flux_dev = save_tiny_flux(tmp_path / "flux")
        cfg = tiny_run_config("flux-lora", flux_dev, four_images, **{"data.resolution": 32, "train.batch_size": 2,
                                                                    "lora.text_encoder": True})
    session = bf16_session(monkeypatch, cfg)
    try:
        group = next(iter(session.batches.batch_groups(0, 0)))
        loss, grads, casts, depth = one_step(session, group)
        old_loss, old_grads, old_casts, old_depth = one_step(session, group, old_path=True)
        assert depth == 1 and old_depth == 2
        assert casts.total < old_casts.total, (casts.counts, old_casts.counts)
        assert torch.allclose(loss, old_loss, rtol=1e-3)
        assert set(grads) == set(old_grads) and _cosine(grads, old_grads, list(grads)) > 0.999
        encoders = [m for e in session.bundle.text_encoders().values() for m in e.modules()]
        kept = {id(m) for m in encoders if isinstance(m, BaseTunerLayer)}
        assert (family == "flux") == bool(kept)
        if family == "sd1-prior":
            assert session.batches.class_batch(0, 0, 2) is not None
        if family == "sd1-contrastive":
            assert "contrastive" in session.objective.recipe.last
        assert all(m.cast_input_dtype_enabled == (id(m) in kept) for m in session.bundle.trainable.modules()
                   if isinstance(m, BaseTunerLayer))
        assert session.previews.sample_images(["a red circle"], [0]).shape[0] == 1
    finally:
        session.close()
