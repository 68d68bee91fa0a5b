"""The fast default step (issue 14): no host sync inside a step (loss and grad norm read once per logging
interval, metrics.jsonl unchanged), CUDA-event step timing, SDXL time ids kept on the device, cache entries
verified once, the attention kernel choice, and regional torch.compile agreeing with eager."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from sdstudio.core import events as ev
from sdstudio.core.config import TrainConfig
from sdstudio.core.train.optim import LRSchedule, build_optimizer, param_groups
from sdstudio.core.train.step import NonFiniteLoss, OptimizerStep

CPU = torch.device("cpu")


def run_all(config, run_dir: Path) -> list[ev.Event]:
    from sdstudio.core.train.loop import train

    return list(train(config, run_dir=run_dir))


class _Toy:
    def __init__(self, **train) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
        self.cfg = TrainConfig(optimizer="adamw", learning_rate=1e-2, lr_scheduler="constant", device="cpu", **train)
        params = list(self.model.parameters())
        opt = build_optimizer(param_groups([("model", params, self.cfg.learning_rate)]), self.cfg, device=CPU)
        self.steps = OptimizerStep(Accelerator(cpu=True), self.model, opt, LRSchedule(self.cfg, 100), params, None,
                                   self.cfg)
        self.x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        self.poison: set[int] = set()

    def loss(self, batch: dict, micro: int) -> torch.Tensor:
        loss = F.mse_loss(self.model(self.x), self.x.flip(1))
        return loss * float("nan") if batch["step"] in self.poison else loss


class _SyncCounter:
    """Counts the tensor reads that make the host wait for the device (item, tolist, float, bool, numpy)."""

    NAMES = ("item", "tolist", "__float__", "__bool__", "numpy", "cpu")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _name=name, _orig=original, **k):
                self.calls.append(_name)
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_a_step_reads_nothing_from_the_device_and_settle_reads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    toy = _Toy()
    assert toy.steps.lazy  # fused AdamW, one process, no EMA, no loss scaler
    counter = _SyncCounter(monkeypatch)
    sync_debug = torch.cuda.is_available()
    if sync_debug:  # on a GPU torch itself raises on any synchronising call
        torch.cuda.set_sync_debug_mode("error")
    try:
        results = [toy.steps.run([{"step": s}], s, toy.loss) for s in range(5)]
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
    assert counter.calls == [], counter.calls
    toy.steps.settle()
    assert counter.calls == ["tolist"]
    losses = [float(loss) for loss, _, _ in results]
    assert losses[-1] < losses[0] and all(isinstance(r[0], torch.Tensor) for r in results)


def test_a_nan_step_is_skipped_on_the_device_and_fails_at_settle_as_before() -> None:
    lazy = _Toy(nan_skip_steps=1)
    lazy.poison = {2}
    for s in range(4):
        loss, grad_norm, _ = lazy.steps.run([{"step": s}], s, lazy.loss)
        assert bool(torch.isnan(loss)) == (s == 2) and bool(torch.isnan(grad_norm)) == (s == 2)
    lazy.steps.settle()
    assert lazy.steps.bad_steps == 1
    # the skipped step left weights and optimizer state alone: the same as a run without that step's update
    clean = _Toy()
    for s in (0, 1, 3):
        clean.steps.run([{"step": s}], s, clean.loss)
    for a, b in zip(lazy.model.parameters(), clean.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    strict = _Toy()
    strict.poison = {1}
    for s in range(3):
        strict.steps.run([{"step": s}], s, strict.loss)
    with pytest.raises(NonFiniteLoss, match="step 2"):
        strict.steps.settle()


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "sync"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_a_finite_loss_with_an_inf_gradient_is_skipped_before_it_reaches_the_weights(
        lazy: bool, max_grad_norm: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """An overflow in the backward pass gives an inf gradient under a finite loss. Clipping multiplies every
    gradient by 0 (or NaN without clipping), so the optimizer wrote NaN into the weights and the run failed one
    step later, the damage done; the step is skipped as a NaN loss is, and the weights are those of the run
    without it. fp16's loss scaler keeps skipping such steps itself (not counted as bad)."""
    monkeypatch.setattr(OptimizerStep, "lazy", property(lambda self: lazy))

    def toy_run(steps: list[int], overflow: set[int]) -> _Toy:
        toy = _Toy(max_grad_norm=max_grad_norm, nan_skip_steps=1)

        def loss(batch: dict, micro: int) -> torch.Tensor:
            out = toy.model(toy.x)
            if batch["step"] in overflow:
                out.register_hook(lambda g: g * float("inf"))
            return F.mse_loss(out, toy.x.flip(1))

        for s in steps:
            value, grad_norm, _ = toy.steps.run([{"step": s}], s, loss)
            assert math.isnan(float(grad_norm)) == (s in overflow) and math.isfinite(float(value)) != (s in overflow)
        toy.steps.settle()
        return toy

    hit = toy_run([0, 1, 2, 3], overflow={2})
    assert hit.steps.bad_steps == 1
    clean = toy_run([0, 1, 3], overflow=set())
    for a, b in zip(hit.model.parameters(), clean.model.parameters(), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    with pytest.raises(NonFiniteLoss, match="loss or its gradients became NaN/inf at step 3"):  # the second bad step
        toy_run([0, 1, 2], overflow={1, 2})


def test_fused_backward_stops_at_a_step_whose_gradient_overflows() -> None:
    """train.fused_backward moves each weight during the backward pass, so an inf gradient under a finite loss
    cannot be skipped: the run stops at that step (with the last good checkpoint), not one step later."""
    from sdstudio.core.train.fused_backward import FusedBackwardOptimizer, FusedOptimizerStep

    toy = _Toy()
    params = list(toy.model.parameters())
    fused = FusedBackwardOptimizer(param_groups([("model", params, 1e-2)]), lambda g: torch.optim.AdamW(g, lr=1e-2))
    steps = FusedOptimizerStep(Accelerator(cpu=True), toy.model, fused, LRSchedule(toy.cfg, 100), params, None,
                               toy.cfg.model_copy(update={"max_grad_norm": 0.0, "nan_skip_steps": 5}))

    def loss(batch: dict, micro: int) -> torch.Tensor:
        out = toy.model(toy.x)
        if batch["step"] == 1:
            out.register_hook(lambda g: g * float("inf"))
        return F.mse_loss(out, toy.x.flip(1))

    value, grad_norm, _ = steps.run([{"step": 0}], 0, loss)
    assert math.isfinite(value) and math.isfinite(grad_norm)
    with pytest.raises(NonFiniteLoss, match="at step 2.*fused_backward"):
        steps.run([{"step": 1}], 1, loss)


def test_metrics_rows_are_the_same_with_and_without_the_sync_per_step(tiny_config, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config.with_overrides({"train.log_every": 2, "train.max_steps": 5, "sample.at_end": False,
                                      "checkpoint.every_steps": 0})

    def rows(run: Path) -> list[tuple]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in lines if r.get("kind") == "train"]

    events = run_all(cfg, tmp_path / "lazy")
    assert isinstance(events[-1], ev.Finished)
    monkeypatch.setattr(OptimizerStep, "lazy", property(lambda self: False))
    events = run_all(cfg, tmp_path / "sync")
    assert isinstance(events[-1], ev.Finished)
    lazy, sync = rows(tmp_path / "lazy"), rows(tmp_path / "sync")
    assert [r[0] for r in lazy] == [2, 4, 5]
    assert lazy == sync  # bit for bit: float64 sums on the device equal the host's


def test_step_timer_reads_cuda_events_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.train.progress import StepTimer

    clock = iter(range(100))
    synced: list[int] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self) -> None:
            self.t = next(clock)

        def synchronize(self) -> None:
            synced.append(self.t)

        def elapsed_time(self, end: FakeEvent) -> float:  # milliseconds, like torch.cuda.Event
            return (end.t - self.t) * 10.0

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = StepTimer(torch.device("cuda"), keep=3)
    for _ in range(4):
        timer.start()
        timer.stop()
    assert synced == []  # nothing read per step
    assert timer.median() == pytest.approx(0.01)
    assert len(synced) == 3 and len(timer.done) == 3
    cpu = StepTimer(CPU)
    cpu.start()
    cpu.stop()
    assert cpu.median() >= 0.0 and len(cpu.done) == 1


