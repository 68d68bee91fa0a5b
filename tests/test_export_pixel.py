"""diffusers-folder exports of from-scratch (pixel) runs, checked with a consumer sdstudio did not write:
diffusers' own `DiffusionPipeline.from_pretrained` loads the folder, its weights are the checkpoint's, and its
images equal sdstudio's own sampler's for the same prompts, seeds, sampler, steps and guidance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.cli import main
from sdstudio.core import events as ev
from sdstudio.core.export.api import export
from sdstudio.core.sampling.from_run import load_trained
from sdstudio.core.train import state as ckpt_state
from sdstudio.core.train.loop import train
from tests.conftest import TINY_OVERRIDES

PROMPTS = ["a red circle on white", "a blue square on white"]


def _train(config, run: Path) -> Path:
    events = list(train(config, run_dir=run))
    assert isinstance(events[-1], ev.Finished), events[-1]
    return run


@pytest.fixture(scope="module")
def pixel_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny conditional pixel run (6 steps), shared by the tests of this module."""
    from sdstudio.core.config import RunConfig

    root = tmp_path_factory.mktemp("pixel-run")
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse home fixture is not active yet
        mp.setenv("SDSTUDIO_HOME", str(root / "home"))
        cfg = RunConfig().with_overrides({**TINY_OVERRIDES, "data.path": str(tiny_dataset)})
        return _train(cfg, root / "run")


@pytest.fixture
def modules_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """diffusers copies a folder's pipeline code into HF_HOME/modules; keep that inside the test's tmp folder."""
    from diffusers.utils import dynamic_modules_utils

    cache = tmp_path / "hf-modules"
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))  # diffusers appends the cache folder to sys.path
    return cache


