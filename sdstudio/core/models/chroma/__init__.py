"""Chroma (lodestones ' Chroma1-HD / Chroma1-Base): a pruned, de-distilled Flux.1-schnell, trained here as a LoRA."""
