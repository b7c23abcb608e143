"""One adapter per model family. Adding a model family is adding one module here.

| family | adapter | model classes |
|---|---|---|
| UNets | `unet.UNetAdapter` | UNet2DConditionModel, UNet2DModel |
| Flux.1 | `flux.FluxAdapter` | FluxTransformer2DModel |
| SD3 / SD3.5 | `sd3.SD3Adapter` | SD3Transformer2DModel |
| PixArt-α/Σ | `pixart.PixArtAdapter` | PixArtTransformer2DModel |
| SANA | `sana.SanaAdapter` | SanaTransformer2DModel |
| Z-Image | `zimage.ZImageAdapter` | ZImageTransformer2DModel |
| VAEs | `vae.VAEAdapter` | AutoencoderKL (decode and encode; always exact) |
"""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .vae import VAEAdapter
from .zimage import ZImageAdapter

__all__ = ["ADAPTERS", "ModelAdapter", "VAEAdapter", "find_denoiser", "supported_names"]

ADAPTERS: tuple[ModelAdapter, ...] = (
    UNetAdapter(),
    FluxAdapter(),
    SD3Adapter(),
    PixArtAdapter(),
    SanaAdapter(),
    ZImageAdapter(),
    VAEAdapter(),
)
DENOISER_ATTRS = ("unet", "transformer")
"""Where a pipeline keeps its denoising model."""


def supported_names() -> str:
    return ", ".join(cls.__name__ for adapter in ADAPTERS for cls in adapter.models)


def find_denoiser(pipe_or_model) -> tuple[nn.Module, ModelAdapter]:
    """The denoising model of a pipeline (its `.unet` or `.transformer`) or a bare model, and its
    adapter; a TypeError naming the supported classes for anything else."""
    model = pipe_or_model
    for attr in DENOISER_ATTRS:
        if isinstance(getattr(pipe_or_model, attr, None), nn.Module):
            model = getattr(pipe_or_model, attr)
            break
    for adapter in ADAPTERS:
        if isinstance(model, adapter.models):
            return model, adapter
    inside = f" with a {type(model).__name__}" if model is not pipe_or_model else ""
    raise TypeError(
        f"distrifusion supports {supported_names()} and pipelines whose .unet or .transformer is one of them; "
        f"got {type(pipe_or_model).__name__}{inside}"
    )
