"""DDPM-only loss keys are refused for the flow-matching families (naming the flow key to use), not ignored."""

from __future__ import annotations

import pytest

from sdstudio.core.config import RunConfig


@pytest.mark.parametrize("family", ["flux-dev", "sd3", "chroma"])
@pytest.mark.parametrize(("override", "names"), [
    ({"loss.debiased_estimation": True}, "flow.weighting"),
    ({"loss.kind": "huber", "loss.huber_schedule": "snr"}, "loss.huber_schedule"),
    ({"loss.timestep_distribution": "logit_normal"}, "flow.timestep_sampling"),
    ({"loss.timestep_shift": 3.0}, "flow.shift"),
    ({"loss.timestep_max": 500}, "loss.timestep_max"),
])
def test_ddpm_loss_keys_are_refused_for_flow_families(family: str, override: dict, names: str) -> None:
    with pytest.raises(Exception, match=names.replace(".", r"\.")):
        RunConfig().with_overrides({"model.family": family, "data.resolution": 64, **override})


@pytest.mark.parametrize("override", [{"loss.debiased_estimation": True}, {"loss.timestep_max": 500},
                                      {"loss.kind": "huber", "loss.huber_schedule": "snr"}])
def test_the_same_keys_stay_valid_for_ddpm_families(override: dict) -> None:
    RunConfig().with_overrides({"model.family": "sd1", **override})


def test_flow_families_accept_their_own_keys_and_a_constant_huber() -> None:
    RunConfig().with_overrides({"model.family": "flux-dev", "data.resolution": 64, "loss.kind": "huber",
                                "flow.timestep_sampling": "mode", "flow.weighting": "cosmap"})
