"""The training-recipe options of issue 19 at demo size: the demo preset trained once per option (baseline,
learned variance, contrastive caption term, learned schedule), then the 12 colour x shape prompts sampled with
4 seeds and scored by the demo's classifier. Prints one line per option (time, colour / shape / both accuracy).

    python benchmarks/recipe_options.py OUT_DIR [option ...]     (options: baseline lv contrastive schedule)

The compositional benchmark (a third attribute, held-out combinations) belongs to the text-conditioning work;
this measures the options on the demo's own adherence score."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPTIONS: dict[str, dict[str, object]] = {
    "baseline": {},
    "lv": {"model.learned_variance": True},
    "contrastive": {"loss.contrastive_weight": 0.1},
    "schedule": {"diffusion.learned_schedule": True},
}


def main(argv: list[str]) -> int:
    from sdstudio.core import demo_shapes, paths
    from sdstudio.core.presets import load_preset
    from sdstudio.core.sampling.from_run import load_trained
    from sdstudio.core.train.loop import train

    out = Path(argv[0])
    names = argv[1:] or list(OPTIONS)
    base = load_preset("demo").with_overrides({"data.path": str(paths.demo_dataset_dir())})
    prompts = [demo_shapes.caption_for(c, s) for c in demo_shapes.COLOURS for s in demo_shapes.SHAPES]
    seeds = [1000, 1001, 1002, 1003]
    for name in names:
        cfg = base.with_overrides({**OPTIONS[name], "sample.every_epochs": 0, "sample.at_end": False})
        run = out / name
        t0 = time.perf_counter()
        events = list(train(cfg, None, run_dir=run))
        minutes = (time.perf_counter() - t0) / 60
        loaded = load_trained(run)
        rows = {}
        for sampler in (["ddim", "ddpm"] if name == "lv" else ["ddim"]):
            images = loaded.generate(prompts, seeds, sampler=sampler, steps=25 if sampler == "ddim" else 100)
            labels = [p for p in prompts for _ in seeds]
            rows[sampler] = demo_shapes.prompt_adherence(list(images), labels)
        result = {"option": name, "minutes": round(minutes, 2), "end": repr(events[-1]), "adherence": rows}
        print(json.dumps(result), flush=True)
        with (out / "results.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
