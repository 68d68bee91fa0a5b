"""Stable Diffusion 3 / 3.5 (medium, large): LoRAs by flow matching (family.py)."""
