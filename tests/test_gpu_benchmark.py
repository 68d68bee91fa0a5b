"""benchmarks/gpu_train.py on the CPU with tiny models: every workload measured for both loops (the same FLOPs
per step, so both train the same model on the same shapes), and one failing loop recorded, not fatal."""

from __future__ import annotations

import importlib.util
import json
import subprocess
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


def test_tiny_run_measures_every_workload_against_the_baseline(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--tiny"], check=False, capture_output=True,
                          text=True, timeout=180, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["device"] == "cpu" and data["tiny"] is True
    assert data["versions"]["torch"] and data["versions"]["diffusers"]
    assert list(data["workloads"]) == ["sd15-lora", "sd15-full", "sdxl-lora"]
    for name, entry in data["workloads"].items():
        base, ours = entry["baseline"], entry["sdstudio"]
        for loop in (base, ours):
            assert "error" not in loop, (name, loop)
            assert loop["img_per_s"] > 0 and loop["flops_per_step"] > 0 and loop["tflops_per_s"] > 0
        assert entry["ratio"] == pytest.approx(ours["img_per_s"] / base["img_per_s"])
        assert ours["flops_per_step"] == base["flops_per_step"], name  # the same model, shapes and trainables
        assert ours["trainable_m"] == pytest.approx(base["trainable_m"]), name
        assert ours["preset"] == name and ours["compile"] is False
    assert data["workloads"]["sd15-lora"]["sdstudio"]["trainable_m"] < data["workloads"]["sd15-full"]["sdstudio"][
        "trainable_m"] / 5
    assert f"{data['workloads']['sd15-lora']['ratio']:.2f}x the baseline" in proc.stdout


def test_a_failing_loop_is_recorded_and_the_rest_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "baseline_loop", out_of_memory)
    out = tmp_path / "gpu.json"
    code = bench.main([str(out), "--tiny", "--only", "sd15-lora", "--steps", "1", "--warmup", "0"])
    entry = json.loads(out.read_text(encoding="utf-8"))["workloads"]["sd15-lora"]
    assert code == 1
    assert entry["baseline"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert entry["sdstudio"]["img_per_s"] > 0 and entry["ratio"] is None


def test_workload_selection_and_overrides() -> None:
    bench = load_benchmark()
    args = bench.parse_args(["x.json", "--only", "sdxl-lora,sd15-lora", "--compile", "sd15-lora",
                             "--set", "train.gradient_checkpointing=true", "--set", "lora.rank=8"])
    assert args.names == ["sdxl-lora", "sd15-lora"] and args.compiled == {"sd15-lora"}
    assert dict(args.set) == {"train.gradient_checkpointing": True, "lora.rank": 8}
    assert (args.steps, args.warmup) == (20, 3)
    assert bench.parse_args(["x.json", "--compile"]).compiled == {"sd15-lora", "sd15-full", "sdxl-lora"}
    with pytest.raises(SystemExit):
        bench.parse_args(["x.json", "--only", "sd3-lora"])
    config = bench.sdstudio_config(bench.WORKLOADS["sd15-full"], tiny=False, steps=10, compile_=True, extra={})
    assert (config.train.batch_size, config.data.resolution, config.lora.enabled) == (16, 512, False)
    assert config.train.compile and not config.train.gradient_checkpointing and not config.train.ema
    assert config.train.mixed_precision == "bf16"
