"""The VAE (`AutoencoderKL`: SD 1.x/2.x, SDXL, SD3, Flux, PixArt): decode and encode split in
strips, always exact (synchronous): halo convs, whole-image GroupNorm and the mid-block
attention's queries by strip over every strip's keys/values. Nothing runs replicated but the
weights; every rank gets the whole output, gathered once at the end.
"""

from __future__ import annotations

from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from torch import nn

from ..engine.layers import PatchConv2d, PatchZeroPadDownsample
from ..engine.state import ParallelState, Partition
from .base import (
    ModelAdapter,
    batch_slice,
    check_processor,
    image_map_grid,
    install_forward,
    strip_rows,
)
from .unet import ATTENTION_PROCESSORS, UNetAdapter, local_maps


class VAEAdapter(ModelAdapter):
    models = (AutoencoderKL,)
    uses_groupnorm = True
    always_sync = True
    halo_convs = True

    def entries(self, model: nn.Module) -> list[tuple[str, ModelAdapter]]:
        return [("_encode", VAEEncode()), ("_decode", VAEDecode())]

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                check_processor(name, module, ATTENTION_PROCESSORS)
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                PatchConv2d(module, name, None)  # validates padding and stride

    def install(self, model: nn.Module, state: ParallelState) -> None:
        """The UNet's layers (halo convs, GroupNorm, attention), plus the encoder's zero-padding
        downsamplers, whose bottom zero row belongs to the image's last strip only."""
        UNetAdapter().install(model, state)
        for name, module in model.named_modules():
            if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0:
                install_forward(module, PatchZeroPadDownsample, name, state)


class VAEDecode(ModelAdapter):
    """`AutoencoderKL._decode(z)`: split in latent rows (the decoder only upsamples)."""

    sample_arg = "z"

    def runs_whole(self, model: nn.Module, inputs: dict) -> bool:
        z = inputs["z"]
        return model.use_tiling and max(z.shape[-2:]) > model.tile_latent_min_size

    def block_rows(self, model: nn.Module) -> int:
        return 1

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        return image_map_grid(inputs["z"])

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        return _split(inputs, partition)


class VAEEncode(ModelAdapter):
    """`AutoencoderKL._encode(x)`: split in image rows, in strips of whole latent rows (the
    encoder's total downsampling), so that every stride-2 conv starts a strip on an even row."""

    sample_arg = "x"
    row_unit = "image rows"

    def runs_whole(self, model: nn.Module, inputs: dict) -> bool:
        x = inputs["x"]
        return model.use_tiling and max(x.shape[-2:]) > model.tile_sample_min_size

    def block_rows(self, model: nn.Module) -> int:
        return 2 ** sum(1 for block in model.encoder.down_blocks if getattr(block, "downsamplers", None))

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        return image_map_grid(inputs["x"])

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        return _split(inputs, partition)


def _split(inputs: dict, partition: Partition) -> dict:
    return {k: local_maps(v, partition, batch_slice(partition), strip_rows(partition)) for k, v in inputs.items()}
