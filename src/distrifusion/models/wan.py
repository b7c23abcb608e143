"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): a video in strips of whole token rows across all frames, or
of whole latent frames (`ParallelConfig.video_split`); self-attention over every strip's tokens, the
3D rotary positions of the whole video, cross-attention to the text (and Wan 2.1 I2V's image tokens)
local, Wan 2.2 TI2V's per-token timestep cut with the strip.

Facts read in diffusers' `transformer_wan.py` (identical in 0.41.0 and 0.42.1):
- input (batch, channels, frames, height, width); patches of `patch_size` (1, 2, 2) by a Conv3d with
  kernel = stride (no halo); tokens ordered (frame, row, column);
- `WanRotaryPosEmbed` builds the (cos, sin) tables, (1, tokens, 1, head_dim), from its input's shape,
  from position 0 on every axis: a strip alone would get the first frames' or rows' positions;
- `attn1` (self) normalises q and k across all heads (RMSNorm of heads x head_dim), then rotates them
  with its own interleaved-pair rotation; `attn2` (cross) attends to the text and, when the model has
  `add_k_proj` (2.1 I2V), to the image tokens in front of it, split at `shape[1] - 512` (the text must be
  its 512 padded tokens: the pipelines always give that many); both are per query token;
- a timestep of shape (batch, tokens) is one per token (Wan 2.2 TI2V), a scale/shift per token;
- everything else (norms, modulation, feed-forward, output projection) is per token.
Wan 2.2 A14B's two experts are two such models (`transformer`, `transformer_2`): `parallelize` splits
each with its own state, so each keeps its own stale context and its first call is synchronous.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from torch import nn

from ..engine.config import ParallelConfig
from ..engine.layers import PatchTokenAttnProcessor
from ..engine.state import ParallelState, Partition
from .base import ModelAdapter, check_kwargs_dict, check_processor, install_forward, install_processor, slice_batch


@dataclasses.dataclass(frozen=True)
class _Axis:
    dim: int
    unit: str
    name: str


_AXES = {
    "rows": _Axis(3, "latent rows", "video height"),
    "frames": _Axis(2, "latent frames", "video length"),
}


class WanAdapter(ModelAdapter):
    models = (WanTransformer3DModel,)
    # Guidance branches: Wan pipelines call the model once with the prompt and once with the negative one.
    conditioning_args = ("encoder_hidden_states", "encoder_hidden_states_image")
    sample_arg = "hidden_states"

    def __init__(self, split: str = "rows", patch: tuple[int, int, int] = (1, 2, 2)) -> None:
        axis = _AXES[split]
        self.split, self.dim, self.patch = split, axis.dim, tuple(patch)
        """The dimension of the (batch, channels, frames, height, width) input that strips cut; the model's patch."""
        self.output_dim, self.row_unit, self.split_axis = axis.dim, axis.unit, axis.name

    def configured(self, model: nn.Module, config: ParallelConfig) -> WanAdapter:
        return WanAdapter(config.video_split, tuple(model.config.patch_size))

    def check_pipeline_call(self, pipe, arguments: dict) -> None:
        """The Wan pipelines round a frame count that is not 1 + 4k (the VAE's time compression) with a
        warning; a parallel run refuses it instead, on every rank, naming the nearest counts."""
        frames, factor = arguments.get("num_frames"), getattr(pipe, "vae_scale_factor_temporal", None)
        if isinstance(frames, int) and isinstance(factor, int) and factor > 1 and (frames < 1 or (frames - 1) % factor):
            below = max(1, (frames - 1) // factor * factor + 1)
            raise ValueError(
                f"distrifusion: num_frames={frames}: a Wan video has 1 + {factor}k frames (its VAE compresses time "
                f"{factor}x); use {below} or {below + factor}"
            )

    def check(self, model: nn.Module) -> None:
        # diffusers' caches that decide from a rank's own strip are refused for every family (engine/hooks.py).
        for name, module in model.named_modules():
            if isinstance(module, WanAttention):
                check_processor(name, module, (WanAttnProcessor,))
            elif isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d)):
                kernel, stride, padding = (_triple(getattr(module, a)) for a in ("kernel_size", "stride", "padding"))
                if kernel != stride or any(padding):
                    raise TypeError(
                        f"distrifusion: layer {name!r} ({type(module).__name__}) cannot be split into strips: its "
                        f"windows (kernel {kernel}, stride {stride}, padding {padding}) cross strip edges"
                    )

    def block_rows(self, model: nn.Module) -> int:
        """A token: `patch_size` latent rows (rows), or latent frames (frames)."""
        return model.config.patch_size[self.dim - 2]

    def install(self, model: nn.Module, state: ParallelState) -> None:
        install_forward(model.rope, StripRoPE, "rope", state)
        for name, module in model.named_modules():
            if isinstance(module, WanAttention) and not module.is_cross_attention:  # attn2 stays local
                make = partial(PatchTokenAttnProcessor, module, name, state, project=wan_qkv, finish=wan_out)
                install_processor(module, state, make)

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        video = inputs["hidden_states"]
        if video.dim() != 5:
            raise ValueError(
                f"distrifusion: Wan expects a video (batch, channels, frames, height, width), got {tuple(video.shape)}"
            )
        timestep = inputs.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 2:  # Wan 2.2 TI2V: one per token
            tokens = math.prod(n // p for n, p in zip(video.shape[2:], self.patch))
            if timestep.shape[1] != tokens:
                raise ValueError(
                    f"distrifusion: a per-token timestep of {timestep.shape[1]} tokens for a video of {tokens} "
                    "tokens; pass one per token (frames x rows x columns of patches)"
                )
        batch, frames, height, width = video.shape[0], *video.shape[2:]
        return (batch, height, width) if self.split == "rows" else (batch, frames, height)

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        check_kwargs_dict("Wan", inputs, "attention_kwargs")
        video = inputs["hidden_states"]
        local = {k: slice_batch(v, partition) for k, v in inputs.items()}
        # First-last-frame I2V passes two images per video: (2 x batch, ...), which slice_batch leaves whole.
        images = local.get("encoder_hidden_states_image")
        if images is not None and partition.cfg_groups > 1 and images.shape[0] == 2 * partition.batch:
            local["encoder_hidden_states_image"] = images.view(partition.batch, 2, *images.shape[1:])[
                partition.cfg_index * partition.local_batch : (partition.cfg_index + 1) * partition.local_batch
            ].flatten(0, 1)
        start, length = partition.row_start, partition.rows[partition.patch_rank]
        local["hidden_states"] = local["hidden_states"].narrow(self.dim, start, length)
        timestep = local.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 2:
            grid = [n // p for n, p in zip(video.shape[2:], self.patch)]
            axis, step = self.dim - 2, self.patch[self.dim - 2]
            local["timestep"] = timestep.unflatten(1, grid).narrow(1 + axis, start // step, length // step).flatten(1)
        return local


def _triple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


class StripRoPE:
    """Wan's 3D rotary tables (`WanRotaryPosEmbed`) for one strip: the module computes them for a stand-in
    of the whole video's shape (it reads nothing but the shape), then they are cut to the strip's tokens.
    A strip alone would get positions counted from its own first row or frame."""

    def __init__(self, rope: nn.Module, name: str, state: ParallelState) -> None:
        self.rope, self.name, self.state = rope, name, state

    def __call__(self, hidden_states: torch.Tensor):
        state, rope = self.state, self.rope
        if not state.split:
            return type(rope).forward(rope, hidden_states)
        dim = _AXES[state.config.video_split].dim
        partition, axis = state.partition, dim - 2
        shape = list(hidden_states.shape)
        shape[dim] = partition.height
        whole = hidden_states.new_empty(()).expand(shape)  # the whole video's shape, no memory
        grid = [n // p for n, p in zip(shape[2:], rope.patch_size)]
        step = rope.patch_size[axis]
        start, length = partition.row_start // step, hidden_states.shape[dim] // step
        tables = type(rope).forward(rope, whole)  # (1, tokens, 1, head_dim) each: cos and sin
        return tuple(t.unflatten(1, grid).narrow(1 + axis, start, length).flatten(1, 3) for t in tables)


def wan_qkv(attn: nn.Module, hidden_states: torch.Tensor, rotary_emb=None):
    """Queries, keys and values (batch, tokens, heads, head_dim) of Wan's self-attention, as
    `WanAttnProcessor` computes them: projected (fused when `fuse_qkv_projections` was called), normalised
    across heads, rotated."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    if rotary_emb is not None:
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
    return query, key, value


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """`WanAttnProcessor`'s rotation: channel pairs (2i, 2i + 1) rotated by the table's angle."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_out(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](out))
