"""Random-weight models of published architectures and the inputs of one denoising call at a size,
as each family's text-to-image pipeline makes them: what `bench` and the planner run; and a tokenizer
written in memory, for random-weight text pipelines (the tests' tiny ones, benchmarks' full-size ones)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .archs import ARCHS, CONFIGS


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


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def byte_tokenizer(max_length: int):
    """A CLIP tokenizer with no merges: every byte is a token (word-final bytes get `</w>`), texts padded
    or cut to `max_length` tokens. Written from a minimal byte-level vocabulary: no download."""
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(tokens)}, f)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=max_length)


def model_inputs(
    model, height: int, width: int, batch: int | None = None, scale: int | None = None, frames: int | None = None
) -> dict:
    """The keyword arguments of one denoising call at a pixel size (latents are 8x smaller), as the
    model's text-to-image pipeline makes them: a CFG batch of 2 for UNets, SD3 and PixArt; one image
    with distilled guidance for Flux-dev; one image for a pixel-space UNet2DModel (no latents); one image
    for Flux.2 (dev: distilled guidance; klein: none, its CFG is a second call) and Qwen-Image (true CFG
    is a second call with the negative prompt). Text lengths are the pipelines' defaults (CLIP 77, SD3
    333, PixArt 120, Flux and Flux.2 512; for Qwen-Image 512 is its pipeline's limit: it trims the text
    to the prompt's length, so real prompts are shorter). `scale`: pixels per latent cell (None: 1 for a
    UNet2DModel, else 8; a pixel-space transformer takes 1).

    Wan (a video): one video per call (the pipelines call the model once per guidance branch), `frames`
    pixel frames (default 81) in 1 + (frames - 1) // 4 latent frames; 512 text tokens; Wan 2.1 I2V's 257
    CLIP image tokens; Wan 2.2 TI2V (48 latent channels: its VAE's 16x16 pixels per latent cell unless
    `scale` says otherwise) with its per-token timestep."""
    from diffusers import (
        AutoencoderKL,
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        QwenImageTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DModel,
        WanTransformer3DModel,
    )

    cfg, p = model.config, next(model.parameters())
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g) if p.device.type != "meta" else torch.empty(shape)  # noqa: E731
    if isinstance(model, WanTransformer3DModel):
        return _to_model(_wan_inputs(model, height, width, batch or 1, scale, frames or 81, rand), p)
    scale = scale or (1 if isinstance(model, UNet2DModel) else 8)
    h, w = height // scale, width // scale
    rows, cols = h // 2, w // 2  # Flux, Flux.2, Qwen-Image: the pipeline packs 2x2 latent cells per token
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    if isinstance(model, (FluxTransformer2DModel, Flux2Transformer2DModel)):
        batch = batch or 1
        flux2 = isinstance(model, Flux2Transformer2DModel)  # ids (t, h, w, l) and no pooled text
        axes = 4 if flux2 else 3
        inputs = dict(
            hidden_states=rand(batch, rows * cols, cfg.in_channels),
            encoder_hidden_states=rand(batch, 512, cfg.joint_attention_dim),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.cat([torch.zeros(rows * cols, 1), grid.float(), torch.zeros(rows * cols, axes - 3)], 1),
            txt_ids=torch.zeros(512, axes),
        )
        if not flux2:
            inputs["pooled_projections"] = rand(batch, cfg.pooled_projection_dim)
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5)
    elif isinstance(model, QwenImageTransformer2DModel):  # true CFG: one call per branch, batch 1 each
        batch = batch or 1
        inputs = dict(
            hidden_states=rand(batch, rows * cols, cfg.in_channels),
            encoder_hidden_states=rand(batch, 512, cfg.joint_attention_dim),
            timestep=torch.full((batch,), 0.5),
            img_shapes=[[(1, rows, cols)]] * batch,
        )
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


def _wan_inputs(model, height: int, width: int, batch: int, scale: int | None, frames: int, rand) -> dict:
    cfg = model.config
    ti2v = cfg.in_channels == 48  # Wan 2.2 TI2V: the Wan 2.2 VAE's 48 channels, 16x16 pixels per cell
    scale = scale or (16 if ti2v else 8)
    shape = (1 + (frames - 1) // 4, height // scale, width // scale)
    inputs = dict(
        hidden_states=rand(batch, cfg.in_channels, *shape),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=rand(batch, 512, cfg.text_dim),
    )
    if ti2v:  # one timestep per token, as its pipelines pass it (expand_timesteps)
        p_t, p_h, p_w = cfg.patch_size
        inputs["timestep"] = torch.full((batch, shape[0] // p_t * (shape[1] // p_h) * (shape[2] // p_w)), 500.0)
    if cfg.image_dim is not None:  # Wan 2.1 I2V: 257 CLIP image tokens
        inputs["encoder_hidden_states_image"] = rand(batch, 257, cfg.image_dim)
    return inputs


def _to_model(value, p: torch.Tensor):
    """Floating tensors in the model's dtype, every tensor on its device (ids of positions stay float32
    on CPU-like precision rules: Flux casts them itself)."""
    if isinstance(value, dict):
        return {k: _to_model(v, p) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):  # Qwen-Image's img_shapes: grid sizes, not tensors
        return value
    if value.is_floating_point():
        return value.to(p.device, p.dtype)
    return value.to(p.device)
