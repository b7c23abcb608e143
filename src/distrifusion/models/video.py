"""What the video adapters share (Wan, HunyuanVideo-1.5, LTX-Video): a video in strips of whole token rows
across all frames, or of whole latent frames (`ParallelConfig.video_split`); tensors over a video's tokens
(frames x rows x columns, row-major) cut to a strip; rotary tables computed for the whole video and cut;
the check of 3D convs."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..engine.config import ParallelConfig
from ..engine.state import ParallelState, Partition
from .base import ModelAdapter

log = logging.getLogger("distrifusion")


@dataclasses.dataclass(frozen=True)
class VideoAxis:
    """The extent a video's strips cut."""

    dim: int
    """Its dimension in a (batch, channels, frames, height, width) latent."""
    unit: str
    name: str

    @property
    def grid_axis(self) -> int:
        """Its axis in the (frames, rows, columns) grid of tokens."""
        return self.dim - 2


VIDEO_AXES = {
    "rows": VideoAxis(3, "latent rows", "video height"),
    "frames": VideoAxis(2, "latent frames", "video length"),
}


def cut_tokens(value: torch.Tensor, dim: int, grid, axis: int, start: int, length: int) -> torch.Tensor:
    """The tokens of `value` (a grid of frames x rows x columns of them, row-major, along `dim`) whose index
    along `axis` of `grid` lies in [start, start + length), in the same order."""
    return value.unflatten(dim, tuple(grid)).narrow(dim + axis, start, length).flatten(dim, dim + 2)


class VideoAdapter(ModelAdapter):
    """A video denoiser split into strips of its latent video: bands of whole token rows across all frames
    ("rows"), or runs of whole latent frames ("frames"). A subclass gives the model's patch (frames, rows,
    columns of latent cells per token) by `model_patch`."""

    sample_arg = "hidden_states"

    def __init__(self, split: str = "rows", patch: tuple[int, int, int] = (1, 1, 1)) -> None:
        self.split, self.axis, self.patch = split, VIDEO_AXES[split], tuple(patch)
        self.output_dim, self.row_unit, self.split_axis = self.axis.dim, self.axis.unit, self.axis.name

    @staticmethod
    def model_patch(model: nn.Module) -> tuple[int, int, int]:
        """Latent frames, rows and columns per token of `model`."""
        raise NotImplementedError

    def configured(self, model: nn.Module, config: ParallelConfig) -> VideoAdapter:
        return type(self)(config.video_split, self.model_patch(model))

    def block_rows(self, model: nn.Module) -> int:
        """A token: the model's patch in latent rows (rows), or in latent frames (frames)."""
        return self.model_patch(model)[self.axis.grid_axis]

    def video_grid(self, batch: int, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(batch, rows, columns) of the split, in latent units: the strips cut the second."""
        return (batch, height, width) if self.split == "rows" else (batch, frames, height)

    def token_grid(self, frames: int, height: int, width: int) -> list[int]:
        """Tokens along frames, rows and columns of a latent video of these sizes."""
        return [n // p for n, p in zip((frames, height, width), self.patch)]

    def check_token_timestep(self, timestep, tokens: int) -> None:
        """A timestep of shape (batch, tokens) is one per token (Wan 2.2 TI2V, LTX-Video image-to-video); one of
        shape (batch, 1) is one for all tokens."""
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 2 and timestep.shape[1] not in (1, tokens):
            raise ValueError(
                f"distrifusion: a per-token timestep of {timestep.shape[1]} tokens for a video of {tokens} "
                "tokens; pass one per token (frames x rows x columns of patches)"
            )

    def cut_strip(self, value: torch.Tensor, dim: int, grid, partition: Partition) -> torch.Tensor:
        """This rank's strip of `value`, a tensor over the whole video's tokens (`grid`) along `dim`."""
        step = self.patch[self.axis.grid_axis]
        start, length = partition.row_start // step, partition.rows[partition.patch_rank] // step
        return cut_tokens(value, dim, grid, self.axis.grid_axis, start, length)

    def local_timestep(self, timestep, grid, partition: Partition):
        """A per-token timestep (batch, tokens) cut to this rank's strip; any other timestep unchanged."""
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 2 and timestep.shape[1] > 1:
            return self.cut_strip(timestep, 1, grid, partition)
        return timestep


class StripVideoRoPE:
    """A video model's rotary tables, which it computes from its input's shape (positions from 0 on every
    axis), for one strip: computed for a stand-in of the whole video's shape (the module reads nothing but
    the shape), then cut to the strip's tokens. A strip alone would get positions counted from its own first
    row or frame. A subclass says where the tables keep their tokens (`token_dim`) and the rope's patch."""

    token_dim = 1

    def __init__(self, rope: nn.Module, name: str, state: ParallelState) -> None:
        self.rope, self.name, self.state = rope, name, state

    def patch(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def __call__(self, hidden_states: torch.Tensor):
        state, rope = self.state, self.rope
        if not state.split:
            return type(rope).forward(rope, hidden_states)
        axis, partition, patch = VIDEO_AXES[state.config.video_split], state.partition, self.patch()
        shape = list(hidden_states.shape)
        shape[axis.dim] = partition.height
        whole = hidden_states.new_empty(()).expand(shape)  # the whole video's shape, no memory
        grid = [n // p for n, p in zip(shape[2:], patch)]
        step = patch[axis.grid_axis]
        start, length = partition.row_start // step, hidden_states.shape[axis.dim] // step
        tables = type(rope).forward(rope, whole)
        return tuple(cut_tokens(t, self.token_dim, grid, axis.grid_axis, start, length) for t in tables)


def check_frame_count(pipe, arguments: dict, what: str) -> None:
    """Refuse a pipeline's `num_frames` that is not 1 + k x its VAE's time compression (the pipelines round
    it, some with a warning, some silently), naming the nearest counts."""
    frames = arguments.get("num_frames")
    factor = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", None)
    if isinstance(frames, int) and isinstance(factor, int) and factor > 1 and (frames < 1 or (frames - 1) % factor):
        below = max(1, (frames - 1) // factor * factor + 1)
        raise ValueError(
            f"distrifusion: num_frames={frames}: {what} has 1 + {factor}k frames (its VAE compresses time "
            f"{factor}x); use {below} or {below + factor}"
        )


def check_video_convs(model: nn.Module) -> None:
    """Refuse a 1D/3D conv or pool whose windows overlap or are padded: they would cross strip edges (a
    patch embedding, kernel = stride and no padding, does not)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d)):
            kernel, stride, padding = (_triple(getattr(module, a)) for a in ("kernel_size", "stride", "padding"))
            if kernel != stride or any(padding):
                raise TypeError(
                    f"distrifusion: layer {name!r} ({type(module).__name__}) cannot be split into strips: its "
                    f"windows (kernel {kernel}, stride {stride}, padding {padding}) cross strip edges"
                )


def _triple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3
