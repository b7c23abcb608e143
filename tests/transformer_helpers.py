"""Tiny random-weight diffusion transformers (Flux.1 and Kontext, SD3.5, PixArt, Flux.2, Qwen-Image and
Qwen-Image-Edit) and a flow-matching loop that calls them as their pipelines do, on the full inputs
(the engine splits them itself)."""

from __future__ import annotations

import torch
from diffusers import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
)

TEXT_LEN, TEXT_DIM, POOLED_DIM = 7, 32, 24
FAMILIES = ["flux", "sd3", "pixart"]
NEW_FAMILIES = ["qwen", "qwen_edit", "flux2", "flux2_ref", "kontext"]
"""Qwen-Image (a text mask with padding), Qwen-Image-Edit, Flux.2, Flux.2 and Flux.1 Kontext with
reference-image tokens (`REF` x `REF` of them, after the image's)."""
REF = 2
TOKENS = {"flux", "kontext", "flux2", "flux2_ref", "qwen", "qwen_edit"}
"""Families whose model takes packed tokens (the others: a latent map)."""
# Rows every strip is a multiple of: Flux is split in token rows (2x2 packing happens in the
# pipeline); SD3 and PixArt in whole patches of 2 latent rows.
BLOCK = {"flux": 1, "sd3": 2, "pixart": 2} | dict.fromkeys(NEW_FAMILIES, 1)


def tiny_transformer(family: str, dtype=torch.float64, seed: int = 0, **overrides):
    """The published block structure at toy width: Flux with double- and single-stream blocks;
    SD3.5 with a dual-attention layer and RMS qk-norm; PixArt with resolution conditions.
    `overrides`: other values of the family's constructor arguments."""
    torch.manual_seed(seed)
    if family == "flux":
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        )
    elif family == "sd3":
        model = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TEXT_DIM,
            caption_projection_dim=16,
            pooled_projection_dim=POOLED_DIM,
            out_channels=4,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
    elif family == "pixart":
        model = PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=12,  # the resolution conditions need a width divisible by 3
            in_channels=4,
            out_channels=8,
            num_layers=2,
            cross_attention_dim=24,
            sample_size=8,
            patch_size=2,
            caption_channels=TEXT_DIM,
            use_additional_conditions=True,
        )
    elif family in ("qwen", "qwen_edit", "flux2", "flux2_ref"):
        width = dict(in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2)
        width["joint_attention_dim"] = TEXT_DIM
        if family.startswith("qwen"):  # 2x2 packing as the model's patch: 4 latent channels, as Flux's
            model = QwenImageTransformer2DModel(patch_size=2, out_channels=4, axes_dims_rope=(4, 6, 6), **width)
        else:  # klein-like (no guidance embedding); a pipeline test turns it on for dev
            width.update(num_single_layers=2, axes_dims_rope=(4,) * 4, guidance_embeds=False)
            model = Flux2Transformer2DModel(**width)
    elif family == "kontext":
        return tiny_transformer("flux", dtype, seed, **overrides)
    else:
        raise ValueError(family)
    if overrides:
        torch.manual_seed(seed)
        model = type(model)(**{**model.config, **overrides})
    model = model.to(dtype).eval()
    with torch.no_grad():  # zero-initialised or constant parameters would hide paths
        for p in model.parameters():
            if p.numel() == 1 or torch.all(p == p.flatten()[0]):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def image_shape(family: str, rows: int, cols: int) -> tuple[int, ...]:
    """The shape of one image's model input for `rows` x `cols` split units."""
    if family in TOKENS:
        return (rows * cols, 16)
    return (4, rows * BLOCK[family], cols * BLOCK[family])


