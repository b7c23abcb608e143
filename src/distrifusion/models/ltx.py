"""LTX-Video 0.9 (`LTXVideoTransformer3DModel`): packed video tokens in strips of whole latent rows across all
frames, or of whole latent frames (`ParallelConfig.video_split`); self-attention over every strip's tokens,
the rotary positions of the whole video cut to the strip, cross-attention to the text local, the
image-to-video pipeline's per-token timestep cut with the strip.

Facts read in diffusers' `transformer_ltx.py` and `pipelines/ltx` (identical in 0.41.0 and 0.42.1):
- input (batch, tokens, channels): the pipelines pack the latent (batch, channels, frames, height, width)
  into tokens ordered (frame, row, column) with `patch_size`/`patch_size_t` (1 in every released model);
  the output is packed alike;
- `LTXVideoRotaryPosEmbed` builds (cos, sin) tables (batch, tokens, inner_dim) from the `num_frames`,
  `height` and `width` arguments (the latent's sizes, one position per latent cell: patch 1 only), scaled by
  `rope_interpolation_scale`, or from per-token `video_coords` (LTXConditionPipeline: conditioning tokens
  appended to the video's);
- `attn1` (self) normalises q and k across all heads (RMSNorm of heads x head_dim) and rotates them with
  LTX's own `apply_rotary_emb` (through float32); `attn2` (cross) attends to the projected text with the
  prompt's mask, per query token;
- a timestep of shape (batch, tokens) is one per token (LTXImageToVideoPipeline: 0 on the conditioning
  frame), its scale/shift and the output's per token; everything else (norms, feed-forward) is per token.
The pipelines call the model once per step with the CFG batch [negative, prompt]: it splits in halves.

LTX-2 (`LTX2VideoTransformer3DModel`, also in 0.41.0 and 0.42.1) is refused: its audio stream and the
video attend to each other in every block (audio-to-video and video-to-audio cross-attention, positions
from per-token coordinates), which strips of the video alone do not split.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import (
    LTXAttention,
    LTXVideoAttnProcessor,
    LTXVideoTransformerBlock,
)
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rotate
from torch import nn

from ..engine.layers import PatchTokenAttnProcessor
from ..engine.state import ParallelState, Partition
from .base import check_kwargs_dict, check_processor, install_forward, install_processor, refuse_inputs, slice_batch
from .video import VIDEO_AXES, VideoAdapter, check_frame_count, check_video_convs, cut_tokens

FAMILY = "LTX-Video"


class LTXVideoAdapter(VideoAdapter):
    models = (LTXVideoTransformer3DModel,)
    refused = {
        "LTX2VideoTransformer3DModel": (
            "LTX-2's audio stream and its video attend to each other in every block (audio-to-video and "
            "video-to-audio cross-attention, positions from per-token coordinates), which strips of the video "
            "alone do not split; LTX-Video 0.9 (LTXVideoTransformer3DModel) is supported"
        )
    }
    conditioning_args = ("encoder_hidden_states",)

    def __init__(self, split: str = "rows", patch: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__(split, patch)
        # Packed tokens: a run of frames is one run of tokens; a band of rows is one run per frame, gathered
        # along the tokens of each frame (`split_output`).
        self.output_dim = 2 if split == "rows" else 1

    @staticmethod
    def model_patch(model: nn.Module) -> tuple[int, int, int]:
        return 1, 1, 1  # `check` refuses any other: the rotary table has one position per latent cell

    def check_pipeline_call(self, pipe, arguments: dict) -> None:
        """The pipelines round a frame count that is not 1 + 8k down without a word: a parallel run refuses
        it, naming the nearest (their own check refuses sizes that are not multiples of 32 px)."""
        check_frame_count(pipe, arguments, f"an {FAMILY} video")

    def check(self, model: nn.Module) -> None:
        cfg = model.config
        if (cfg.patch_size, cfg.patch_size_t) != (1, 1):
            raise TypeError(
                f"distrifusion: {FAMILY} with patch_size {cfg.patch_size} and patch_size_t {cfg.patch_size_t} is not "
                "supported: diffusers builds its rotary table with one position per latent cell, so only patch 1 "
                "(every released LTX-Video) runs"
            )
        for name, module in model.named_modules():
            if isinstance(module, LTXAttention):
                check_processor(name, module, (LTXVideoAttnProcessor,))
        check_video_convs(model)

    def install(self, model: nn.Module, state: ParallelState) -> None:
        install_forward(model.rope, LTXStripRoPE, "rope", state)
        for name, module in model.named_modules():
            if isinstance(module, LTXVideoTransformerBlock):  # attn2 (cross-attention to the text) stays local
                make = partial(PatchTokenAttnProcessor, module.attn1, f"{name}.attn1", state, project=ltx_qkv)
                install_processor(module.attn1, state, partial(make, finish=ltx_out))

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        tokens = inputs["hidden_states"]
        if tokens.dim() != 3:
            raise ValueError(
                f"distrifusion: {FAMILY} expects packed tokens (batch, tokens, channels), got {tuple(tokens.shape)}"
            )
        check_kwargs_dict(FAMILY, inputs, "attention_kwargs")  # here: before the ranks' first collective
        refuse_inputs(
            FAMILY,
            inputs,
            ("video_coords",),
            "positions given per token (LTXConditionPipeline: conditioning tokens beside the video's) do not form "
            "one video to cut in strips; use LTXPipeline or LTXImageToVideoPipeline",
        )
        sizes = [inputs.get(name) for name in ("num_frames", "height", "width")]
        if not all(isinstance(n, int) and n > 0 for n in sizes):
            raise ValueError(
                f"distrifusion: {FAMILY} needs num_frames, height and width (the latent video's sizes, as its "
                f"pipelines pass them), got {sizes}"
            )
        if math.prod(sizes) != tokens.shape[1]:
            raise ValueError(
                f"distrifusion: {FAMILY} got {tokens.shape[1]} tokens for a latent video of {sizes[0]} x {sizes[1]} x "
                f"{sizes[2]} (num_frames x height x width); pass the latent's sizes"
            )
        self.check_token_timestep(inputs.get("timestep"), tokens.shape[1])
        return self.video_grid(tokens.shape[0], *sizes)

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        local = {k: slice_batch(v, partition) for k, v in inputs.items()}
        # num_frames/height/width stay the whole video's: the rotary tables are made for it, then cut.
        grid = [inputs[name] for name in ("num_frames", "height", "width")]
        local["hidden_states"] = self.cut_strip(local["hidden_states"], 1, grid, partition)
        local["timestep"] = self.local_timestep(local.get("timestep"), grid, partition)
        return local

    def split_output(self, local: torch.Tensor, partition: Partition) -> torch.Tensor:
        if self.split != "rows":
            return local
        return local.unflatten(1, (-1, partition.rows[partition.patch_rank] * partition.width))  # per frame

    def join_output(self, full: torch.Tensor, partition: Partition) -> torch.Tensor:
        return full.flatten(1, 2) if self.split == "rows" else full


class LTXStripRoPE:
    """LTX-Video's rotary tables (`LTXVideoRotaryPosEmbed`: (batch, tokens, inner_dim) each) for one strip:
    made from the whole video's sizes (the model's arguments, left whole), then cut to the strip's tokens."""

    def __init__(self, rope: nn.Module, name: str, state: ParallelState) -> None:
        self.rope, self.name, self.state = rope, name, state

    def __call__(self, hidden_states, num_frames=None, height=None, width=None, *args, **kwargs):
        state, rope = self.state, self.rope
        tables = type(rope).forward(rope, hidden_states, num_frames, height, width, *args, **kwargs)
        if not state.split:
            return tables
        axis, partition = VIDEO_AXES[state.config.video_split].grid_axis, state.partition
        start, length = partition.row_start, partition.rows[partition.patch_rank]
        return tuple(cut_tokens(t, 1, (num_frames, height, width), axis, start, length) for t in tables)


def ltx_qkv(attn: nn.Module, hidden_states: torch.Tensor, rotary_emb=None):
    """Queries, keys and values (batch, tokens, heads, head_dim) of LTX-Video's self-attention, as
    `LTXVideoAttnProcessor` computes them: projected, normalised across heads, rotated."""
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    if rotary_emb is not None:
        query, key = ltx_rotate(query, rotary_emb), ltx_rotate(key, rotary_emb)
    return tuple(x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))


def ltx_out(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](out))