def test_sdxl_time_ids_are_built_once_per_row_and_kept_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.models.sd import model

    model._TIME_ID_ROWS.clear()
    sizes = [((768, 1024), (0, 8), (768, 1024)), ((1024, 1024), (0, 0), (1024, 1024))]
    first = model._time_ids(sizes, 2, 1024, CPU, torch.float32)
    assert first.tolist() == [[768, 1024, 0, 8, 768, 1024], [1024, 1024, 0, 0, 1024, 1024]]
    built: list[object] = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a) or original(*a, **k))
    again = model._time_ids(list(reversed(sizes)), 2, 1024, CPU, torch.bfloat16)  # new dtype: new rows
    assert len(built) == 2 and again.dtype == torch.bfloat16
    built.clear()
    model._time_ids(sizes * 4, 8, 1024, CPU, torch.float32)
    assert built == []  # every row known: a stack of device rows, nothing from the host


def test_cache_entries_are_hashed_once_then_read_without_the_checksum(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.data import cache as cache_module
    from sdstudio.core.data.cache import FeatureCache, TextItem

    cache = FeatureCache("speed-test", root=tmp_path)
    items = [TextItem(f"caption {i}") for i in range(6)]
    for i, item in enumerate(items):
        cache.put(item, {"states": torch.full((2, 3), float(i))})
    # a corrupt entry (a flipped value, same size) is still caught by the one verification
    bad = cache.path_for(cache.key(items[5]))
    blob = bytearray(bad.read_bytes())
    blob[-1] ^= 0x40
    bad.write_bytes(bytes(blob))
    hashed: list[int] = []
    original = cache_module.tensors_digest
    monkeypatch.setattr(cache_module, "tensors_digest", lambda t: hashed.append(1) or original(t))
    cache.verify_in_background(items).join(timeout=30)
    assert len(hashed) == 6 and not bad.exists()
    hashed.clear()
    for _ in range(3):
        for i, item in enumerate(items[:5]):
            assert cache.get(item)["states"][0, 0] == i
    assert hashed == []  # read on the training thread without hashing


def test_attention_backend_picks_the_kernel(tiny_config) -> None:
    from torch.profiler import ProfilerActivity, profile

    from sdstudio.core.train.speed import AttentionChoice

    q = torch.randn(2, 2, 16, 8)

    def kernels(choice: str) -> set[str]:
        attention = AttentionChoice(choice).apply()
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                F.scaled_dot_product_attention(q, q, q)
        finally:
            attention.restore()
        return {e.name for e in prof.events() if "scaled_dot_product" in e.name}

    assert any("math" in k for k in kernels("math")) and not any("flash" in k for k in kernels("math"))
    assert any("flash" in k for k in kernels("auto"))  # the CPU flash kernel comes first
    assert any("flash" in k for k in kernels("math") | kernels("auto"))
    assert tiny_config.train.attention_backend == "auto"
    from sdstudio.core.errors import ConfigError

    with pytest.raises(ConfigError, match="attention_backend"):
        tiny_config.with_overrides({"train.attention_backend": "xformers"})


def test_regional_compile_finds_the_repeated_blocks_and_keeps_parameter_names() -> None:
    from sdstudio.core.train.speed import repeated_blocks
    from tests.tiny_models import tiny_sd1_components

    unet = tiny_sd1_components(seed=0)["unet"]
    names = {type(b).__name__ for b in repeated_blocks(unet)}
    assert names == {"BasicTransformerBlock", "ResnetBlock2D"}
    flat = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert repeated_blocks(flat) == []


class _Blocks(torch.nn.Module):
    """Three identical diffusers transformer blocks (what regional compilation compiles once for all three)."""

    _repeated_blocks = ("BasicTransformerBlock",)

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(BasicTransformerBlock(16, 2, 8, cross_attention_dim=16) for _ in range(3))
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, encoder_hidden_states=ctx)
        return self.out(x)


