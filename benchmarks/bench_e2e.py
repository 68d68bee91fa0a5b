"""One end-to-end ``train()`` for benchmarks/gpu_train.py: the sd15-lora preset on random real-size weights (tiny
on a CPU), images written to disk, the latent and text-embedding caches built and read back, the data loader
(pinned memory on a GPU), metrics rows. Reports the phases' times, the steady img/s of the metrics rows and, with
train.compile (``--set train.compile=true``), the pre-warm time of the bucket shapes (``warmup_s``)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from bench_loops import SDSTUDIO_OVERRIDES, WORKLOADS, random_components


def write_images(folder: Path, count: int, side: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a photo of sks, number {i}", encoding="utf-8")


def end_to_end(args: argparse.Namespace, device: torch.device, name: str = "sd15-lora-b16") -> dict[str, Any]:
    from sdstudio.core import events as ev
    from sdstudio.core.presets import load_preset
    from sdstudio.core.train.loop import train

    w = WORKLOADS[name]
    tiny = args.tiny
    batch = w.tiny_batch if tiny else w.batch
    steps = 4 if tiny else 60
    side = 64 if tiny else w.resolution
    root = Path(tempfile.mkdtemp(prefix="sdstudio-e2e-"))
    write_images(root / "data", batch * 2 + 2, side)
    overrides = {k: v for k, v in SDSTUDIO_OVERRIDES.items() if k != "data.path"}
    overrides.update({"data.path": str(root / "data"), "data.resolution": side, "data.val_split": 0.0,
                      "data.num_workers": 0 if tiny else 2, "train.batch_size": batch, "train.max_steps": steps,
                      "train.log_every": max(1, steps // 4), "sample.at_end": False, "sample.every_steps": 0,
                      "checkpoint.every_steps": 0, "export.formats": [], **dict(args.set)})
    config = load_preset(w.preset).with_overrides(overrides)
    components = random_components(w.family, tiny, device)
    old_home = os.environ.get("SDSTUDIO_HOME")
    os.environ["SDSTUDIO_HOME"] = str(root / "home")  # a fresh feature cache: it is built, then read
    phases: dict[str, float] = {}
    rows: list[ev.StepMetrics] = []
    t0 = last = time.perf_counter()
    phase = "start"
    try:
        with mock.patch("sdstudio.core.models.sd.model.load_sd_components", lambda *a, **k: components):
            for event in train(config, run_dir=root / "run"):
                now = time.perf_counter()
                if isinstance(event, ev.Status) and event.phase != phase:
                    phases[phase] = phases.get(phase, 0.0) + now - last
                    phase, last = event.phase, now
                if isinstance(event, ev.StepMetrics):
                    rows.append(event)
                if isinstance(event, ev.Failed):
                    return {"error": f"train() failed: {event.message}", "traceback": event.details[-3000:]}
    finally:
        if old_home is None:
            os.environ.pop("SDSTUDIO_HOME", None)
        else:
            os.environ["SDSTUDIO_HOME"] = old_home
    phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - last
    steady = [r.img_per_s for r in rows[1:]] or [r.img_per_s for r in rows]
    # train.compile with train.compile_prewarm: every bucket compiled before step 1, timed on its own
    from sdstudio.core.runs import RunFolder

    warmup = [r.get("warmup_s") for r in RunFolder(root / "run").metrics_rows() if r.get("event") == "compiled"]
    return {"workload": name, "steps": steps, "batch": batch, "resolution": side, "images": batch * 2 + 2,
            "wall_s": time.perf_counter() - t0, "phases_s": phases, "img_s_rows": [r.img_per_s for r in rows],
            "img_s": float(np.median(steady)) if steady else None, "last_loss": rows[-1].loss if rows else None,
            "warmup_s": warmup[0] if warmup else None}
