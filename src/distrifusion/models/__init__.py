"""One adapter per model family. Adding a model family is adding one module here.

| family | adapter | model classes |
|---|---|---|
| UNets | `unet.UNetAdapter` | UNet2DConditionModel, UNet2DModel |
| Flux.1 | `flux.FluxAdapter` | FluxTransformer2DModel |
| SD3 / SD3.5 | `sd3.SD3Adapter` | SD3Transformer2DModel |
| PixArt-α/Σ | `pixart.PixArtAdapter` | PixArtTransformer2DModel |
| VAEs | `vae.VAEAdapter` | AutoencoderKL (decode and encode; always exact) |
| Wan video VAE | `wan_vae.WanVAEAdapter` | AutoencoderKLWan (Wan 2.1 and 2.2; decode and encode; always exact) |
"""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .vae import VAEAdapter
from .wan_vae import WanVAEAdapter

__all__ = [
    "ADAPTERS",
    "VAE_ADAPTERS",
    "ModelAdapter",
    "VAEAdapter",
    "WanVAEAdapter",
    "find_denoiser",
    "find_vae",
    "supported_names",
]

VAE_ADAPTERS: tuple[ModelAdapter, ...] = (VAEAdapter(), WanVAEAdapter())
"""The VAEs whose decode and encode are split in strips (always exactly): a pipeline's `.vae` among
them is split with its denoiser (`ParallelConfig.split_vae`); any other runs whole on every rank."""
ADAPTERS: tuple[ModelAdapter, ...] = (UNetAdapter(), FluxAdapter(), SD3Adapter(), PixArtAdapter(), *VAE_ADAPTERS)
DENOISER_ATTRS = ("unet", "transformer")
"""Where a pipeline keeps its denoising model."""


def supported_names() -> str:
    return ", ".join(cls.__name__ for adapter in ADAPTERS for cls in adapter.models)


def find_vae(vae: nn.Module) -> ModelAdapter | None:
    """The adapter that splits this VAE, or None for a VAE that none splits (it runs whole)."""
    return next((adapter for adapter in VAE_ADAPTERS if isinstance(vae, adapter.models)), None)


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