def _checkpoint_weights(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_trained(run, device="cpu").checkpoint
    return ckpt_state.load_weights(checkpoint)


def _pil_stack(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_conditional_folder_loads_in_diffusers_with_the_checkpoint_weights(pixel_run: Path, tmp_path: Path,
                                                                          modules_cache: Path) -> None:
    from diffusers import DiffusionPipeline

    folder = export(pixel_run, "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_sdstudio_pixel", "SDStudioPixelPipeline"]
    assert (folder / "pipeline_sdstudio_pixel.py").is_file() and (folder / "tokenizer" / "tokenizer.json").is_file()
    readme = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in readme and "sdstudio sample --model" in readme

    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers runs a folder's code only when asked
        DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    assert type(pipe).__name__ == "SDStudioPixelPipeline"
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.text_encoder).__name__ == "CLIPTextModel"

    # (a) the weights are the checkpoint's, bit for bit
    weights = _checkpoint_weights(pixel_run)
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        state = module.state_dict()
        trained = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        assert trained and set(trained) <= set(state), prefix
        for name, tensor in trained.items():
            assert torch.equal(state[name], tensor), f"{prefix}{name}"
    # the tokenizer came back from tokenizer/ with its vocabulary, specials and length
    own = load_trained(pixel_run, device="cpu").bundle.tokenizer
    for text in [*PROMPTS, "a purple elephant", ""]:
        kwargs = {"padding": "max_length", "truncation": True, "max_length": own.model_max_length}
        assert pipe.tokenizer(text, **kwargs)["input_ids"] == own(text, **kwargs)["input_ids"], text
    assert pipe.tokenizer.model_max_length == own.model_max_length == TINY_OVERRIDES["model.max_caption_tokens"]

    # the scheduler is the run's sampler on the run's schedule
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert sched.beta_schedule == "squaredcos_cap_v2" and sched.prediction_type == "epsilon"
    assert sched.num_train_timesteps == 1000 and sched.clip_sample and not sched.rescale_betas_zero_snr
    facts = json.loads((folder / "sdstudio.json").read_text())
    assert facts["format"] == "sdstudio-pixel-folder" and facts["step"] == 6 and facts["sample"]["sampler"] == "ddim"


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "dpmpp_2m"])
def test_conditional_pipeline_images_equal_sdstudios_own(sampler: str, pixel_run: Path, tmp_path: Path,
                                                         modules_cache: Path) -> None:
    """(b) The folder's pipeline with seed=S makes the images `load_trained(run).generate` makes with seeds
    S, S+1: same noise, same guidance, same timesteps. Equal bit for bit on the CPU."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    from sdstudio.core.diffusion import sampling_scheduler

    folder = export(pixel_run, "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if sampler != "ddim":  # the folder holds the run's sampler (ddim); others from the same config
        pipe.scheduler = sampling_scheduler(DDPMScheduler.from_config(pipe.scheduler.config), sampler)
    ours = load_trained(pixel_run, device="cpu").generate(PROMPTS, [5, 6], steps=4, guidance=3.0, sampler=sampler)
    theirs = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=3.0, seed=5).images
    assert len(theirs) == 4 and theirs[0].size == (16, 16)
    assert np.array_equal(_pil_stack(theirs), ours), np.abs(_pil_stack(theirs).astype(int) - ours).max()
    if sampler == "ddim":
        # guidance off, and the float output, agree too
        loaded = load_trained(pixel_run, device="cpu")
        ours_1 = loaded.generate(PROMPTS[:1], [3], steps=3, guidance=1.0, sampler=sampler)
        floats = pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=1.0, seed=3, output_type="np").images
        assert np.abs(floats * 255.0 - ours_1.astype(np.float64)).max() <= 0.5 + 1e-3
        # a plain generator works as in other diffusers pipelines (reproducible, not sdstudio's seeds)
        a = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np")
        b = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np")
        assert np.array_equal(a.images, b.images)


def test_scheduler_follows_the_runs_diffusion_settings(tiny_config, tmp_path: Path, modules_cache: Path) -> None:
    """Schedule, prediction type, zero terminal SNR, timesteps and sampler of the run end up in scheduler/,
    and the pipeline still samples exactly as sdstudio does with them."""
    from diffusers import DiffusionPipeline

    cfg = tiny_config.with_overrides({"diffusion.schedule": "linear", "diffusion.prediction_type": "v_prediction",
                                      "diffusion.zero_terminal_snr": True, "diffusion.num_timesteps": 500,
                                      "diffusion.beta_end": 0.03, "sample.sampler": "euler", "train.max_steps": 2})
    run = _train(cfg, tmp_path / "run")
    folder = export(run, "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (sched.beta_schedule, sched.prediction_type, sched.rescale_betas_zero_snr, sched.num_train_timesteps,
            sched.beta_end, sched.timestep_spacing) == ("linear", "v_prediction", True, 500, 0.03, "trailing")
    ours = load_trained(run, device="cpu").generate(PROMPTS, [2], steps=4, guidance=2.0, sampler="euler")
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=2.0, seed=2).images
    assert np.array_equal(_pil_stack(theirs), ours)


def test_pipeline_denoiser_equals_the_trained_model(pixel_run: Path, tmp_path: Path, modules_cache: Path) -> None:
    """The model call under the images: the folder's text encoder + UNet on one input == sdstudio's denoiser."""
    from diffusers import DiffusionPipeline

    folder = export(pixel_run, "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    loaded = load_trained(pixel_run, device="cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = loaded.bundle.trainable(x, t, loaded.bundle.encode_captions(PROMPTS, torch.device("cpu")))
        states, mask = pipe.encode_prompt(PROMPTS, torch.device("cpu"))
        theirs = pipe.unet(x, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
    assert torch.equal(ours, theirs)


def test_unconditional_folder_is_a_standard_ddpm_pipeline(tiny_config, tmp_path: Path) -> None:
    """(c) model.conditional = false: a plain DDPMPipeline folder (no code, no extra arguments)."""
    from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline

    run = _train(tiny_config.with_overrides({"model.conditional": False, "train.max_steps": 3}), tmp_path / "run")
    folder = export(run, "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    assert not (folder / "pipeline_sdstudio_pixel.py").exists()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert type(pipe) is DDPMPipeline and isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    weights = _checkpoint_weights(run)
    state = pipe.unet.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name[len("unet."):]], tensor), name
    images = pipe().images  # the pipeline's defaults: one image, 1000 steps
    assert len(images) == 1 and images[0].size == (16, 16)

    # with the run's timesteps (steps_offset = 1, as the README says) the images are sdstudio's
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, steps_offset=1)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    theirs = pipe(batch_size=2, generator=gens, num_inference_steps=4, output_type="np").images
    ours = load_trained(run, device="cpu").generate([""], [5, 6], steps=4, sampler="ddim")
    assert np.abs(theirs * 255.0 - ours.astype(np.float64)).max() <= 0.5 + 1e-3


def test_export_refuses_an_existing_folder_and_single_file(pixel_run: Path, tmp_path: Path, capsys) -> None:
    """(d) an existing non-empty folder needs --force; a pixel model has no single-file layout."""
    from sdstudio.core.config import RunConfig
    from sdstudio.core.errors import ConfigError, UserError

    out = tmp_path / "export"
    assert main(["export", str(pixel_run), "--format", "diffusers-folder", "--out", str(out), "--dtype", "fp32"]) == 0
    first = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["export", str(pixel_run), "--format", "diffusers-folder", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err and "Traceback" not in err
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == first
    with pytest.raises(UserError, match="not empty"):
        export(pixel_run, "diffusers-folder", out)
    assert main(["export", str(pixel_run), "--format", "diffusers-folder", "--out", str(out), "--force"]) == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < len(first), "fp16 now"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(pixel_run), "--format", "diffusers-folder", "--out", str(empty)]) == 0
    assert (empty / "model_index.json").is_file()
    assert not list(tmp_path.glob(".*.tmp")), "no temp folders left behind"
    # --force replaces an earlier export, never a folder of other files
    mine = tmp_path / "my-models"
    mine.mkdir()
    (mine / "precious.safetensors").write_bytes(b"user data")
    assert main(["export", str(pixel_run), "--format", "diffusers-folder", "--out", str(mine), "--force"]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["precious.safetensors"]

    assert main(["export", str(pixel_run), "--format", "single-file", "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "from-scratch (pixel)" in err and "diffusers-folder" in err
    assert not (tmp_path / "m.safetensors").exists()

    RunConfig().with_overrides({"export.formats": ["diffusers-folder"]})  # allowed for pixel runs now
    with pytest.raises(ConfigError, match="single-file"):
        RunConfig().with_overrides({"export.formats": ["single-file"]})


def test_pixel_run_exports_automatically(tiny_config, tmp_path: Path, modules_cache: Path) -> None:
    """(e) export.formats = ["diffusers-folder"] in a pixel run writes the folder into RUN_DIR/exports (here
    with export.ema: the EMA weights, the ones the run's previews use)."""
    from diffusers import DiffusionPipeline

    cfg = tiny_config.with_overrides({"export.formats": ["diffusers-folder"], "export.dtype": "fp32",
                                      "name": "mine", "train.max_steps": 3, "train.ema": True, "export.ema": True})
    events = list(train(cfg, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished), events[-1]
    assert not [e for e in events if isinstance(e, ev.Warning) and "export" in e.text]
    exports = sorted(p.name for p in (tmp_path / "run" / "exports").iterdir())
    assert exports == ["mine-step00000003-diffusers-folder"]
    folder = tmp_path / "run" / "exports" / exports[0]
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe(PROMPTS[0], num_inference_steps=2, seed=0).images) == 1
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    ema = ckpt_state.load_weights(checkpoint, ckpt_state.EMA_WEIGHTS)
    raw = ckpt_state.load_weights(checkpoint)
    state = pipe.unet.state_dict()
    name = "conv_in.weight"
    assert torch.equal(state[name], ema[f"unet.{name}"]) and not torch.equal(state[name], raw[f"unet.{name}"])
    assert json.loads((folder / "sdstudio.json").read_text())["ema"] is True
    # the run's previews (EMA) and the export's images agree
    ours = load_trained(tmp_path / "run", device="cpu").generate(PROMPTS, [0], steps=3, guidance=3.0, sampler="ddim")
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0).images
    assert np.array_equal(_pil_stack(theirs), ours)


