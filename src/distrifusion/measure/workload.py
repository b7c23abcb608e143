"""Random-weight models of published architectures and the inputs of one denoising call at a size,
as each family's text-to-image pipeline makes them: what `bench` and the planner run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .archs import ARCHS, CONFIGS

VIDEO_FRAMES = 17
"""A video's frames when none are given (Wan: 1 + 4k; 17 frames are 5 latent frames)."""


def build_model(arch: str, dtype: torch.dtype, device: torch.device):
    """A random-weight denoiser of a published architecture (or a config JSON path; its
    `_class_name` picks the diffusers class, UNet2DConditionModel by default), initialised on
    `device` itself (an SDXL UNet initialised on the CPU takes a minute)."""
    import diffusers

    if arch not in ARCHS and not arch.endswith(".json"):
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)} or a config .json path")
    path = Path(arch) if arch.endswith(".json") else CONFIGS / ARCHS[arch]
    config = json.loads(path.read_text())
    cls = getattr(diffusers, config.pop("_class_name", "UNet2DConditionModel"))
    torch.manual_seed(0)
    with torch.device(device):
        return cls.from_config(config).to(dtype).eval()


def model_inputs(
    model, height: int, width: int, batch: int | None = None, scale: int | None = None, frames: int | None = None
) -> dict:
    """The keyword arguments of one denoising call at a pixel size (latents are 8x smaller), as the
    model's text-to-image pipeline makes them: a CFG batch of 2 for UNets, SD3 and PixArt; one image
    with distilled guidance for Flux-dev; one image for a pixel-space UNet2DModel (no latents). Text
    lengths are the pipelines' defaults (CLIP 77, SD3 333, PixArt 120, Flux 512). `scale`: pixels per
    latent cell (None: 1 for a UNet2DModel, the VAE's for a video VAE, else 8; a pixel-space transformer
    takes 1). `frames`: a video's frames (None: `VIDEO_FRAMES`), for a video VAE's decode."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLWan,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DModel,
    )

    cfg, p = model.config, next(model.parameters())
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g) if p.device.type != "meta" else torch.empty(shape)  # noqa: E731
    scale = scale or (1 if isinstance(model, UNet2DModel) else 8)
    h, w = height // scale, width // scale
    if isinstance(model, FluxTransformer2DModel):
        batch = batch or 1
        rows, cols = h // 2, w // 2  # the pipeline packs 2x2 latent cells per token
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        inputs = dict(
            hidden_states=rand(batch, rows * cols, cfg.in_channels),
            encoder_hidden_states=rand(batch, 512, cfg.joint_attention_dim),
            pooled_projections=rand(batch, cfg.pooled_projection_dim),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.cat([torch.zeros(rows * cols, 1), grid.float()], 1),
            txt_ids=torch.zeros(512, 3),
        )
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5)
    elif isinstance(model, SD3Transformer2DModel):
        batch = batch or 2
        inputs = dict(
            hidden_states=rand(batch, cfg.in_channels, h, w),
            encoder_hidden_states=rand(batch, 333, cfg.joint_attention_dim),
            pooled_projections=rand(batch, cfg.pooled_projection_dim),
            timestep=torch.full((batch,), 500.0),
        )
    elif isinstance(model, PixArtTransformer2DModel):
        batch = batch or 2
        inputs = dict(
            hidden_states=rand(batch, cfg.in_channels, h, w),
            encoder_hidden_states=rand(batch, 120, cfg.caption_channels),
            timestep=torch.full((batch,), 500.0),
            added_cond_kwargs=dict(
                resolution=torch.tensor([[height, width]] * batch, dtype=torch.float32),
                aspect_ratio=torch.tensor([[height / width]] * batch, dtype=torch.float32),
            ),
        )
    elif isinstance(model, UNet2DModel):  # pixel space (the embedded texture model): one image, a class label
        batch = batch or 1
        inputs = dict(sample=rand(batch, cfg.in_channels, h, w), timestep=torch.tensor(500))
        if cfg.num_class_embeds:
            inputs["class_labels"] = torch.zeros(batch, dtype=torch.long)
    elif isinstance(model, AutoencoderKL):  # a decode of one image
        inputs = dict(z=rand(batch or 1, cfg.latent_channels, h, w))
    elif isinstance(model, AutoencoderKLWan):  # a decode of one video of `frames` (1 + 4k) frames
        frames = frames or VIDEO_FRAMES
        h, w = height // cfg.scale_factor_spatial, width // cfg.scale_factor_spatial
        inputs = dict(z=rand(batch or 1, cfg.z_dim, (frames - 1) // cfg.scale_factor_temporal + 1, h, w))
    else:
        batch = batch or 2
        inputs = dict(
            sample=rand(batch, cfg.in_channels, h, w),
            timestep=torch.tensor(500),
            encoder_hidden_states=rand(batch, 77, cfg.cross_attention_dim),
        )
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {
                "text_embeds": rand(batch, pooled),
                "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch),
            }
    return _to_model(inputs, p)


def _to_model(value, p: torch.Tensor):
    """Floating tensors in the model's dtype, every tensor on its device (ids of positions stay float32
    on CPU-like precision rules: Flux casts them itself)."""
    if isinstance(value, dict):
        return {k: _to_model(v, p) for k, v in value.items()}
    if value.is_floating_point():
        return value.to(p.device, p.dtype)
    return value.to(p.device)