def _grid_ids(rows: int, cols: int, first: float, axes: int, dtype) -> torch.Tensor:
    """(rows * cols, axes) position ids as Flux(2)Pipeline makes them: (first, row, column[, 0])."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.full((rows * cols, 1), first), grid.float(), torch.zeros(rows * cols, axes - 3)], 1)
    return ids.to(dtype)


def call_inputs(
    family: str, batch: int, rows: int, cols: int, seed: int = 1, dtype=torch.float64, device=None, ref: int = REF
) -> dict:
    """Conditioning of one call (everything but the noisy image and the timestep), on `device` (the
    model's: `parallelize` moves it to cuda:N on a GPU; None: the CPU); `ref` x `ref` reference-image
    tokens for the families that take them."""
    inputs = _conditioning(family, batch, rows, cols, seed, dtype, ref)
    return _to(inputs, device) if device is not None else inputs


def device_of(model) -> torch.device:
    """Where the model's weights are: where its inputs must be."""
    return next(model.parameters()).device


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _conditioning(family: str, batch: int, rows: int, cols: int, seed: int, dtype, ref: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g, dtype=dtype)
    # Reference-image tokens (Kontext, Qwen-Image-Edit, Flux.2 with an image): constant conditioning that
    # `call` appends to the image's tokens (and drops from the output), as the pipelines do.
    refs = torch.randn(batch, ref * ref, 16, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    if family in ("flux", "kontext"):
        img_ids = _grid_ids(rows, cols, 0, 3, dtype)
        cond = dict(
            encoder_hidden_states=text,
            pooled_projections=torch.randn(batch, POOLED_DIM, generator=g, dtype=dtype),
            img_ids=img_ids,
            txt_ids=torch.zeros(TEXT_LEN, 3, dtype=dtype),
        )
        if family == "kontext":  # FluxKontextPipeline: the reference's ids have first coordinate 1
            cond.update(img_ids=torch.cat([img_ids, _grid_ids(ref, ref, 1, 3, dtype)]), ref_tokens=refs)
        return cond
    if family in ("flux2", "flux2_ref"):  # Flux2Pipeline: ids (t, h, w, l), text (0, 0, 0, l); references t = 10
        img_ids = _grid_ids(rows, cols, 0, 4, dtype)
        txt_ids = torch.zeros(batch, TEXT_LEN, 4, dtype=dtype)
        txt_ids[..., 3] = torch.arange(TEXT_LEN, dtype=dtype)
        cond = dict(encoder_hidden_states=text, img_ids=img_ids[None].expand(batch, -1, -1), txt_ids=txt_ids)
        if family == "flux2_ref":
            ids = torch.cat([img_ids, _grid_ids(ref, ref, 10, 4, dtype)])
            cond.update(img_ids=ids[None].expand(batch, -1, -1), ref_tokens=refs)
        return cond
    if family in ("qwen", "qwen_edit"):  # QwenImagePipeline; padded prompts of a batch: sample 0 has 4 tokens
        mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        mask[0, 4:] = 0
        shapes = [(1, rows, cols)] + ([(1, ref, ref)] if family == "qwen_edit" else [])
        cond = dict(encoder_hidden_states=text, encoder_hidden_states_mask=mask, img_shapes=[shapes] * batch)
        if family == "qwen_edit":
            cond["ref_tokens"] = refs
        return cond
    if family == "sd3":
        pooled = torch.randn(batch, POOLED_DIM, generator=g, dtype=dtype)
        return dict(encoder_hidden_states=text, pooled_projections=pooled)
    h, w = rows * BLOCK[family] * 8, cols * BLOCK[family] * 8
    conditions = dict(
        resolution=torch.tensor([[h, w]] * batch, dtype=dtype),
        aspect_ratio=torch.tensor([[h / w]] * batch, dtype=dtype),
    )
    return dict(encoder_hidden_states=text, added_cond_kwargs=conditions)


def call(model, family: str, x: torch.Tensor, t: float, cond: dict) -> torch.Tensor:
    """One call on the model's device (inputs made elsewhere are moved there); reference tokens (`ref_tokens`)
    are appended to the image's and their output rows dropped, as the editing pipelines do."""
    device = device_of(model)
    timestep = torch.full((x.shape[0],), t * (1.0 if family in TOKENS else 1000.0), dtype=x.dtype, device=device)
    cond = _to(dict(cond), device)
    x = x.to(device)
    refs = cond.pop("ref_tokens", None)
    if refs is None:
        return model(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]
    out = model(hidden_states=torch.cat([x, refs[: x.shape[0]]], 1), timestep=timestep, return_dict=False, **cond)[0]
    return out[:, : x.shape[1]]


def denoise(
    model,
    family: str,
    rows: int,
    cols: int,
    batch: int = 2,
    steps: int = 5,
    seed: int = 1,
    dtype=torch.float64,
    ref: int = REF,
):
    """Euler flow-matching from noise; with batch 2 the halves are guidance branches (scale 3). Runs on the
    model's device (the noise is drawn on the CPU, so the same on every device); returns the result there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *image_shape(family, rows, cols), generator=g, dtype=dtype).to(device_of(model))
    cond = call_inputs(family, batch, rows, cols, seed, dtype, device_of(model), ref)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = call(model, family, x.expand(batch, *x.shape[1:]), s, cond)
            if family == "pixart":
                v = v[:, :4]  # learned-sigma channels are not part of the velocity
            v = v[:1] + 3.0 * (v[1:] - v[:1]) if batch == 2 else v
            x = x + (s_next - s) * v
    return x


def tiny_flux_pipeline():
    """A FluxPipeline around `tiny_transformer("flux")` and the tiny two-level VAE (2 px per latent cell, so 4 px
    per token), without text encoders: calls pass `prompt_embeds` and `pooled_prompt_embeds` (`flux_prompt`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from pipeline_helpers import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1)  # Flux's VAE shifts its latents
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.to(torch.float64).eval(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_transformer("flux"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_prompt(seed: int = 3) -> dict:
    """A prompt's embeddings as FluxPipeline takes them in place of its text encoders."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g, dtype=torch.float64),
        pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g, dtype=torch.float64),
    )
