"""LoRA tools and lora.init_from on tiny SD1 models: merge (exact rank concatenation, SVD, into a base model),
resize (the reported error is the SVD's), extract (a known low-rank difference comes back exactly), and a run
started from a kohya / LyCORIS / diffusers file whose step-0 model is the base with the file applied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdstudio.cli import main
from sdstudio.core.lora_tools.files import ModuleAdapter, read_adapter_file, save_adapter_file
from sdstudio.core.lora_tools.names import file_names
from sdstudio.core.lora_tools.ops import apply_adapter_file, extract_lora, merge_loras, resize_lora
from sdstudio.core.models.sd.model import build_sd_model
from tests.sd_helpers import sd_config
from tests.test_export_lora import unet_output

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def base_unet(model: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")


def attention_paths(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ATTN)
            and ".attn" in n]


def synthetic_file(model: Path, path: Path, kind: str = "lora", rank: int = 4, alpha: float = 2.0,
                   seed: int = 0, text: bool = False) -> Path:
    """A kohya / LyCORIS file for the tiny SD1 model's attention layers with random (non-zero) tensors."""
    gen = torch.Generator().manual_seed(seed)

    def tensors(out_f: int, in_f: int) -> dict[str, torch.Tensor]:
        if kind == "lora":
            return {"lora_down.weight": torch.randn(rank, in_f, generator=gen) * 0.3,
                    "lora_up.weight": torch.randn(out_f, rank, generator=gen) * 0.3}
        return {n: torch.randn(*s, generator=gen) * 0.3 for n, s in (("hada_w1_a", (out_f, rank)),  # loha
                ("hada_w1_b", (rank, in_f)), ("hada_w2_a", (out_f, rank)), ("hada_w2_b", (rank, in_f)))}

    unet = base_unet(model)
    modules = {file_names("sd1", "unet", p)[0]: ModuleAdapter(kind, tensors(*unet.get_submodule(p).weight.shape),
                                                              alpha) for p in attention_paths(unet)}
    if text:
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(str(model), subfolder="text_encoder")
        for p, m in te.named_modules():
            if isinstance(m, torch.nn.Linear) and p.endswith("q_proj"):
                modules[file_names("sd1", "text_encoder", p)[0]] = ModuleAdapter(kind, tensors(*m.weight.shape), alpha)
    return save_adapter_file(modules, path, {"ss_base_model_version": "sd_v1"}, dtype=torch.float32)


def with_files(model: Path, *files: tuple[Path, float]) -> torch.Tensor:
    unet = base_unet(model)
    for f, w in files:
        apply_adapter_file(read_adapter_file(f), {"unet": unet}, family="sd1", weight=w, strict=False)
    return unet_output(unet, False)


def test_merge_concatenates_exactly_and_svd_reports_its_error(tiny_sd1: Path, tmp_path: Path, capsys) -> None:
    a = synthetic_file(tiny_sd1, tmp_path / "a.safetensors", seed=1)
    b = synthetic_file(tiny_sd1, tmp_path / "b.safetensors", rank=2, alpha=1.0, seed=2)
    expected = with_files(tiny_sd1, (a, 0.7), (b, -0.5))
    assert main(["lora", "merge", f"{a}:0.7", f"{b}:-0.5", "--out", str(tmp_path / "m.safetensors"),
                 "--dtype", "fp32"]) == 0
    assert "rank 6" in capsys.readouterr().out
    merged = read_adapter_file(tmp_path / "m.safetensors")
    assert merged.ranks() == {6} and merged.alphas() == {6.0}
    assert torch.allclose(with_files(tiny_sd1, (tmp_path / "m.safetensors", 1.0)), expected, atol=1e-5)
    sources = json.loads(merged.metadata["sdstudio_sources"])
    assert [s["weight"] for s in sources] == [0.7, -0.5] and sources[0]["sha256"]
    assert merged.metadata["sdstudio_tool"] == "lora merge"

    # SVD to rank 6 keeps everything (the sum has rank <= 6); to rank 1 it reports a real error
    full = merge_loras([(a, 0.7), (b, -0.5)], tmp_path / "svd6.safetensors", rank=6, dtype=torch.float32)
    assert full.error < 1e-5
    assert torch.allclose(with_files(tiny_sd1, (tmp_path / "svd6.safetensors", 1.0)), expected, atol=1e-4)
    low = merge_loras([(a, 0.7), (b, -0.5)], tmp_path / "svd1.safetensors", rank=1, dtype=torch.float32)
    assert 0.05 < low.error < 1.0 and low.rank == 1