def _losses(compiled: str | None, steps: int) -> tuple[list[float], list[torch.Tensor], dict[str, int]]:
    from torch._dynamo.utils import counters

    from sdstudio.core.train.speed import compile_model

    net = _Blocks()
    keys = list(net.state_dict())
    model = net
    counters.clear()
    if compiled:
        model, regions = compile_model(net, mode=compiled, dynamic=False)
        assert regions == 3 and model is net and list(net.state_dict()) == keys  # names unchanged
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 8, 16, generator=gen), torch.randn(2, 4, 16, generator=gen)
    losses, grads = [], []
    for step in range(steps):
        loss = F.mse_loss(model(x, ctx), x.flip(-1))
        loss.backward()
        if step == 0:
            grads = [p.grad.detach().clone().flatten() for p in net.parameters()]
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, grads, {"graphs": int(counters["stats"]["unique_graphs"])}


@pytest.mark.slow
def test_compiled_and_eager_agree_on_gradients_and_the_loss_curve() -> None:
    from sdstudio.core.train.speed import compiler_available

    reason = compiler_available(CPU)
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    eager_losses, eager_grads, _ = _losses(None, 10)
    regional_losses, regional_grads, stats = _losses("regional", 10)
    cosine = F.cosine_similarity(torch.cat(eager_grads), torch.cat(regional_grads), dim=0)
    assert cosine > 0.999
    assert regional_losses == pytest.approx(eager_losses, rel=1e-3)
    assert regional_losses[-1] < regional_losses[0]
    # three blocks, at most two graphs: the first block's input needs no gradient, the others' do
    assert stats["graphs"] <= 2


def test_session_compiles_as_configured_and_sets_the_attention_kernel(tiny_config, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile_mode / compile_cache / attention_backend reach the session's model (compiling is lazy: no
    step runs here, so nothing is compiled yet)."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    from sdstudio.core.train.session import TrainingSession

    monkeypatch.setenv("SDSTUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "-")  # recorded, so the original state comes back after
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    before = _cur_sdpa_kernel_backends()

    def build(**overrides) -> TrainingSession:
        session = TrainingSession(tiny_config.with_overrides(overrides), run_dir=None, resume=False)
        session.prepare_data()
        session.build()
        return session

    plain = build()
    keys = list(plain.bundle.trainable.state_dict())
    plain.close()
    regional = build(**{"train.compile": True, "train.attention_backend": "math"})
    try:
        assert regional.compiled_regions > 0 and regional.model is regional.bundle.trainable
        assert list(regional.bundle.trainable.state_dict()) == keys
        assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
        import os

        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "home" / "cache" / "compile")
    finally:
        regional.close()
    assert _cur_sdpa_kernel_backends() == before
    whole = build(**{"train.compile": True, "train.compile_mode": "whole"})
    try:
        assert whole.compiled_regions == 0 and isinstance(whole.model, torch._dynamo.eval_frame.OptimizedModule)
    finally:
        whole.close()
