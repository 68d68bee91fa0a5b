"""What sdstudio ships for Flux split files: the T5 tokenizer (ids from resources/tokenizers/t5-v1_1-xxl, as its
source README gives them) and the published configs (built on the meta device: the published sizes)."""

from __future__ import annotations


def test_t5_tokenizer_gives_the_published_ids() -> None:
    from sdstudio.core.models.flux.offline import t5_tokenizer

    tok = t5_tokenizer()
    assert type(tok).__name__.startswith("T5Tokenizer") and len(tok) == 32100
    assert tok("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    padded = tok(["a cat"], padding="max_length", max_length=8, truncation=True).input_ids[0]
    assert padded[-1] == tok.pad_token_id == 0


def test_shipped_configs_have_the_published_sizes() -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sdstudio.core.models.flux import offline

    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(**offline.T5_CONFIG))
        clip = CLIPTextModel(CLIPTextConfig(**offline.CLIP_L_CONFIG))
        vae = AutoencoderKL(**{k: v for k, v in offline.VAE_CONFIG.items() if not k.startswith("_")})
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(t5) == 4_893_906_944  # t5xxl_fp16.safetensors: 9.79 GB
    assert count(clip) == 123_060_480
    assert count(vae) == 83_819_683  # ae.safetensors
    assert offline.transformer_config("schnell")["guidance_embeds"] is False
