"""The Wan video VAE (`AutoencoderKLWan`: Wan 2.1, and Wan 2.2's with its residual blocks and 2x2
patchify): decode and encode split in rows across the ranks, always exact (synchronous).

A video is (batch, channels, frames, rows, columns). Every rank keeps every frame of its strip of
rows; the model walks the frames in chunks (decode: one latent frame at a time; encode: one frame,
then four at a time), and its causal 3D convolutions carry the last frames of the previous chunk in
a cache (`feat_cache`), which on each rank holds its own rows only. What crosses strips:

- `WanCausalConv3d` with a 3x3 spatial window: one halo row above and below, for every frame it
  convolves (the cached frames of the previous chunk included), taken from the neighbours (the
  engine's halo conv along the rows, axis 3); time is padded causally as the layer itself does.
- the resamplers' `nn.Conv2d` (3x3, per frame): halo rows; the downsamplers' `ZeroPad2d((0, 1, 0, 1))`
  pads columns only on a strip: the stride-2 conv behind it takes its bottom row as halo, and zeros
  at the image's bottom edge.
- `WanAttentionBlock` (one head over all positions of each frame): this strip's queries over every
  strip's keys and values of the same frame, gathered.

Local to a strip: `WanRMS_norm` (it normalises over channels only, per position), the nearest-exact
2x upsampling (in float32, as the model does), the 1x1 and time-only (3x1x1) convolutions, Wan 2.2's
`AvgDown3D`/`DupUp3D` shortcuts and patchify (whole 2x2 cells: strips are whole latent rows), the
final clamp to [-1, 1]. Nothing runs replicated but the weights; every rank gets the whole output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, WanResample
from torch import nn

from ..engine.layers import PatchConv2d, PatchZeroPad, gather_tokens
from ..engine.state import ParallelState
from .base import ModelAdapter, install_forward
from .vae import VAEDecode, VAEEncode

ENCODE_CHUNK = 4
"""Frames per chunk after the first in `AutoencoderKLWan._encode` (a literal there): it encodes
1 + 4k frames and drops the rest."""
RESAMPLE_MODES = ("none", "upsample2d", "upsample3d", "downsample2d", "downsample3d")
"""`WanResample` modes whose layers are known (diffusers 0.41-0.42)."""


class WanVAEAdapter(ModelAdapter):
    models = (AutoencoderKLWan,)
    always_sync = True
    halo_convs = True

    def entries(self, model: nn.Module) -> list[tuple[str, ModelAdapter]]:
        return [("_encode", WanVAEEncode()), ("_decode", WanVAEDecode())]

    def own_layers(self, model: nn.Module) -> list[nn.Module]:
        """The downsamplers' bottom/right zero padding (see `PatchZeroPad`; validated in `check`)."""
        return [_downsampler_layers(r)[0] for r in _resamplers(model) if r.mode.startswith("downsample")]

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, WanCausalConv3d):
                PatchCausalConv3d(module, name, None)  # validates padding and stride
            elif isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                PatchConv2d(module, name, None)
            elif isinstance(module, WanResample):
                _check_resample(name, module)
            elif isinstance(module, WanAttentionBlock) and not _is_pointwise(module.to_qkv, module.proj):
                raise TypeError(f"distrifusion: attention {name!r} does not project per position; not supported")

    def install(self, model: nn.Module, state: ParallelState) -> None:
        """Halos on every conv wider than one row, columns-only padding in front of the strided
        downsampling convs, every strip's keys/values for the frames' attention."""
        pads = {id(pad) for pad in self.own_layers(model)}
        for name, module in model.named_modules():
            if isinstance(module, WanCausalConv3d) and module.kernel_size[-2] > 1:
                install_forward(module, PatchCausalConv3d, name, state)
            elif isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                install_forward(module, PatchConv2d, name, state)
            elif id(module) in pads:
                install_forward(module, PatchZeroPad, name, state)
            elif isinstance(module, WanAttentionBlock):
                install_forward(module, WanFrameAttention, name, state)


class WanVAEDecode(VAEDecode):
    """`AutoencoderKLWan._decode(z)`: split in latent rows, every latent frame."""

    output_dim = 3

    def runs_whole(self, model: nn.Module, inputs: dict) -> bool:
        height, width = inputs["z"].shape[-2:]
        ratio = model.spatial_compression_ratio
        tiles = model.tile_sample_min_height // ratio, model.tile_sample_min_width // ratio
        return model.use_tiling and (height > tiles[0] or width > tiles[1])  # as `_decode` decides

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        batch, frames, rows, cols = video_grid(inputs["z"], "latent")
        if frames < 1:
            raise ValueError("distrifusion: the Wan VAE decodes at least one latent frame; got 0")
        return batch, rows, cols


