"""`sdstudio dataset caption --captioner FOLDER --prompt TEXT` with a vision-language chat model: a tiny
random-weight Qwen2.5-VL saved in the real folder layout (config, weights, the bundled Qwen2.5 tokenizer, the
image processor, chat_template.jinja). The test checks the path (the prompt reaches the chat template, images
become placeholder tokens, batches, files written, modes, undo), never the words."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdstudio.cli import main
from sdstudio.core import paths

QWEN_TOKENIZER = paths.resources_dir() / "tokenizers" / "qwen2.5"
# Qwen2-VL's published chat template (chat_template.json of the Qwen2-VL / Qwen2.5-VL repositories).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_bundled_qwen_tokenizer_gives_its_readmes_ids() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER, local_files_only=True)
    assert type(tokenizer).__name__.startswith("Qwen2Tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [64, 6548, 315, 264, 8251]
    assert "[64, 6548, 315, 264, 8251]" in (QWEN_TOKENIZER / "README.md").read_text()
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655 and len(tokenizer) == 151669


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    out = tmp_path_factory.mktemp("qwen-vl")
    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER, local_files_only=True)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                          temporal_patch_size=2).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 512,
                     "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 37, "num_heads": 2,
                       "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 56, "fullatt_block_indexes": [0]},
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".sdstudio" not in p.parts}


def test_a_vision_language_captioner_with_a_prompt(qwen_vl: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from sdstudio.core.captioning import vision_language

    root = tmp_path / "d"
    root.mkdir()
    for name, color, size in (("a", (255, 0, 0), (40, 30)), ("b", (0, 0, 255), (20, 70)),
                              ("c", (0, 255, 0), (32, 32))):
        Image.new("RGB", size, color).save(root / f"{name}.png")
    (root / "a.txt").write_bytes(b"an old caption\n")
    before = _files(root)
    prompts: list[tuple[int, str]] = []
    original = vision_language.VisionLanguageCaptioner.label

    def spy(self, images):  # what the model is asked, per batch
        prompts.append((len(images), self.chat_text()))
        answers = original(self, images)
        assert len(answers) == len(images)
        return [answer or "x" for answer in answers]  # a random model may say nothing printable

    monkeypatch.setattr(vision_language.VisionLanguageCaptioner, "label", spy)
    args = ["dataset", "caption", str(root), "--captioner", str(qwen_vl), "--prompt",
            "Describe this image in one sentence.", "--batch-size", "2", "--max-new-tokens", "3",
            "--device", "cpu", "--trigger", "sks"]
    assert main(args) == 0  # mode skip: a.png keeps its caption
    assert [n for n, _ in prompts] == [2]
    text = prompts[0][1]
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe this image in one sentence.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert (root / "a.txt").read_bytes() == before["a.txt"]
    for name in ("b", "c"):
        assert (root / f"{name}.txt").read_text(encoding="utf-8").startswith("sks, ")
    assert main([*args, "--mode", "replace"]) == 0
    assert [n for n, _ in prompts] == [2, 2, 1]  # three images in batches of two
    assert (root / "a.txt").read_text(encoding="utf-8").startswith("sks, ")
    assert main(["dataset", "undo", str(root)]) == 0
    assert main(["dataset", "undo", str(root)]) == 0
    assert _files(root) == before


def test_the_inputs_expand_each_image_to_its_patches(qwen_vl: Path) -> None:
    from sdstudio.core.captioning.image_to_text import CaptionerOptions
    from sdstudio.core.captioning.vision_language import VisionLanguageCaptioner, open_captioner

    captioner = open_captioner(qwen_vl, CaptionerOptions(device="cpu", max_new_tokens=2))
    assert isinstance(captioner, VisionLanguageCaptioner) and captioner.prompt.startswith("Describe")
    pictures = [Image.new("RGB", (40, 30)), Image.new("RGB", (20, 70))]
    inputs = captioner.processor(text=[captioner.chat_text()] * 2, images=pictures, padding=True,
                                 return_tensors="pt")
    pads = (inputs["input_ids"] == 151655).sum(dim=1).tolist()
    grids = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    assert pads == grids and all(n > 0 for n in pads)
    assert inputs["attention_mask"][:, -1].all()  # left padding: every row ends where generation starts