def test_caption_options_export_and_sample_as_in_sdstudio(tiny_config, tmp_path: Path, modules_cache: Path) -> None:
    """A bidirectional text encoder with the pooled caption in the timestep embedding and cross-attention at every
    level: the folder's pipeline (and `sdstudio sample --model` on it) makes sdstudio's own images."""
    from diffusers import DiffusionPipeline

    from sdstudio.core.models.registry import get_family
    from sdstudio.core.sampling.from_files import load_pixel_export

    cfg = tiny_config.with_overrides({"model.text_causal": False, "model.text_pooled_to_time": True,
                                      "model.cross_attention_everywhere": True, "train.max_steps": 2,
                                      "sample.every_epochs": 0})
    run = _train(cfg, tmp_path / "run")
    folder = export(run, "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.config.sdstudio_bidirectional and pipe.unet.config.class_embed_type == "projection"
    ours = load_trained(run, device="cpu").generate(PROMPTS, [5], steps=3, guidance=3.0, sampler="ddim")
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=5).images
    assert np.array_equal(_pil_stack(theirs), ours), np.abs(_pil_stack(theirs).astype(int) - ours).max()
    loaded = load_pixel_export(folder, torch.device("cpu"), get_family("pixel"))
    from sdstudio.core.sampling.sampler import generate

    again = generate(loaded.bundle, loaded.bundle.trainable, loaded.scheduler, PROMPTS, [5], steps=3, guidance=3.0,
                     sampler="ddim", device=torch.device("cpu"))
    assert np.array_equal(again, ours)


