"""benchmarks/gpu_train.py on the CPU with tiny models: the loops built side by side and interleaved, the JSON
fields docs/benchmarks.md promises, the ratio as the median of per-round ratios, one failing loop recorded and
not fatal, and the end-to-end train() through the real data path."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_train"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~40 s on a quiet 2-core machine, minutes when it is shared
def test_tiny_dry_run_writes_the_promised_fields(tmp_path: Path) -> None:
    bench = load_benchmark()
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = bench.main([str(out), "--tiny", "--only", "sd15-lora-b16,flux-lora", "--rounds", "2", "--steps", "1",
                           "--warmup", "0", "--e2e"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["device"] == "cpu" and data["tiny"] is True and data["timer"] == "host"
    assert data["date"] and data["torch"] == torch.__version__ and data["versions"]["diffusers"]
    lora, flux = data["workloads"]
    assert lora["name"] == "sd15-lora-b16" and flux["name"] == "flux-lora" and "skipped" not in flux
    for key in ("ratio", "ratio_min", "ratio_max", "img_s", "baseline_img_s", "warmup_s", "peak_gb"):
        assert key in lora, key
    assert lora["ratio_min"] <= lora["ratio"] <= lora["ratio_max"] and lora["variant"] == "sdstudio"
    base, ours = lora["loops"]["baseline"], lora["loops"]["sdstudio"]
    assert len(base["round_s"]) == len(ours["round_s"]) == 2
    assert ours["flops_per_step"] == base["flops_per_step"] > 0  # the same model, shapes and trainables
    assert ours["trainable_m"] == pytest.approx(base["trainable_m"])
    assert ours["lazy_step"] is True  # the measured step is the no-sync one
    assert any("attention" in k for k in ours["attention_kernels"]) and set(ours["dynamo"]) >= {"graph_breaks"}
    e2e = data["end_to_end"]
    assert "error" not in e2e, e2e
    assert e2e["img_s"] > 0 and e2e["phases_s"]["caching"] > 0 and e2e["phases_s"]["training"] > 0
    assert e2e["warmup_s"] is None  # not compiled: nothing pre-warmed


def test_the_ratio_is_the_median_of_interleaved_rounds() -> None:
    bench = load_benchmark()
    args = bench.parse_args(["x.json"])
    entry = {"loops": {"baseline": {"batch": 4, "round_s": [1.0, 1.0, 1.0], "img_per_s": 4.0, "warmup_s": 2.0},
                       "sdstudio": {"batch": 4, "round_s": [0.5, 0.25, 1.0], "img_per_s": 8.0, "warmup_s": 1.0}}}
    bench.summarise(entry, args)
    assert (entry["ratio"], entry["ratio_min"], entry["ratio_max"]) == (2.0, 1.0, 4.0)
    assert entry["variant"] == "sdstudio" and entry["img_s"] == 8.0 and entry["baseline_img_s"] == 4.0
    entry["loops"]["sdstudio_compiled"] = {"batch": 4, "round_s": [0.4, 0.4, 0.4], "img_per_s": 10.0,
                                           "warmup_s": 30.0, "time_to_max_steps_s": 123.0}
    bench.summarise(entry, args)
    assert entry["variant"] == "sdstudio_compiled" and entry["ratio"] == pytest.approx(2.5)
    assert entry["ratio_eager"] == 2.0 and entry["warmup_s"] == 30.0 and entry["time_to_max_steps_s"] == 123.0


def test_a_failing_loop_is_recorded_and_the_rest_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "baseline_loop", out_of_memory)
    out = tmp_path / "gpu.json"
    code = bench.main([str(out), "--tiny", "--only", "sd15-lora-b16", "--steps", "1", "--rounds", "1",
                       "--warmup", "0", "--no-e2e"])
    entry = json.loads(out.read_text(encoding="utf-8"))["workloads"][0]
    assert code == 1
    assert entry["loops"]["baseline"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert entry["loops"]["sdstudio"]["img_per_s"] > 0 and entry["ratio"] is None


def test_workload_selection_and_overrides() -> None:
    bench = load_benchmark()
    args = bench.parse_args(["x.json", "--only", "sdxl-lora-b8,sd15-lora-b16", "--compile", "sd15-lora-b16",
                             "--set", "train.gradient_checkpointing=true", "--set", "lora.rank=8"])
    assert args.names == ["sdxl-lora-b8", "sd15-lora-b16"] and args.compiled == {"sd15-lora-b16"}
    assert dict(args.set) == {"train.gradient_checkpointing": True, "lora.rank": 8}
    assert (args.rounds, args.steps, args.warmup, args.e2e) == (5, 30, 3, False)
    everything = bench.parse_args(["x.json", "--compile"])
    assert everything.names == ["sd15-lora-b16", "sd15-full-b16", "sdxl-lora-b8", "flux-lora"] and everything.e2e
    # a third real-size Flux transformer (the compiled loop) does not fit an H100: measured only when named
    assert everything.compiled == {"sd15-lora-b16", "sd15-full-b16", "sdxl-lora-b8"}
    assert bench.parse_args(["x.json", "--compile", "flux-lora"]).compiled == {"flux-lora"}
    # Flux steps take ~1 s on a GPU: its rounds are capped so the whole run keeps to its time budget
    assert bench.plan(bench.WORKLOADS["flux-lora"], everything) == (3, 5, 1)
    assert bench.plan(bench.WORKLOADS["sd15-lora-b16"], everything) == (5, 30, 3)
    with pytest.raises(SystemExit):
        bench.parse_args(["x.json", "--only", "sd3-lora"])
    from bench_loops import WORKLOADS, sdstudio_config

    flux = sdstudio_config(WORKLOADS["flux-lora"], tiny=False, steps=10, compile_=False, extra={})
    assert (flux.model.family, flux.data.resolution, flux.train.batch_size, flux.lora.rank) == ("flux-dev", 1024, 1, 16)
    assert flux.train.gradient_checkpointing and flux.train.offload_frozen and flux.flow.guidance == 1.0
    config = sdstudio_config(WORKLOADS["sd15-full-b16"], tiny=False, steps=10, compile_=True, extra={})
    assert (config.train.batch_size, config.data.resolution, config.lora.enabled) == (16, 512, False)
    assert config.train.compile and not config.train.gradient_checkpointing and not config.train.ema
    assert config.train.mixed_precision == "bf16" and config.train.compile_mode == "regional"


def test_tiny_flux_lora_trains_both_loops_and_writes_the_issue_fields(tmp_path: Path) -> None:
    """flux-lora (issue 14) on the tests' tiny Flux: the diffusers-example baseline and sdstudio's flux-dev step
    built side by side, the same layers trained (same FLOPs), both really training."""
    bench = load_benchmark()
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = bench.main([str(out), "--tiny", "--only", "flux-lora", "--rounds", "2", "--steps", "1",
                           "--warmup", "1", "--no-e2e"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    entry = json.loads(out.read_text(encoding="utf-8"))["workloads"][0]
    assert entry["name"] == "flux-lora" and entry["family"] == "flux" and entry["gradient_checkpointing"]
    for key in ("ratio", "img_s", "baseline_img_s", "peak_gb", "warmup_s"):
        assert key in entry, key
    assert entry["ratio"] > 0 and entry["img_s"] > 0 and entry["baseline_img_s"] > 0
    base, ours = entry["loops"]["baseline"], entry["loops"]["sdstudio"]
    for loop in (base, ours):
        assert "error" not in loop, loop.get("error")
        assert math.isfinite(loop["loss"]) and loop["trainable_changed"] is True
        assert len(loop["round_s"]) == 2
    assert ours["flops_per_step"] == base["flops_per_step"] > 0  # the same model, shapes and trained layers
    assert ours["trainable_m"] == pytest.approx(base["trainable_m"]) and ours["trainable_m"] > 0
    assert ours["preset"] == "flux-lora" and ours["lazy_step"] is True
    assert ours["frozen_parked"] == ["text_encoder", "text_encoder_2"]  # train.offload_frozen on cached text
    # 64 px -> 8x8 latents -> 16 image tokens, + the 16 T5 tokens of the tiny run, in one joint attention
    assert any("q=[1, 2, 32, 16]" in k for k in ours["attention_kernels"]), ours["attention_kernels"]


def test_real_size_flux_is_flux1_dev_in_bf16_and_never_built_on_the_cpu() -> None:
    load_benchmark()
    from bench_loops import FluxInputs, flux_transformer

    model = flux_transformer(False, torch.device("meta"))  # the GPU build, without the memory
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    assert 11.8e9 < sum(p.numel() for p in params) < 12.0e9
    assert (model.config.num_layers, model.config.num_single_layers, model.config.guidance_embeds) == (19, 38, True)
    inputs = FluxInputs.random(model, 1, 1024, False, torch.device("meta"), torch.bfloat16)
    assert tuple(inputs.latents.shape) == (1, 16, 128, 128) and tuple(inputs.states.shape) == (1, 512, 4096)
    assert tuple(inputs.image_ids.shape) == (4096, 3) and inputs.guidance is not None
    with pytest.raises(RuntimeError, match="GPU"):
        flux_transformer(False, torch.device("cpu"))
