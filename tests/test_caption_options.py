"""Caption options experienced kohya / OneTrainer users bring: tag dropout with the first N tags kept, several
captions per image (one a line, one picked per epoch), a prefix / suffix / per-folder trigger word, clip skip,
and captions longer than CLIP's 77 tokens (cut into windows of 75 and concatenated). Each changes what the
model is conditioned on as intended (captions, token ids, embeddings compared) and stays exact on resume."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdstudio.core.config import RunConfig
from sdstudio.core.data.captions import decorate_caption, folder_trigger, process_caption
from sdstudio.core.data.dataset import ImageCaptionDataset, SampleKey
from sdstudio.core.data.scan import ImageRecord, scan_dataset
from sdstudio.core.errors import ConfigError

TAGS = "sks, 1girl, red hair, smile, outdoors, sky, tree, hat, dress, flower"


def record(path: Path, captions: tuple[str, ...], concept: str = "", source: str = "sidecar") -> ImageRecord:
    if not path.exists():
        Image.new("RGB", (16, 16), "red").save(path)
    return ImageRecord(path, captions, 1, concept, 16, 16, source)


def dataset(records, **data) -> ImageCaptionDataset:
    cfg = RunConfig().with_overrides({"data.caption_dropout": 0.0, **{f"data.{k}": v for k, v in data.items()}})
    return ImageCaptionDataset(records, cfg, train=True)


# -- tag dropout and keep_tokens -----------------------------------------------------------------------------
def test_tag_dropout_drops_tags_but_never_the_kept_ones() -> None:
    outs = [process_caption(TAGS, random.Random(s), shuffle_tags=False, keep_tokens=2, dropout=0.0,
                            tag_dropout=0.5) for s in range(200)]
    tags = [o.split(", ") for o in outs]
    assert all(t[:2] == ["sks", "1girl"] for t in tags), "the first keep_tokens tags stay, in place"
    counts = [len(t) - 2 for t in tags]
    assert 3.0 < sum(counts) / len(counts) < 5.0, "about half of the 8 other tags survive"
    assert all(set(t) <= set(TAGS.split(", ")) for t in tags)
    # without shuffling the survivors keep their order
    order = TAGS.split(", ")
    assert all([order.index(x) for x in t] == sorted(order.index(x) for x in t) for t in tags)
    assert process_caption(TAGS, random.Random(0), shuffle_tags=False, keep_tokens=2, dropout=0.0,
                           tag_dropout=0.0) == TAGS


def test_shuffle_keeps_the_first_tags_in_place() -> None:
    outs = {process_caption(TAGS, random.Random(s), shuffle_tags=True, keep_tokens=3, dropout=0.0)
            for s in range(50)}
    assert len(outs) > 10
    for o in outs:
        t = o.split(", ")
        assert t[:3] == ["sks", "1girl", "red hair"] and sorted(t) == sorted(TAGS.split(", "))


def test_tag_dropout_applies_in_the_dataset_per_step(tmp_path: Path) -> None:
    ds = dataset([record(tmp_path / "a.png", (TAGS,))], tag_dropout=0.5, keep_tokens=1)
    caps = {ds.caption(0, random.Random(k), 0) for k in range(30)}
    assert len(caps) > 5 and all(c.startswith("sks") for c in caps)
    assert ds.caption(0, None) == TAGS, "validation and previews see the caption as written"


# -- several captions per image ------------------------------------------------------------------------------
def test_one_caption_line_is_picked_per_epoch_and_the_pick_is_reproducible(tmp_path: Path) -> None:
    lines = tuple(f"caption number {i}" for i in range(6))
    ds = dataset([record(tmp_path / "a.png", lines)])
    for epoch in range(4):
        picks = {ds[SampleKey(0, epoch, pos)]["caption"] for pos in range(5)}
        assert len(picks) == 1, "every repeat within an epoch trains on the same line"
    per_epoch = [ds[SampleKey(0, e, 0)]["caption"] for e in range(12)]
    assert len(set(per_epoch)) >= 3, "other epochs pick other lines"
    again = dataset([record(tmp_path / "a.png", lines)])  # a resumed run builds a new dataset
    assert [again[SampleKey(0, e, 3)]["caption"] for e in range(12)] == per_epoch


def test_caption_lines_come_from_the_caption_file(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("first caption\n\nsecond caption\n", encoding="utf-8")
    scan = scan_dataset(tmp_path)
    assert scan.records[0].captions == ("first caption", "second caption")


# -- prefix, suffix, folder trigger word -------------------------------------------------------------------
def test_prefix_suffix_and_folder_trigger(tmp_path: Path) -> None:
    assert folder_trigger("10_sks dog") == "sks dog" and folder_trigger("dogs") == ""
    assert decorate_caption("a dog", prefix="ohwx", suffix="best quality", folder_tag="sks dog") == \
        "sks dog, ohwx, a dog, best quality"
    recs = [record(tmp_path / "a.png", ("a dog on grass",), concept="10_sks dog"),
            record(tmp_path / "b.png", ("sks dog",), concept="10_sks dog", source="folder")]
    ds = dataset(recs, caption_prefix="photo", caption_suffix="high quality", folder_trigger=True,
                 shuffle_tags=True, keep_tokens=2)
    assert ds.caption(0, None) == "sks dog, photo, a dog on grass, high quality"
    assert ds.caption(1, None) == "sks dog, photo, high quality", "a folder-name caption is not doubled"
    for k in range(10):
        assert ds.caption(0, random.Random(k), 0).startswith("sks dog, photo, "), "keep_tokens holds the trigger"
    plain = dataset(recs)
    assert plain.caption(0, None) == "a dog on grass"
    reg = ImageCaptionDataset(recs, ds.config, train=True, decorate=False)
    assert reg.caption(0, None) == "a dog on grass", "DreamBooth class images get no trigger word"


# -- token ids and embeddings of the SD families -----------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from tests.tiny_models import tiny_tokenizer

    return tiny_tokenizer("l")


def long_caption(n_words: int, seed: int = 0) -> str:
    words = ["red", "blue", "cat", "dog", "tree", "sky", "hat", "sun", "car", "house"]
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n_words))


def test_long_captions_are_cut_into_framed_windows(tok) -> None:
    from sdstudio.core.models.sd.model import _tokenize

    caps = [long_caption(200), "a cat"]
    short = _tokenize(tok, caps, 75)
    assert short.shape == (2, 77)
    assert torch.equal(short, tok(caps, padding="max_length", truncation=True, max_length=77,
                                  return_tensors="pt").input_ids), "75 = exactly the single-window tokenisation"
    ids = _tokenize(tok, caps, 225)
    assert ids.shape == (2, 3 * 77)
    windows = ids.reshape(2, 3, 77)
    assert torch.equal(windows[:, :, 0], torch.full((2, 3), tok.bos_token_id))
    assert torch.equal(windows[0, 0], short[0]), "the first window is the caption's first 75 tokens"
    full = tok(caps[0]).input_ids[1:-1]
    assert len(full) > 150
    assert windows[0, :, 1:76].reshape(-1)[:len(full[:225])].tolist() == full[:225], "no token lost or repeated"
    assert windows[0, 2, 76] == tok.eos_token_id or tok.eos_token_id in windows[0, 2].tolist()
    assert torch.equal(windows[1, 1], windows[1, 2]) and windows[1, 1, 1] == tok.eos_token_id, \
        "an empty window is BOS EOS padding"
    assert _tokenize(tok, caps, 150).shape == (2, 2 * 77)


@pytest.fixture(scope="module")
def sd1_model(tmp_path_factory):
    from tests.tiny_models import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("cap-sd1") / "model")


def sd1_bundle(model: Path, data: Path, **overrides):
    from sdstudio.core.models.sd.model import build_sd_model
    from tests.sd_helpers import sd_config

    return build_sd_model(sd_config("sd15-lora", model, data, **overrides), torch.device("cpu"))


def test_clip_skip_reads_an_earlier_layer_through_the_final_norm(sd1_model: Path, tmp_path: Path) -> None:
    caps = ["a red circle", "a blue square"]
    one = sd1_bundle(sd1_model, tmp_path)
    two = sd1_bundle(sd1_model, tmp_path, **{"model.clip_skip": 2})
    s1 = one.text_features(caps, torch.device("cpu"))["states"]
    s2 = two.text_features(caps, torch.device("cpu"))["states"]
    te = two.components.text_encoder
    with torch.no_grad():
        ids = two.token_ids(caps, torch.device("cpu"))["input_ids"]
        out = te(ids, output_hidden_states=True)
        expected = te.text_model.final_layer_norm(out.hidden_states[-2]) if hasattr(te, "text_model") \
            else te.final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(s2, expected) and torch.allclose(s1, out[0])
    assert not torch.allclose(s1, s2), "clip skip changes the conditioning"
    assert one.text_encoder_identity() != two.text_encoder_identity(), "cached embeddings are keyed by it"


def test_words_after_75_tokens_reach_the_conditioning_only_with_long_captions(sd1_model: Path,
                                                                               tmp_path: Path) -> None:
    base = long_caption(120, seed=1)
    words = base.split()
    changed = " ".join(words[:100] + ["house" if w != "house" else "car" for w in words[100:]])
    cpu = torch.device("cpu")
    short = sd1_bundle(sd1_model, tmp_path)
    a, b = (short.text_features([c], cpu)["states"] for c in (base, changed))
    assert a.shape[1] == 77 and torch.equal(a, b), "one window: the tail is cut off"
    long = sd1_bundle(sd1_model, tmp_path, **{"data.max_token_length": 225})
    a2, b2 = (long.text_features([c], cpu)["states"] for c in (base, changed))
    assert a2.shape[1] == 227, "BOS + 3 x 75 + last token, as kohya concatenates"
    assert not torch.equal(a2, b2), "the tail changes the conditioning"
    assert torch.allclose(a2[:, :76], a[:, :76], atol=1e-5), "the first window is encoded as before"
    assert short.text_encoder_identity() != long.text_encoder_identity()


def test_long_captions_through_a_trained_text_encoder_match_the_frozen_path(sd1_model: Path, tmp_path: Path) -> None:
    """With the text encoder training, ids go into the denoiser; its conditioning equals text_features'."""
    b = sd1_bundle(sd1_model, tmp_path, **{"data.max_token_length": 150, "model.clip_skip": 2,
                                             "lora.text_encoder": True})
    caps = [long_caption(100, seed=3)]
    cpu = torch.device("cpu")
    cond = b.encode_batch({"captions": caps}, cpu)
    assert cond["input_ids"].shape == (1, 154)
    with torch.no_grad():
        inside = b.trainable.encode_tokens(cond)["encoder_hidden_states"]
    assert torch.allclose(inside, b.text_features(caps, cpu)["states"], atol=1e-6)


