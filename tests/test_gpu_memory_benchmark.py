"""benchmarks/gpu_memory.py runs tiny on the CPU: every lever variant trains a few steps and is reported."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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
