"""The demo preset must visibly learn the bundled shapes on a CPU: after its default run, samples for a
prompt show that prompt's colour and shape far above chance (measured by the demo's classifier).
Thresholds and the measured time are in docs/demo.md."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sdstudio.cli import main
from sdstudio.core import demo_shapes
from sdstudio.core.sampling.from_run import load_trained

# Chance is 1/4 for colour, 1/3 for shape, 1/12 for both.
MIN_COLOUR = 0.75
MIN_SHAPE = 0.5
MIN_BOTH = 0.4


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~5 minutes alone on 2 cores; far more when the machine is shared
def test_demo_preset_learns_colours_and_shapes(tmp_path: Path, capsys) -> None:
    run = tmp_path / "demo-run"
    t0 = time.perf_counter()
    assert main(["train", "--out", str(run), "--quiet"]) == 0, capsys.readouterr().err
    minutes = (time.perf_counter() - t0) / 60
    assert list((run / "samples").glob("step-*.png")), "the demo writes sample grids"

    loaded = load_trained(run)
    prompts = [demo_shapes.caption_for(c, s) for c in demo_shapes.COLOURS for s in demo_shapes.SHAPES]
    seeds = [1000, 1001, 1002, 1003]
    images = loaded.generate(prompts, seeds)
    labels = [p for p in prompts for _ in seeds]
    scores = demo_shapes.prompt_adherence(list(images), labels)
    print(f"demo run: {minutes:.1f} min; adherence {scores}")
    assert scores["colour_acc"] >= MIN_COLOUR, scores
    assert scores["shape_acc"] >= MIN_SHAPE, scores
    assert scores["both_acc"] >= MIN_BOTH, scores
