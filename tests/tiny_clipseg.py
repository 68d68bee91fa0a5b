"""A tiny random-weight CLIPSeg model folder (save_pretrained, with the bundled CLIP tokenizer) for tests: the
real file layout a local CIDAS/clipseg-rd64-refined copy has, small enough for the CPU."""

from __future__ import annotations

from pathlib import Path


def build_clipseg(out: Path) -> Path:
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    from sdstudio.core import paths

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(paths.resources_dir() / "tokenizers" / "clip")
    config = CLIPSegConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16, reduce_dim=16, extract_layers=[0, 1], decoder_num_attention_heads=2,
        decoder_intermediate_size=32)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(config).save_pretrained(out)
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