class WanVAEEncode(VAEEncode):
    """`AutoencoderKLWan._encode(x)`: split in image rows, in strips of whole latent rows (the
    encoder's spatial downsampling times the patchify cell), every frame."""

    output_dim = 3

    def runs_whole(self, model: nn.Module, inputs: dict) -> bool:
        height, width = inputs["x"].shape[-2:]  # before patchify, as `_encode` decides
        return model.use_tiling and (height > model.tile_sample_min_height or width > model.tile_sample_min_width)

    def block_rows(self, model: nn.Module) -> int:
        downsamplers = sum(1 for r in _resamplers(model.encoder) if r.mode.startswith("downsample"))
        return (model.config.patch_size or 1) * 2**downsamplers

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        batch, frames, rows, cols = video_grid(inputs["x"], "video")
        if frames % ENCODE_CHUNK != 1:
            below = (frames - 1) // ENCODE_CHUNK * ENCODE_CHUNK + 1
            nearest = f"{below} or {below + ENCODE_CHUNK}" if frames > 1 else "1 or 5"
            raise ValueError(
                f"distrifusion: the Wan VAE encodes 1 + {ENCODE_CHUNK}k frames (it would drop the others); got "
                f"{frames} frames: pass {nearest}"
            )
        return batch, rows, cols


def video_grid(video: torch.Tensor, what: str) -> tuple[int, int, int, int]:
    """(batch, frames, rows, columns) of a (batch, channels, frames, height, width) video."""
    if video.dim() != 5:
        raise ValueError(
            f"distrifusion: expected a 5-D {what} (batch, channels, frames, height, width), got {tuple(video.shape)}"
        )
    return video.shape[0], video.shape[2], video.shape[3], video.shape[4]


class PatchCausalConv3d(PatchConv2d):
    """diffusers' `WanCausalConv3d` on a strip of rows: time padded causally as the layer does (the
    previous chunk's cached frames of this strip, else zeros), columns with zeros, rows with the
    neighbours' halo rows of every frame convolved (cached ones included: the ranks walk the chunks
    together, so a neighbour's cache holds the same frames)."""

    def __init__(self, conv: WanCausalConv3d, name: str, state: ParallelState) -> None:
        # The layer keeps its padding in `_padding` (F.pad order: columns, rows, frames before and after)
        # and sets `padding` to zero for the convolution proper.
        cols, cols_after, rows, rows_after, _, frames_after = conv._padding
        if (cols, rows, 0) != (cols_after, rows_after, frames_after):
            raise TypeError(f"distrifusion: causal conv {name!r} pads {conv._padding}; not supported")
        super().__init__(conv, name, state, padding=(0, rows, cols))

    def __call__(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        conv = self.conv
        if not self.state.split:
            return type(conv).forward(conv, x, cache_x)
        before = conv._padding[4]
        if cache_x is not None and before > 0:
            x = torch.cat([cache_x.to(x.device), x], 2)
            before -= cache_x.shape[2]
        if before > 0:
            x = F.pad(x, (0, 0, 0, 0, before, 0))
        return self.halo_conv(x)


class WanFrameAttention:
    """`WanAttentionBlock` on a strip: per frame, one head, this strip's queries over the keys and
    values of every strip's positions in the same frame (gathered), as the block computes them."""

    def __init__(self, block: WanAttentionBlock, name: str, state: ParallelState) -> None:
        self.block, self.name, self.state = block, name, state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        block, state = self.block, self.state
        if not state.split:
            return type(block).forward(block, x)
        identity = x
        batch, channels, frames, height, width = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        qkv = block.to_qkv(block.norm(x)).flatten(2).transpose(1, 2)  # (batch * frames, positions, 3 * channels)
        query, kv = qkv[..., :channels], qkv[..., channels:].contiguous()
        kv = gather_tokens(state, self.name, kv, state.sizes(height * width))
        key, value = kv.chunk(2, -1)
        out = F.scaled_dot_product_attention(query[:, None], key[:, None], value[:, None])
        out = out.squeeze(1).transpose(1, 2).reshape(batch * frames, channels, height, width)
        out = block.proj(out).view(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)
        return out + identity


def _resamplers(model: nn.Module) -> list[WanResample]:
    return [m for m in model.modules() if isinstance(m, WanResample)]


def _check_resample(name: str, resample: WanResample) -> None:
    """A resampler whose layers the adapter knows: nearest upsampling and a 3x3 conv, or a bottom/right
    zero pad and a 3x3 stride-2 conv (rows: what `PatchZeroPad` needs)."""
    if resample.mode not in RESAMPLE_MODES:
        raise TypeError(f"distrifusion: Wan resampler {name!r} has mode {resample.mode!r}; not supported")
    if not resample.mode.startswith("downsample"):
        return
    pad, conv = _downsampler_layers(resample)
    if not (isinstance(pad, nn.ZeroPad2d) and isinstance(conv, nn.Conv2d)):
        raise TypeError(f"distrifusion: Wan downsampler {name!r} is not a zero pad and a conv; not supported")
    _, _, top, bottom = pad.padding
    if top != 0 or bottom != PatchConv2d(conv, f"{name}.resample.1", None).below:
        raise TypeError(
            f"distrifusion: Wan downsampler {name!r} pads {pad.padding} before a conv of kernel {conv.kernel_size}, "
            f"stride {conv.stride}; only bottom rows that the conv's halo gives can be split"
        )


def _downsampler_layers(resample: WanResample) -> tuple[nn.Module | None, nn.Module | None]:
    """(padding, conv) of a downsampling resampler, or Nones when it is not a sequence of those two."""
    layers = list(resample.resample) if isinstance(resample.resample, nn.Sequential) else []
    return (layers[0], layers[1]) if len(layers) == 2 else (None, None)


def _is_pointwise(*convs: nn.Module) -> bool:
    return all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) and c.stride == (1, 1) for c in convs)