def test_v_prediction_ddim_recomputes_its_noise_from_the_clipped_image(tiny_config, tmp_path: Path,
                                                                      modules_cache: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """DDIM in pixel space with v-prediction steps with the noise estimate recomputed from the clipped image
    (guided samples otherwise lose their colours, docs/benchmarks.md), in sdstudio's sampler and in the exported
    pipeline alike; epsilon-prediction, DDPM and latent models keep diffusers' default."""
    from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline

    from sdstudio.core import diffusion
    from sdstudio.core.sampling import sampler as sampler_module

    v_ddim = DDIMScheduler(prediction_type="v_prediction", clip_sample=True)
    assert diffusion.step_kwargs(v_ddim) == {"use_clipped_model_output": True}
    assert diffusion.step_kwargs(DDIMScheduler(prediction_type="epsilon", clip_sample=True)) == {}
    assert diffusion.step_kwargs(DDIMScheduler(prediction_type="v_prediction", clip_sample=False)) == {}
    assert diffusion.step_kwargs(DDPMScheduler(prediction_type="v_prediction", clip_sample=True)) == {}

    cfg = tiny_config.with_overrides({"diffusion.prediction_type": "v_prediction", "train.max_steps": 2,
                                      "sample.every_epochs": 0})
    run = _train(cfg, tmp_path / "run")
    folder = export(run, "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    loaded = load_trained(run, device="cpu")
    ours = loaded.generate(PROMPTS, [5], steps=4, guidance=3.0, sampler="ddim")
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, seed=5).images
    assert np.array_equal(_pil_stack(theirs), ours), np.abs(_pil_stack(theirs).astype(int) - ours).max()
    monkeypatch.setattr(sampler_module, "step_kwargs", lambda sched: {})  # the old step: the images differ
    assert not np.array_equal(loaded.generate(PROMPTS, [5], steps=4, guidance=3.0, sampler="ddim"), ours)


def test_unconditional_v_prediction_ddim_folder_samples_as_sdstudio(tiny_config, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An unconditional v-prediction model sampled with DDIM: a plain DDPMPipeline would keep DDIM's unclipped
    noise estimate, so the folder carries its DDPMPipeline subclass, which steps as sdstudio does; the README
    says why it needs trust_remote_code. With DDPM the folder stays a standard DDPMPipeline."""
    from diffusers import DDIMScheduler, DDPMPipeline, DiffusionPipeline

    from sdstudio.core.export import pixel_folder

    cfg = tiny_config.with_overrides({"model.conditional": False, "diffusion.prediction_type": "v_prediction",
                                      "train.max_steps": 3, "sample.every_epochs": 0})
    run = _train(cfg, tmp_path / "run")
    folder = export(run, "diffusers-folder", tmp_path / "export", dtype=torch.float32)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == [pixel_folder.PIPELINE_MODULE, pixel_folder.UNCONDITIONAL_CLASS]
    assert "v-prediction" in (folder / "README.md").read_text() and "LeakyReLU" not in (folder / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    assert isinstance(pipe, DDPMPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, steps_offset=1)
    ours = load_trained(run, device="cpu").generate([""], [5, 6], steps=4, sampler="ddim")

    def theirs(p) -> np.ndarray:
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        return p(batch_size=2, generator=gens, num_inference_steps=4, output_type="np").images * 255.0

    assert np.abs(theirs(pipe) - ours.astype(np.float64)).max() <= 0.5 + 1e-3
    assert "step" not in vars(pipe.scheduler), "the step is the scheduler's own again after the call"
    plain = DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    plain.set_progress_bar_config(disable=True)
    assert np.abs(theirs(plain) - ours.astype(np.float64)).max() > 1.0, "a plain DDPMPipeline steps differently"

    ddpm = export(_train(cfg.with_overrides({"sample.sampler": "ddpm"}), tmp_path / "run-ddpm"), "diffusers-folder",
                  tmp_path / "export-ddpm", dtype=torch.float32)
    assert json.loads((ddpm / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert not (ddpm / f"{pixel_folder.PIPELINE_MODULE}.py").exists()