def test_sdxl_long_captions_pool_the_first_window(tmp_path_factory, tmp_path: Path) -> None:
    from sdstudio.core.models.sd.model import build_sd_model
    from tests.sd_helpers import sd_config
    from tests.tiny_models import save_tiny_sdxl

    model = save_tiny_sdxl(tmp_path_factory.mktemp("cap-sdxl") / "model")
    cpu = torch.device("cpu")
    caps = [long_caption(120, seed=2)]
    short = build_sd_model(sd_config("sdxl-lora", model, tmp_path), cpu).text_features(caps, cpu)
    long = build_sd_model(sd_config("sdxl-lora", model, tmp_path, **{"data.max_token_length": 150}),
                          cpu).text_features(caps, cpu)
    assert long["states"].shape[1] == 152 and short["states"].shape[1] == 77
    assert torch.allclose(long["pooled"], short["pooled"], atol=1e-5)


def test_the_keys_are_validated_against_the_family() -> None:
    with pytest.raises(ConfigError, match="model.clip_skip"):
        RunConfig().with_overrides({"model.family": "sdxl", "model.clip_skip": 2})
    with pytest.raises(ConfigError, match="data.max_token_length"):
        RunConfig().with_overrides({"data.max_token_length": 150})  # the pixel family
    with pytest.raises(ConfigError, match="data.max_token_length"):
        RunConfig().with_overrides({"model.family": "sd1", "data.max_token_length": 100})
    for key, bad in (("data.tag_dropout", 1.5), ("model.clip_skip", 0)):
        with pytest.raises(ConfigError, match=key):
            RunConfig().with_overrides({key: bad})
    ok = RunConfig().with_overrides({"model.family": "sd1", "model.clip_skip": 2, "data.max_token_length": 225})
    assert RunConfig.from_dict(ok.to_dict()).model.clip_skip == 2, "saved in the run's config"


