"""Flux.1 (`FluxTransformer2DModel`): packed image tokens in strips of token rows, joint attention
with the text ([text, image]) in double- and single-stream blocks, RoPE positions from `img_ids`."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from torch import nn

from ..engine.layers import PatchJointAttnProcessor
from ..engine.state import ParallelState, Partition
from .base import (
    ModelAdapter,
    check_kwargs_dict,
    check_processor,
    install_processor,
    shard_text,
    slice_batch,
    slice_tokens,
    strip_rows,
)


class FluxAdapter(ModelAdapter):
    models = (FluxTransformer2DModel,)
    conditioning_args = ("encoder_hidden_states", "pooled_projections", "txt_ids")  # true CFG: a negative-prompt call
    sample_arg = "hidden_states"
    output_dim = 1
    row_unit = "token rows"
    joint_text = True
    default_size = (1024, 1024)  # FluxPipeline: default_sample_size 128 latent cells of 8 px; no sample_size

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, FluxAttention):
                # Fused QKV projections (`fuse_qkv_projections`) keep to_q/to_k/to_v, which the engine uses.
                check_processor(name, module, (FluxAttnProcessor,))

    def block_rows(self, model: nn.Module) -> int:
        return 1  # the pipeline packs 2x2 latent cells per token: strips are cut in whole token rows

    def install(self, model: nn.Module, state: ParallelState) -> None:
        for name, module in model.named_modules():
            if isinstance(module, FluxAttention):
                # Single-stream blocks have no text projections of their own: text arrives concatenated.
                single = module.added_kv_proj_dim is None
                make = partial(PatchJointAttnProcessor, module, name, state, text_first=True, text_in_hidden=single)
                install_processor(module, state, make)

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        tokens, ids = inputs["hidden_states"], inputs.get("img_ids")
        if tokens.dim() != 3:
            raise ValueError(
                f"distrifusion: Flux expects packed tokens (batch, tokens, channels), got {tuple(tokens.shape)}"
            )
        if ids is None or inputs.get("txt_ids") is None:
            raise ValueError("distrifusion: Flux needs img_ids and txt_ids (the tokens' positions)")
        rows, cols = token_grid(ids[0] if ids.dim() == 3 else ids, tokens.shape[1])
        return tokens.shape[0], rows, cols

    def text_tokens(self, inputs: dict) -> int:
        return inputs["encoder_hidden_states"].shape[1]

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        check_kwargs_dict("Flux", inputs, "joint_attention_kwargs")
        batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
        batched += ("controlnet_block_samples", "controlnet_single_block_samples")
        local = {k: slice_batch(v, partition) if k in batched else v for k, v in inputs.items()}
        start, end = (r * partition.width for r in strip_rows(partition))
        for name in ("hidden_states", "controlnet_block_samples", "controlnet_single_block_samples"):
            local[name] = slice_tokens(local.get(name), start, end)
        ids = local["img_ids"]
        local["img_ids"] = slice_tokens(ids, start, end, dim=ids.dim() - 2)
        return shard_text(local, partition, "encoder_hidden_states", "txt_ids")


def token_grid(ids: torch.Tensor, tokens: int) -> tuple[int, int]:
    """(rows, columns) of the image tokens, from their (tokens, 3) position ids (0, row, column).

    The ids must form one row-major grid, as FluxPipeline builds them. On the meta device (shape-
    only runs) the values are unknown and the grid is taken to be square.
    """
    if ids.shape[0] != tokens:
        raise ValueError(f"distrifusion: {ids.shape[0]} img_ids for {tokens} image tokens")
    if ids.device.type == "meta":
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError("distrifusion: on the meta device Flux image tokens must form a square grid")
        return side, side
    ids = ids.detach().to("cpu", torch.float64)
    cols = int((ids[:, 1] == ids[0, 1]).sum())
    rows = tokens // cols
    grid_rows = ids[0, 1] + torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    grid_cols = ids[0, 2] + torch.arange(cols, dtype=torch.float64).repeat(rows)
    if rows * cols != tokens or not (torch.equal(ids[:, 1], grid_rows) and torch.equal(ids[:, 2], grid_cols)):
        raise ValueError(
            "distrifusion: Flux img_ids are not one row-major grid of image tokens (as FluxPipeline makes them); "
            "extra image tokens (e.g. reference images) cannot be split into strips"
        )
    return rows, cols
