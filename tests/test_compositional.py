"""The compositional test (core/metrics/compositional.py) and the from-scratch model's caption options
(core/models/pixel/text.py): the classifiers are exact on clean images, the evaluation scores known-good and
known-bad image sets as it must, a tiny run goes through train -> sample -> score, and each option changes the
model the way its description says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.metrics import compositional as comp
from sdstudio.core.models.pixel.model import build_pixel_model
from sdstudio.core.models.pixel.text import encode_tokens, is_bidirectional, pooled_caption
from tests.conftest import TINY_OVERRIDES

CAPTIONS = [comp.caption_for(*c) for c in comp.all_combos()]


# -- the test set and its classifiers ---------------------------------------------------------------------
def test_held_out_combinations_are_composable_from_the_training_set(tmp_path: Path) -> None:
    held = set(comp.HELD_OUT)
    seen = comp.seen_combos()
    assert len(seen) + len(held) == len(comp.all_combos()) == 24 and not held & set(seen)
    for colour, shape, background in held:  # every pair of a held-out triple is in training
        assert any(c == colour and s == shape for c, s, _ in seen)
        assert any(c == colour and b == background for c, _, b in seen)
        assert any(s == shape and b == background for _, s, b in seen)
    count = comp.write_dataset(tmp_path, per_combo=2, size=16)
    captions = sorted(p.read_text().strip() for p in tmp_path.glob("*.txt"))
    assert count == len(captions) == 2 * len(seen) == len(list(tmp_path.glob("*.png")))
    assert {comp.parse_caption(c) for c in captions} == set(seen)
    assert comp.parse_caption("a red circle on black") == ("red", "circle", "black")
    assert comp.parse_caption("a red circle") is None


@pytest.mark.parametrize("size", [16, 32])
def test_classifiers_are_exact_on_clean_generated_images(size: int) -> None:
    images, labels = comp.make_images(comp.all_combos(), 8, size, seed=11)
    scores = comp.score(list(images), labels)
    assert all(scores[k] >= 0.98 for k in (*comp.ATTRIBUTES, "all")), scores


def test_evaluation_scores_known_good_and_known_bad_samplers() -> None:
    def drawn(transform):
        def sample(prompts: list[str], seeds: list[int]) -> np.ndarray:
            out = []
            for prompt in prompts:
                combo = transform(comp.parse_caption(prompt))
                out += [comp.draw(combo, 16, np.random.default_rng(seed)) for seed in seeds]
            return np.stack(out)
        return sample

    good = comp.evaluate(drawn(lambda c: c), samples_per_combo=2)
    assert good.seen == good.held_out == {"colour": 1.0, "shape": 1.0, "background": 1.0, "all": 1.0}

    def other(options, value):
        names = list(options)
        return names[(names.index(value) + 1) % len(names)]

    # ignores the background word: always the other background
    bad_bg = comp.evaluate(drawn(lambda c: (c[0], c[1], other(comp.BACKGROUNDS, c[2]))), samples_per_combo=2)
    for group in (bad_bg.seen, bad_bg.held_out):
        assert group["colour"] == group["shape"] == 1.0 and group["background"] == group["all"] == 0.0
    # only "memorised" the seen combinations: held-out captions get a seen combination's wrong shape
    seen = set(comp.seen_combos())
    memorised = comp.evaluate(drawn(lambda c: c if c in seen else (c[0], other(comp.SHAPES, c[1]), c[2])),
                              samples_per_combo=2)
    assert memorised.seen["all"] == 1.0 and memorised.held_out["shape"] == memorised.held_out["all"] == 0.0
    assert "held-out" in memorised.table() and memorised.as_dict()["held_out_combos"][0] == "a red circle on black"

    blank = comp.evaluate(lambda p, s: np.full((len(p) * len(s), 16, 16, 3), 255, np.uint8), samples_per_combo=1)
    white = sum(b == "white" for _, _, b in comp.seen_combos()) / len(comp.seen_combos())
    assert blank.seen["colour"] == blank.seen["shape"] == blank.seen["all"] == 0.0
    assert blank.seen["background"] == white


def test_tiny_run_trains_samples_and_scores(tmp_path: Path) -> None:
    from sdstudio.core.sampling.from_run import load_trained
    from sdstudio.core.train.loop import train

    data = tmp_path / "data"
    comp.write_dataset(data, per_combo=1, size=16)
    cfg = RunConfig().with_overrides({**TINY_OVERRIDES, "data.path": str(data), "data.val_split": 0.0,
                                      "model.text_causal": False, "model.text_pooled_to_time": True,
                                      "model.cross_attention_everywhere": True, "sample.every_epochs": 0,
                                      "train.max_steps": 2})
    events = list(train(cfg, run_dir=tmp_path / "run"))
    assert isinstance(events[-1], ev.Finished), events[-1]
    loaded = load_trained(tmp_path / "run", device="cpu")
    assert loaded.config.model.text_causal is False and is_bidirectional(loaded.bundle.trainable.text_encoder)
    report = comp.evaluate(lambda p, s: loaded.generate(p, s, steps=1), samples_per_combo=1)
    for group in (report.seen, report.held_out):
        assert set(group) == {*comp.ATTRIBUTES, "all"} and all(0.0 <= v <= 1.0 for v in group.values())
        assert group["all"] <= min(group[a] for a in comp.ATTRIBUTES)


# -- the caption options ----------------------------------------------------------------------------------
def _model(**options):
    cfg = RunConfig().with_overrides({**TINY_OVERRIDES, **{f"model.{k}": v for k, v in options.items()}})
    return build_pixel_model(cfg, CAPTIONS)


def _tokens(bundle, captions):
    return bundle.encode_captions(captions, torch.device("cpu"))


@pytest.mark.parametrize("causal", [True, False])
def test_text_causal_decides_whether_early_words_see_later_ones(causal: bool) -> None:
    bundle = _model(text_causal=causal)
    te = bundle.trainable.text_encoder
    assert is_bidirectional(te) is (not causal)
    with torch.no_grad():
        a, b = (_tokens(bundle, [c]) for c in ("a red circle on white", "a red circle on black"))
        sa = encode_tokens(te, a["input_ids"], a["attention_mask"])
        sb = encode_tokens(te, b["input_ids"], b["attention_mask"])
        # <bos> a red circle on | white/black: positions 0-4 are the same words, position 5 differs
        early = (sa[0, :5] - sb[0, :5]).abs().max().item()
        assert (early > 1e-4) is (not causal), early
        assert (sa[0, 5] - sb[0, 5]).abs().max().item() > 1e-4
        # padding never leaks into the real tokens: other ids at the padded positions leave them unchanged
        ids, mask = a["input_ids"], a["attention_mask"]
        assert mask[0, :7].all() and not mask[0, 7:].any()  # <bos> + 5 words + <eos>, then padding
        other = encode_tokens(te, torch.where(mask.bool(), ids, torch.full_like(ids, 5)), mask)
        assert torch.allclose(other[0, :7], sa[0, :7], atol=1e-5)
    # the causal encoder is CLIP's own forward, unchanged
    if causal:
        with torch.no_grad():
            assert torch.equal(sa, te(input_ids=a["input_ids"], attention_mask=a["attention_mask"])[0])


def test_pooled_caption_is_added_to_the_timestep_embedding() -> None:
    plain, pooled = _model(), _model(text_pooled_to_time=True)
    assert plain.trainable.unet.class_embedding is None
    emb = pooled.trainable.unet.class_embedding
    assert emb is not None and emb.linear_1.in_features == TINY_OVERRIDES["model.text_width"]
    assert pooled.architecture["unet"]["class_embed_type"] == "projection"
    cond = _tokens(pooled, ["a red circle on white", "a red circle on black"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([500, 500])
    with torch.no_grad():
        out = pooled.trainable(x, t, cond)
        torch.nn.init.zeros_(emb.linear_2.weight)
        torch.nn.init.zeros_(emb.linear_2.bias)
        assert not torch.allclose(out, pooled.trainable(x, t, cond))  # the pooled path contributes
    states = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(pooled_caption(states, mask)[0], states[0, :2].mean(0))


def test_cross_attention_everywhere_reaches_the_levels_without_attention() -> None:
    plain, everywhere = _model(), _model(cross_attention_everywhere=True)
    down0 = everywhere.trainable.unet.down_blocks[0]
    assert not hasattr(plain.trainable.unet.down_blocks[0], "attentions")
    block = down0.attentions[0].transformer_blocks[0]
    assert block.only_cross_attention and block.attn1.is_cross_attention  # no self-attention at that level
    top = everywhere.trainable.unet.up_blocks[-1].attentions[0].transformer_blocks[0]
    assert top.only_cross_attention
    deep = everywhere.trainable.unet.down_blocks[1].attentions[0].transformer_blocks[0]
    assert not deep.only_cross_attention  # attention_levels' own levels keep self-attention
    # the caption changes the highest-resolution level's output
    seen = []
    down0.register_forward_hook(lambda mod, inp, out: seen.append(out[0].detach()))
    cond = _tokens(everywhere, ["a red circle on white", "a blue square on black"])
    with torch.no_grad():
        everywhere.trainable(torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1), torch.tensor([500, 500]), cond)
    assert (seen[0][0] - seen[0][1]).abs().max().item() > 1e-5


def test_caption_options_are_saved_with_the_run_config(tmp_path: Path) -> None:
    from sdstudio.core.presets import config_to_toml, load_config_file

    cfg = RunConfig().with_overrides({"model.text_causal": False, "model.text_pooled_to_time": True,
                                      "model.cross_attention_everywhere": True})
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(cfg), encoding="utf-8")
    back = load_config_file(path).model
    assert (back.text_causal, back.text_pooled_to_time, back.cross_attention_everywhere) == (False, True, True)
    default = RunConfig().model  # today's model unless asked: old runs load unchanged
    assert (default.text_causal, default.text_pooled_to_time, default.cross_attention_everywhere) == (True, False,
                                                                                                      False)


def test_text_layers_zero_passes_each_word_to_the_unet_as_itself(tmp_path: Path) -> None:
    """model.text_layers = 0: word + position embeddings (and the final norm) only, so a word's state does not
    depend on the other words."""
    bundle = _model(text_layers=0, text_causal=False)
    te = bundle.trainable.text_encoder
    assert len(getattr(te, "text_model", te).encoder.layers) == 0  # transformers 4 nests one deeper
    with torch.no_grad():
        a, b = (_tokens(bundle, [c]) for c in ("a red circle on white", "a blue circle on black"))
        sa = encode_tokens(te, a["input_ids"], a["attention_mask"])
        sb = encode_tokens(te, b["input_ids"], b["attention_mask"])
    # <bos> a red|blue circle on white|black: "circle" (position 3) and "on" (4) are the same states
    assert torch.equal(sa[0, 3:5], sb[0, 3:5])
    assert (sa[0, 2] - sb[0, 2]).abs().max().item() > 1e-4
    with_layers = _model(text_layers=1, text_causal=False)
    with torch.no_grad():
        la, lb = (encode_tokens(with_layers.trainable.text_encoder, t["input_ids"], t["attention_mask"])
                  for t in (_tokens(with_layers, [c]) for c in ("a red circle on white", "a blue circle on black")))
    assert (la[0, 3] - lb[0, 3]).abs().max().item() > 1e-4  # one layer mixes the words
