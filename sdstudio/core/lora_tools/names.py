"""Module names in LoRA files: kohya's ``lora_unet_<path with _>`` (SDXL in the original LDM block layout),
``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders, and diffusers' ``unet.<path>`` /
``text_encoder.<path>``; from a model's module path to every name a file may use for it."""

from __future__ import annotations

from ..errors import UserError
from ..models.registry import get_family


def ldm_module_name(module: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> original (LDM) block path, for SDXL's kohya names.

    Each level holds ``layers_per_block`` resnet/attention pairs plus a down-sampler, so diffusers'
    ``down_blocks.i.{resnets,attentions}.j`` is ``input_blocks.(n*i + j + 1).{0,1}`` with n = layers + 1;
    the up path has one pair more per level. Names inside a transformer block are the same in both.
    """
    n = layers_per_block + 1
    parts = module.split(".")
    head = parts[0]
    if head == "down_blocks" and parts[2] in ("resnets", "attentions"):
        i, j = int(parts[1]), int(parts[3])
        return ".".join(["input_blocks", str(n * i + j + 1), "0" if parts[2] == "resnets" else "1", *parts[4:]])
    if head == "up_blocks" and parts[2] in ("resnets", "attentions"):
        i, j = int(parts[1]), int(parts[3])
        return ".".join(["output_blocks", str(n * i + j), "0" if parts[2] == "resnets" else "1", *parts[4:]])
    if head == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    if head == "mid_block" and parts[1] == "resnets":
        return ".".join(["middle_block", str(2 * int(parts[2])), *parts[3:]])
    raise UserError(f"kohya export: no original-layout name for the SDXL module {module!r}")



def text_module_path(module: str) -> str:
    """A CLIP module path with the ``text_model.`` level real LoRA files have (transformers 5 dropped it)."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def file_names(family: str, component: str, module: str, layers_per_block: int = 2) -> list[str]:
    """Every name a LoRA file may give ``component``'s (unet / text_encoder / text_encoder_2) module ``module``:
    the kohya one(s) first, then the diffusers one."""
    fam = get_family(family)
    if component == "unet":
        names = ["lora_unet_" + module.replace(".", "_")]
        if fam.kohya_unet_ldm_names:
            try:
                names.insert(0, "lora_unet_" + ldm_module_name(module, layers_per_block).replace(".", "_"))
            except UserError:
                pass
        return [*names, f"unet.{module}"]
    path = text_module_path(module)
    prefix = fam.kohya_text_prefixes.get(component, "lora_te")
    return [f"{prefix}_" + path.replace(".", "_"), f"{component}.{path}", f"{component}.{module}"]
