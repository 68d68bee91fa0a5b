"""benchmarks/prefetch.py runs end to end at a tiny size and writes the fields docs/benchmarks.md quotes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # four tiny training runs: ~30 s on 2 cores
def test_tiny_prefetch_benchmark_reports_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("prefetch", None)
    import prefetch  # benchmarks/prefetch.py

    out = tmp_path / "result.json"
    assert prefetch.main(["--images", "8", "--steps", "3", "--rounds", "2", "--batch", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "prefetch" and result["device"] == "cpu" and len(result["rounds"]) == 2
    for r in result["rounds"]:
        assert r["img_per_s_off"] > 0 and r["img_per_s_ahead2"] > 0
        assert r["ratio"] == pytest.approx(r["img_per_s_ahead2"] / r["img_per_s_off"])
    assert result["median_ratio"] > 0
