"""LoRA / LyCORIS files: reading any trainer's file into weight deltas (files.py, names.py), and the tools
that merge, resize and extract them (ops.py, svd.py)."""
