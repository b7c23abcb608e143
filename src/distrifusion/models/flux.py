"""Flux.1 (`FluxTransformer2DModel`): packed image tokens in strips of token rows, joint attention
with the text ([text, image]) in double- and single-stream blocks, RoPE positions from `img_ids`.
Flux.1 Kontext's reference-image tokens (after the image's, `img_ids` first coordinate 1) are context
like the text (`Partition.extra`)."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from torch import nn

from ..engine.layers import PatchJointAttnProcessor
from ..engine.state import ParallelState, Partition
from .base import (
    PackedTokensAdapter,
    check_kwargs_dict,
    check_packed,
    check_processor,
    install_processor,
    shard_text,
    slice_batch,
    slice_tokens,
    strip_rows,
    strip_tokens,
)


class FluxAdapter(PackedTokensAdapter):
    models = (FluxTransformer2DModel,)
    conditioning_args = ("encoder_hidden_states", "pooled_projections", "txt_ids")  # true CFG: a negative-prompt call
    family = "Flux"
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, FluxAttention):
                # Fused QKV projections (`fuse_qkv_projections`) keep to_q/to_k/to_v, which the engine uses.
                check_processor(name, module, (FluxAttnProcessor,))

    def install(self, model: nn.Module, state: ParallelState) -> None:
        for name, module in model.named_modules():
            if isinstance(module, FluxAttention):
                # Single-stream blocks have no text projections of their own: text arrives concatenated.
                single = module.added_kv_proj_dim is None
                make = partial(PatchJointAttnProcessor, module, name, state, text_first=True, text_in_hidden=single)
                install_processor(module, state, make)

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        tokens, ids = inputs["hidden_states"], inputs.get("img_ids")
        check_packed(self.family, tokens)
        if ids is None or inputs.get("txt_ids") is None:
            raise ValueError(f"distrifusion: {self.family} needs img_ids and txt_ids (the tokens' positions)")
        rows, cols = token_grid(ids[0] if ids.dim() == 3 else ids, tokens.shape[1], self.family)
        return tokens.shape[0], rows, cols

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        check_kwargs_dict(self.family, inputs, "joint_attention_kwargs")
        batched = self.batched + ("controlnet_block_samples", "controlnet_single_block_samples")
        local = {k: slice_batch(v, partition) if k in batched else v for k, v in inputs.items()}
        local["hidden_states"] = strip_tokens(local["hidden_states"], partition)
        ids = local["img_ids"]
        local["img_ids"] = strip_tokens(ids, partition, dim=ids.dim() - 2)
        start, end = (r * partition.width for r in strip_rows(partition))
        for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
            local[name] = slice_tokens(local.get(name), start, end)
        return shard_text(local, partition, "encoder_hidden_states", "txt_ids")


def token_grid(ids: torch.Tensor, tokens: int, family: str = "Flux") -> tuple[int, int]:
    """(rows, columns) of the image tokens, from their (tokens, k) position ids (first coordinate, row,
    column, ...): the leading tokens that share the first token's first coordinate, which must form one
    row-major grid, as FluxPipeline and Flux2Pipeline build them. Tokens after them (another first
    coordinate: Kontext's and Flux.2's reference images) are reference tokens.

    On the meta device (shape-only runs) the values are unknown: all tokens are taken to be the
    image's, a square grid.
    """
    if ids.shape[0] != tokens:
        raise ValueError(f"distrifusion: {ids.shape[0]} img_ids for {tokens} image tokens")
    if ids.device.type == "meta":
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"distrifusion: on the meta device {family} image tokens must form a square grid")
        return side, side
    ids = ids.detach().to("cpu", torch.float64)
    other = (ids[:, 0] != ids[0, 0]).nonzero()
    image = int(other[0]) if len(other) else tokens  # the image's tokens, then reference tokens
    cols = int((ids[:image, 1] == ids[0, 1]).sum())
    rows = image // cols
    grid_rows = ids[0, 1] + torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    grid_cols = ids[0, 2] + torch.arange(cols, dtype=torch.float64).repeat(rows)
    if rows * cols != image or not (torch.equal(ids[:image, 1], grid_rows) and torch.equal(ids[:image, 2], grid_cols)):
        raise ValueError(
            f"distrifusion: {family} img_ids are not one row-major grid of image tokens (as the pipeline makes them), "
            "followed by reference-image tokens with another first coordinate; such tokens cannot be split into strips"
        )
    return rows, cols
