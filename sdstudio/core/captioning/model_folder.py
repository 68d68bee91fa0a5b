"""Where a transformers model comes from (a local folder, or a hub name looked up in the local cache only) and
which device it runs on; shared by the captioners and the CLIPSeg masks."""

from __future__ import annotations

from pathlib import Path

from sdstudio.core.errors import UserError


def model_source(folder: Path | str, what: str) -> str:
    """A local model folder (absolute) or a hub name for the local cache; a clear error otherwise."""
    path = Path(folder).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{what} folder {path} has no config.json: point at a transformers model folder "
                            "(config.json, the weights, the processor and tokenizer files).")
        return str(path.absolute())
    text = str(folder)
    if "/" in text and not path.exists() and not text.startswith((".", "/", "~")):
        return text  # a hub name: the local cache only
    raise UserError(f"{what} folder {folder} does not exist.")


def pick_device(wanted: str | None) -> str:
    """``wanted``, else the GPU when there is one (CUDA, then Apple's MPS), else the CPU."""
    import torch

    if wanted:
        return wanted
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"
