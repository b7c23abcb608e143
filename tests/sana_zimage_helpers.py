"""Tiny random-weight SANA and Z-Image transformers and flow-matching loops that call them as their
pipelines do (on the full inputs: the engine splits them itself).

SANA: sin-cos positions on (`interpolation_scale`, as the 2K/4K models) at a size other than its
`sample_size` (so they are interpolated from the input's own height), the linear attention and the
Mix-FFN's 3x3 depthwise conv, a text mask with padding. Z-Image: captions of 7 and 37 tokens in one CFG
batch (padded to 32 and 64: the image positions differ between the two samples and the joint sequence
needs a key mask), 5 x 3 image tokens (15, padded to 32 with the learned pad token).
"""

from __future__ import annotations

import torch
from diffusers import SanaTransformer2DModel, ZImageTransformer2DModel
from pipeline_helpers import _perturb_constants

ROWS, COLS = 5, 3
"""Split units (SANA: latent rows, patch 1; Z-Image: token rows of 2 latent rows): 3+2, 2+2+1, 2+1+1+1."""
SANA_TEXT, SANA_TEXT_DIM = 7, 24
ZIMAGE_CAPTIONS, ZIMAGE_CAP_DIM = (7, 37), 16


def _perturb(model: torch.nn.Module, dtype) -> torch.nn.Module:
    """Zero-initialised or constant parameters (pad tokens, norms) perturbed: they would hide paths."""
    return _perturb_constants(model.to(dtype).eval())


def tiny_sana(dtype=torch.float64, seed: int = 0, **overrides) -> SanaTransformer2DModel:
    """The published block structure (linear self-attention, text cross-attention, GLUMBConv Mix-FFN)
    at toy width; positions on, made for 8 x 8 latents (so a 5 x 3 input interpolates them)."""
    torch.manual_seed(seed)
    config = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=SANA_TEXT_DIM,
        sample_size=8,
        patch_size=1,
        interpolation_scale=2.0,
    )
    return _perturb(SanaTransformer2DModel(**{**config, **overrides}), dtype)


def tiny_zimage(dtype=torch.float64, seed: int = 0, **overrides) -> ZImageTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=ZIMAGE_CAP_DIM,
        axes_dims=[4, 6, 6],
        axes_lens=[128, 32, 32],
    )
    return _perturb(ZImageTransformer2DModel(**{**config, **overrides}), dtype)


def sana_inputs(batch: int, seed: int = 1, dtype=torch.float64) -> dict:
    """SANA's conditioning: text features and a mask whose last tokens are padding (one fewer per sample)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, SANA_TEXT, dtype=torch.long)
    for i in range(batch):
        mask[i, SANA_TEXT - 1 - i :] = 0
    return dict(
        encoder_hidden_states=torch.randn(batch, SANA_TEXT, SANA_TEXT_DIM, generator=g, dtype=dtype),
        encoder_attention_mask=mask,
    )


def zimage_captions(batch: int, seed: int = 1, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ZIMAGE_CAPTIONS[i % 2], ZIMAGE_CAP_DIM, generator=g, dtype=dtype) for i in range(batch)]


def call_sana(model, x: torch.Tensor, sigma: float, cond: dict) -> torch.Tensor:
    timestep = torch.full((x.shape[0],), sigma * 1000.0, dtype=x.dtype)
    return model(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]


def call_zimage(model, x: torch.Tensor, sigma: float, captions: list[torch.Tensor]) -> torch.Tensor:
    """As ZImagePipeline calls it: lists in and out, t = 1 - sigma; the pipeline negates the output."""
    t = torch.full((x.shape[0],), 1.0 - sigma, dtype=x.dtype)
    out = model(list(x.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def denoise(model, family: str, batch: int = 2, steps: int = 5, seed: int = 1, dtype=torch.float64, rows=ROWS):
    """Euler flow matching from noise; with batch 2 the halves are guidance branches (scale 3)."""
    g = torch.Generator().manual_seed(seed)
    scale = 1 if family == "sana" else 2
    x = torch.randn(1, 4, rows * scale, COLS * scale, generator=g, dtype=dtype)
    cond = sana_inputs(batch, seed, dtype) if family == "sana" else zimage_captions(batch, seed, dtype)
    call = call_sana if family == "sana" else call_zimage
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = call(model, x.expand(batch, *x.shape[1:]), s, cond)
            v = v[:1] + 3.0 * (v[1:] - v[:1]) if batch == 2 else v
            x = x + (s_next - s) * v
    return x
