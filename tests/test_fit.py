"""`sdstudio fit` with a stand-in memory budget on the CPU: the plain setting does not fit, the next lever does,
the table says so and the written config, read by `train --config`, has the winning lever."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdstudio.cli import main
from sdstudio.core.presets import load_config_file


@pytest.mark.slow
def test_fit_picks_the_first_setting_under_the_budget(tiny_sd1: Path, four_images: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fit.toml"
    sets = [f"model.path={tiny_sd1}", "train.device=cpu", "train.mixed_precision=no", "data.val_split=0.0",
            "train.batch_size=4", "data.resolution=64"]
    args = ["fit", "--preset", "sd15-lora", "--data", str(four_images), "--budget-gb", "0.1", "--steps", "1",
            "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(("as configured", "+ "))]
    assert rows[0].split()[-1] == "no" and "gradient checkpointing" in rows[1] and rows[1].split()[-1] == "yes"
    assert len(rows) == 2  # stops at the first fit
    config = load_config_file(out)
    assert config.train.gradient_checkpointing and config.lora.enabled and config.model.path == str(tiny_sd1)


def test_fit_without_a_gpu_needs_a_budget(tiny_sd1: Path, four_images: Path) -> None:
    from sdstudio.core.errors import UserError
    from sdstudio.core.train.fit import fit
    from tests.sd_helpers import sd_config

    with pytest.raises(UserError, match="budget"):
        fit(sd_config("sd15-lora", tiny_sd1, four_images))


def test_an_ema_run_tries_the_average_in_cpu_memory_before_offloading_activations() -> None:
    from sdstudio.core.config import RunConfig
    from sdstudio.core.train.fit import candidates

    names = [name for name, _ in candidates(RunConfig().with_overrides({"train.ema": True}))]
    assert names.index("+ EMA in CPU memory") < names.index("+ activations offloaded")
    assert "+ EMA in CPU memory" not in [n for n, _ in candidates(RunConfig())]
    assert dict(candidates(RunConfig().with_overrides({"train.ema": True})))["+ EMA in CPU memory"][
        "train.ema_on_cpu"] is True
