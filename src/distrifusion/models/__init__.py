"""One adapter per model family. Adding a model family is adding one module here (what it provides
and the tests it adds: docs/ARCHITECTURE.md, "To add a model family").

| family | adapter | model classes |
|---|---|---|
| UNets | `unet.UNetAdapter` | UNet2DConditionModel, UNet2DModel |
| Flux.1 | `flux.FluxAdapter` | FluxTransformer2DModel |
| SD3 / SD3.5 | `sd3.SD3Adapter` | SD3Transformer2DModel |
| PixArt-α/Σ | `pixart.PixArtAdapter` | PixArtTransformer2DModel |
| Wan 2.1 / 2.2 | `wan.WanAdapter` | WanTransformer3DModel (video: strips of rows or of frames) |
| Flux.2 | `flux2.Flux2Adapter` | Flux2Transformer2DModel |
| Qwen-Image | `qwenimage.QwenImageAdapter` | QwenImageTransformer2DModel |
| VAEs | `vae.VAEAdapter` | AutoencoderKL (decode and encode; always exact) |
"""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .pixart import PixArtAdapter
from .qwenimage import QwenImageAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .vae import VAEAdapter
from .wan import WanAdapter

__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "VAEAdapter",
    "denoiser_modules",
    "find_denoiser",
    "find_denoisers",
    "supported_names",
]

ADAPTERS: tuple[ModelAdapter, ...] = (
    UNetAdapter(),
    FluxAdapter(),
    SD3Adapter(),
    PixArtAdapter(),
    Flux2Adapter(),
    QwenImageAdapter(),
    WanAdapter(),
    VAEAdapter(),
)
DENOISER_ATTRS = ("unet", "transformer", "transformer_2")
"""Where a pipeline keeps its denoising models (Wan 2.2 A14B: a second expert, `transformer_2`, for the
low-noise steps)."""


def supported_names() -> str:
    return ", ".join(cls.__name__ for adapter in ADAPTERS for cls in adapter.models)


def find_denoiser(pipe_or_model) -> tuple[nn.Module, ModelAdapter]:
    """The denoising model of a pipeline (its `.unet` or `.transformer`) or a bare model, and its
    adapter; a TypeError naming the supported classes for anything else."""
    return find_denoisers(pipe_or_model)[0]


def find_denoisers(pipe_or_model) -> list[tuple[nn.Module, ModelAdapter]]:
    """Every denoising model of a pipeline (`.unet`, `.transformer`, `.transformer_2`: each once) or the
    bare model, each with its adapter; a TypeError naming the supported classes for anything else."""
    return [(model, _adapter(pipe_or_model, model)) for model in denoiser_modules(pipe_or_model)]


def denoiser_modules(pipe_or_model) -> list[nn.Module]:
    """A pipeline's denoising models (`.unet`, `.transformer`, `.transformer_2`: each once, in this order),
    or `[pipe_or_model]` itself when it has none."""
    found = [getattr(pipe_or_model, a, None) for a in DENOISER_ATTRS]
    found = [m for m in found if isinstance(m, nn.Module)]
    return list({id(m): m for m in found}.values()) or [pipe_or_model]


def _adapter(pipe_or_model, model: nn.Module) -> ModelAdapter:
    for adapter in ADAPTERS:
        if isinstance(model, adapter.models):
            return adapter
        why = next(
            (why for cls in type(model).__mro__ for name, why in adapter.refused.items() if cls.__name__ == name), None
        )
        if why:
            raise TypeError(f"distrifusion does not support {type(model).__name__}: {why}")
    inside = f" with a {type(model).__name__}" if model is not pipe_or_model else ""
    raise TypeError(
        f"distrifusion supports {supported_names()} and pipelines whose .unet, .transformer or .transformer_2 is one "
        f"of them; got {type(pipe_or_model).__name__}{inside}"
    )
