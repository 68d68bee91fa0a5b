"""Sampling outside and inside runs: the reverse-diffusion sampler and grids (`sampler.py`), a trained run or
checkpoint loaded for sampling (`from_run.py`), and model files that are not runs (`from_files.py`)."""
