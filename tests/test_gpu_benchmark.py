"""benchmarks/gpu_train.py on the CPU with tiny models: the loops built side by side and interleaved, the JSON
fields docs/benchmarks.md promises, the ratio as the median of per-round ratios, one failing loop recorded and
not fatal, and the end-to-end train() through the real data path."""

from __future__ import annotations

import importlib.util
import json
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
    assert lora["name"] == "sd15-lora-b16" and flux["name"] == "flux-lora" and "skipped" in flux
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
    with pytest.raises(SystemExit):
        bench.parse_args(["x.json", "--only", "sd3-lora"])
    from bench_loops import WORKLOADS, sdstudio_config

    config = sdstudio_config(WORKLOADS["sd15-full-b16"], tiny=False, steps=10, compile_=True, extra={})
    assert (config.train.batch_size, config.data.resolution, config.lora.enabled) == (16, 512, False)
    assert config.train.compile and not config.train.gradient_checkpointing and not config.train.ema
    assert config.train.mixed_precision == "bf16" and config.train.compile_mode == "regional"
