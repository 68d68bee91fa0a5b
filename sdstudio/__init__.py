"""sdstudio: train diffusion models on your own computer (desktop app + headless CLI)."""

__version__ = "0.1.0"
