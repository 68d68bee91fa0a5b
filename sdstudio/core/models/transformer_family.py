"""What the flow-matching transformer families (Flux.1 dev / schnell, SD3 / SD3.5, Chroma) share as
``ModelFamily`` objects: the facts of a 16-channel latent flow-matching transformer, recognising a model file or
diffusers folder (cached by path, modification time and size), building a run's bundle (block swap placement
and the refusal of another family's model), the refusals they all make of a config, sampling from files and
the diffusers pipeline around a bundle. A family sets its facts and names its own functions ("module:function",
imported when first used, as ``export_writers`` does); the small hooks (``_matches``, ``config_problems`` via
``super()``) cover what differs."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .family import ModelFamily, ModelFileError

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig
    from ..sampling.from_files import LoadedBaseModel
    from .bundle import ModelBundle


def _function(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=48)
def _file_kind(reader: str, path: str, mtime_ns: int, size: int) -> Any:
    """What ``reader`` says of a model file or folder; read again only when the file changed."""
    return _function(reader)(Path(path))


def wrong_family(path: Any, found: ModelFamily, family: str) -> ModelFileError:
    """The refusal of a model of another family than the config's model.family."""
    return ModelFileError(f"model.path {path}: a {found.title} model, but model.family = {family!r}; "
                          f"set model.family = {found.name!r}")


class TransformerFamily(ModelFamily):
    """A flow-matching transformer family on a 16-channel VAE's latents (the facts and hooks Flux, SD3 and Chroma
    share). A subclass names its functions:

    - ``file_reader``: ``(path) -> what the file is`` (a variant name, True; None / False: not this family),
      which ``_matches`` turns into "this family" (default: any true answer);
    - ``model_builder``: ``(config, device, *, denoiser_device) -> bundle`` (``build`` places it for block swap);
    - ``sampling_loader``: ``(family, path, device, *, lora, config_folder, files) -> LoadedBaseModel``;
    - ``pipeline_class`` (a diffusers class name) and ``pipeline_components``: the bundle components it takes,
      keyword = component name."""

    space = "latent"
    latent_downscale = 8
    objective = "flow_matching"
    default_prediction_type = "flow"
    default_lora_targets = "attention_ff"
    activation_bytes_per_pixel = 1.2e6  # not measured on a GPU yet: an upper guess (Flux's transformer, bf16)

    file_reader: ClassVar[str]
    model_builder: ClassVar[str]
    sampling_loader: ClassVar[str]
    pipeline_class: ClassVar[str]
    pipeline_components: ClassVar[tuple[str, ...]]
    # how the config refusals name the family ("" = short_title)
    config_name: ClassVar[str] = ""
    # True: the text encoder trains through a LoRA (lora.text_encoder) but never in full; False: the transformer
    # trains alone (both refused)
    text_encoder_lora: ClassVar[bool] = False
    # True: a model.path that another family recognises is refused before anything is loaded (where this family's
    # loader would only say the file is not its own)
    refuses_other_families_first: ClassVar[bool] = False

    def _matches(self, found: Any) -> bool:
        """Is ``file_reader``'s answer a model of this family?"""
        return bool(found)

    def recognise(self, path: Path) -> bool:
        if path.is_dir():
            if not (path / "transformer" / "config.json").is_file():
                return False
        elif path.suffix.lower() != ".safetensors":
            return False
        stat = path.stat()
        return self._matches(_file_kind(self.file_reader, str(path), stat.st_mtime_ns, stat.st_size))

    def build(self, config: RunConfig, captions: list[str], *, tokenizer_file: Path | None = None,
              device: torch.device | None = None) -> ModelBundle:
        import torch

        from ..train.blockswap import build_placed

        if self.refuses_other_families_first:
            path = Path(config.model.path).expanduser()
            if path.exists() and not self.recognise(path):
                from .registry import recognise_model

                other = recognise_model(path)
                if other is not None:
                    raise wrong_family(path, other, self.name)
        builder = _function(self.model_builder)
        device = device or torch.device("cpu")  # with block swap the transformer stays in CPU memory until it is set up
        bundle = build_placed(config, device, lambda at: builder(config, device, denoiser_device=at))
        if bundle.family != self.name:  # Flux: a dev file under model.family = 'flux-schnell' (or the reverse)
            raise wrong_family(config.model.path, bundle.model_family, self.name)
        return bundle

    def config_problems(self, config: RunConfig) -> list[str]:
        problems: list[str] = []
        if config.model.family != self.name:
            return problems
        name = self.config_name or self.short_title
        if self.text_encoder_lora:
            if config.train.train_text_encoder:
                problems.append(f"train.train_text_encoder: {name} trains CLIP-L through a LoRA only "
                                "(lora.text_encoder); turn it off")
        elif config.lora.text_encoder or config.train.train_text_encoder:
            problems.append(f"lora.text_encoder / train.train_text_encoder: {name} trains the transformer only for "
                            "now; turn them off")
        if config.lora.enabled and config.lora.type == "dora" and "diffusers" in config.export.formats:
            problems.append(f"export.formats: diffusers loads no DoRA adapter for {name}; use 'kohya' (LyCORIS keys, "
                            "which ComfyUI and Forge load)")
        return problems

    def load_for_sampling(self, path: Path, device: torch.device, *, lora: Path | None = None,
                          config_folder: Path | None = None, prediction_type: str = "auto",
                          files: Mapping[str, Path] | None = None) -> LoadedBaseModel:
        return _function(self.sampling_loader)(self, path, device, lora=lora, config_folder=config_folder,
                                               files=files or {})

    def pipeline(self, bundle: Any) -> Any:
        """The family's diffusers pipeline around the bundle's modules (shared, not copied)."""
        import diffusers

        c = bundle.components
        return getattr(diffusers, self.pipeline_class)(
            scheduler=self.flow_scheduler(), **{name: getattr(c, name) for name in self.pipeline_components})

    def flow_scheduler(self) -> Any:
        from ..config import FlowConfig
        from ..flow import FlowSchedule

        assert self.flow is not None
        return FlowSchedule(FlowConfig(), self.flow).sampler()