def test_resize_keeps_what_the_svd_says(tiny_sd1: Path, tmp_path: Path, capsys) -> None:
    src = synthetic_file(tiny_sd1, tmp_path / "loha.safetensors", kind="loha", rank=4)
    delta = {n: m.delta(torch.empty(m.tensors["hada_w1_a"].shape[0], m.tensors["hada_w1_b"].shape[1]))
             for n, m in read_adapter_file(src).modules.items()}
    assert main(["lora", "resize", str(src), "--rank", "3", "--out", str(tmp_path / "r3.safetensors"),
                 "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "relative error" in printed
    out = read_adapter_file(tmp_path / "r3.safetensors")
    assert out.kinds == {"lora"} and out.ranks() == {3}
    lost = kept = 0.0
    for name, d in delta.items():
        s = torch.linalg.svdvals(d)
        lost += float((s[3:] ** 2).sum())
        kept += float((s ** 2).sum())
        approx = out.modules[name].low_rank_delta(d.shape)
        assert float((d - approx).norm()) == pytest.approx(float(s[3:].norm()), rel=1e-3, abs=1e-5)
    meta = json.loads(out.metadata["sdstudio_resize"])
    assert meta["relative_error"] == pytest.approx((lost / kept) ** 0.5, rel=1e-3)
    report = resize_lora(src, tmp_path / "fro.safetensors", sv_fro=0.999, dtype=torch.float32)
    assert report.kept >= 0.999 - 1e-6
    with pytest.raises(SystemExit) as exited:  # no rank rule: argparse's one line, exit 2
        main(["lora", "resize", str(src), "--out", str(tmp_path / "x.safetensors")])
    assert exited.value.code == 2


def test_extract_recovers_a_low_rank_difference(tiny_sd1: Path, tmp_path: Path) -> None:
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_sd1, tuned)
    unet = base_unet(tiny_sd1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in attention_paths(unet)[:6]:
            w = unet.get_submodule(p).weight
            w.add_(torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen) * 0.1)
    unet.save_pretrained(str(tuned / "unet"))
    report = extract_lora(tiny_sd1, tuned, tmp_path / "x.safetensors", rank=2, dtype=torch.float32)
    assert report.modules == 6 and report.error < 1e-4
    got = with_files(tiny_sd1, (tmp_path / "x.safetensors", 1.0))
    assert torch.allclose(got, unet_output(base_unet(tuned), False), atol=1e-4)
    meta = read_adapter_file(tmp_path / "x.safetensors").metadata
    assert meta["sdstudio_tool"] == "lora extract" and meta["ss_base_model_version"] == "sd_v1"


def test_merge_into_a_base_folder(tiny_sd1: Path, tmp_path: Path) -> None:
    a = synthetic_file(tiny_sd1, tmp_path / "a.safetensors", seed=4)
    out = tmp_path / "merged"
    assert main(["lora", "merge", f"{a}:0.5", "--into", str(tiny_sd1), "--out", str(out), "--dtype", "fp32"]) == 0
    assert torch.allclose(unet_output(base_unet(out), False), with_files(tiny_sd1, (a, 0.5)), atol=1e-5)
    assert json.loads((out / "sdstudio_merge.json").read_text())["sdstudio_tool"] == "lora merge --into"


@pytest.mark.parametrize("layout", ["kohya", "loha", "diffusers"])
def test_init_from_a_file_starts_at_the_files_model(layout: str, tiny_sd1: Path, four_images: Path,
                                                    tmp_path: Path) -> None:
    kind = "loha" if layout == "loha" else "lora"
    src = synthetic_file(tiny_sd1, tmp_path / "src.safetensors", kind=kind, rank=4, alpha=2.0, text=True)
    expected_unet = with_files(tiny_sd1, (src, 1.0))
    if layout == "diffusers":  # the same adapter in diffusers keys, alpha in the header as diffusers writes it
        from diffusers import StableDiffusionPipeline

        file = read_adapter_file(src)
        unet_layers, te_layers = {}, {}
        for p in attention_paths(base_unet(tiny_sd1)):
            m = file.modules[file_names("sd1", "unet", p)[0]]
            unet_layers[f"{p}.lora_A.weight"] = m.tensors["lora_down.weight"]
            unet_layers[f"{p}.lora_B.weight"] = m.tensors["lora_up.weight"]
        for name, m in file.modules.items():
            if name.startswith("lora_te_"):
                path = "text_model." + name[len("lora_te_text_model_"):].replace("_", ".").replace(
                    "self.attn", "self_attn").replace("q.proj", "q_proj")
                te_layers[f"{path}.lora_A.weight"] = m.tensors["lora_down.weight"]
                te_layers[f"{path}.lora_B.weight"] = m.tensors["lora_up.weight"]
        meta = {"r": 4, "lora_alpha": 2.0, "target_modules": ["to_q"]}
        StableDiffusionPipeline.save_lora_weights(
            str(tmp_path / "d"), unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=meta, text_encoder_lora_adapter_metadata={**meta, "target_modules": ["q_proj"]},
            weight_name="d.safetensors")
        src = tmp_path / "d" / "d.safetensors"
        assert read_adapter_file(src).alphas() == {2.0}
    cfg = sd_config("sd15-lora", tiny_sd1, four_images, **{"lora.init_from": str(src), "lora.rank": 16,
                                                           "lora.alpha": 16.0, "lora.text_encoder": True})
    bundle = build_sd_model(cfg, torch.device("cpu"))
    assert bundle.architecture["lora"]["rank"] == 4 and bundle.architecture["lora"]["alpha"] == 2.0
    assert bundle.architecture["lora"]["type"] == kind
    assert torch.allclose(unet_output(bundle.components.unet, False), expected_unet, atol=1e-5)
    # the text encoder starts from the file too
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(str(tiny_sd1), subfolder="text_encoder")
    assert apply_adapter_file(read_adapter_file(src), {"text_encoder": te}, family="sd1", strict=False) == 5
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(bundle.components.text_encoder(ids)[0], te(ids)[0], atol=1e-5)
    # without lora.text_encoder the text-encoder modules have no place: a clear error
    with pytest.raises(Exception, match="lora.text_encoder = true"):
        build_sd_model(cfg.with_overrides({"lora.text_encoder": False}), torch.device("cpu"))


def test_lycoris_header_of_a_merge_names_its_sources(tiny_sd1: Path, tmp_path: Path) -> None:
    a = synthetic_file(tiny_sd1, tmp_path / "a.safetensors", kind="loha")
    with pytest.raises(Exception, match="--rank"):
        merge_loras([(a, 1.0)], tmp_path / "m.safetensors")
    merge_loras([(a, 1.0)], tmp_path / "m.safetensors", rank=4)
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["sdstudio_sources"])[0]["name"] == "a.safetensors"
