"""Exports: LoRA files (kohya, diffusers), single-file checkpoints (LDM layout), diffusers folders."""