# -- resume -----------------------------------------------------------------------------------------------
def test_resume_is_exact_with_the_caption_options(tiny_config, tmp_path: Path) -> None:
    from sdstudio.core import events as ev
    from sdstudio.core.control import TrainingControl
    from sdstudio.core.runs import read_metrics
    from sdstudio.core.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    for i, src in enumerate(sorted(Path(tiny_config.data.path).glob("*.png"))[:8]):
        Image.open(src).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"red, circle, on white, shape {i}\nblue, square, small\n", encoding="utf-8")
    cfg = tiny_config.with_overrides({"data.path": str(data), "data.val_split": 0.0, "data.tag_dropout": 0.3,
                                      "data.shuffle_tags": True, "data.keep_tokens": 1, "data.caption_prefix": "sks",
                                      "train.max_steps": 6, "checkpoint.every_steps": 0})
    straight = [e.loss for e in train(cfg, run_dir=tmp_path / "a") if isinstance(e, ev.StepMetrics)]
    control = TrainingControl()
    for e in train(cfg, control, run_dir=tmp_path / "b"):
        if isinstance(e, ev.StepMetrics) and e.step == 3:
            control.request_stop()
    list(train(cfg, run_dir=tmp_path / "b", resume=True))
    resumed = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert resumed == straight and len(straight) == 6
