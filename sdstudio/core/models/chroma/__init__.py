"""Chroma (lodestones' Chroma1-HD / Chroma1-Base): a pruned, de-distilled Flux.1-schnell, trained as a LoRA
(docs/models.md, "Chroma")."""
