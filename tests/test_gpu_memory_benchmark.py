"""benchmarks/gpu_memory.py runs tiny on the CPU: every lever variant (SDXL's and Flux.1-dev's) trains a few
steps and is reported."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_memory.py"
_spec = importlib.util.spec_from_file_location("gpu_memory", SCRIPT)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_tiny_run_reports_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "mem.json"
    assert bench.main([str(out), "--tiny", "--steps", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["tiny"] is True and data["torch"]
    names = [w["name"] for w in data["workloads"]]
    assert names == list(bench.VARIANTS)
    for w in data["workloads"]:
        assert w.get("skipped") or (w["step_s"] > 0 and w["peak_gb"] is None)


def test_tiny_flux_variants_train_and_report(tmp_path: Path) -> None:
    """The Flux.1-dev variants of issue 13 (plain bf16, checkpointing, fp8, nf4, fp8 + block swap) on the tests'
    tiny Flux: each trains its steps with a finite loss and is reported with its levers."""
    out = tmp_path / "mem.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a smoke test: two threads on a shared 2-core machine run many times slower
    try:
        assert bench.main([str(out), "--tiny", "--steps", "2", "--model", "flux"]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    flux = [n for n in bench.VARIANTS if n.startswith("flux-")]
    assert [w["name"] for w in data["workloads"]] == flux
    assert flux[0] == "flux-plain-bf16" and not bench.VARIANTS[flux[0]]
    assert {"fp8", "nf4"} <= {bench.VARIANTS[n].get("quantize") for n in flux}
    assert any(bench.VARIANTS[n].get("swap") and bench.VARIANTS[n].get("quantize") for n in flux)
    for w in data["workloads"]:
        assert "error" not in w, w
        assert set(w) >= {"name", "peak_gb", "step_s", "levers"} and w["levers"] == bench.VARIANTS[w["name"]]
        if not w.get("skipped"):
            assert w["model"] == "flux-dev" and w["step_s"] > 0 and w["peak_gb"] is None
            assert math.isfinite(w["loss"])


def test_unknown_variants_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench.main(["x.json", "--tiny", "--only", "flux-int2"])
