"""UNets (SD 1.x/2.x, SDXL, pixel-space UNet2DModel): halo convs, whole-image GroupNorm and
self-attention over all strips; everything else is local to a strip."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from diffusers.models.downsampling import Downsample2D
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from torch import nn

from ..engine.layers import PatchAttnProcessor, PatchConv2d, PatchFreeU, PatchGroupNorm
from ..engine.state import ParallelState, Partition
from .base import (
    ModelAdapter,
    batch_slice,
    check_kwargs_dict,
    check_processor,
    image_map_grid,
    install_forward,
    install_processor,
    strip_rows,
)

ATTENTION_PROCESSORS = (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
"""Processors that compute plain attention (fused, sliced or by xformers: the same numbers): the
patch-parallel processor replaces them on self-attention and computes cross-attention as they do."""
CROSS_ATTENTION_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
"""Cross-attention processors left in place: each query row attends to the text and image prompt
only, so a strip computes its rows exactly as the whole image would."""
FREEU_BLOCKS = (UpBlock2D, CrossAttnUpBlock2D)
"""The up blocks that apply FreeU (`pipe.enable_freeu`) when it is on."""
SPATIAL_ARGS = (
    "sample",
    "down_block_additional_residuals",  # ControlNet
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",  # T2I-Adapter
)
"""Forward arguments that are maps of the image (at any level of the UNet): cut in rows."""


class UNetAdapter(ModelAdapter):
    models = (UNet2DConditionModel, UNet2DModel)
    conditioning_args = ("encoder_hidden_states", "class_labels", "added_cond_kwargs", "encoder_attention_mask")
    uses_groupnorm = True
    halo_convs = True

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0:
                raise TypeError(f"distrifusion: downsampler {name!r} pads asymmetrically (padding=0), not supported")
            if isinstance(module, Attention):
                cross = CROSS_ATTENTION_PROCESSORS if module.is_cross_attention else ()
                check_processor(name, module, ATTENTION_PROCESSORS + cross)
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                PatchConv2d(module, name, None)  # validates padding and stride
            if isinstance(getattr(module, "base_layer", None), nn.Conv2d) and any(
                getattr(module, "use_dora", {}).values()
            ):  # peft's DoRA convolves the strip itself (F.conv2d), without halo rows
                raise TypeError(f"distrifusion: DoRA on conv {name!r} is not supported; use a plain LoRA")

    def block_rows(self, model: nn.Module) -> int:
        """The model's total downsampling: every strip must survive it in whole rows."""
        downsamplers = sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))
        return 2**downsamplers

    def install(self, model: nn.Module, state: ParallelState) -> None:
        """Halos on convs taller than one row, whole-image statistics on every GroupNorm,
        all-strip keys/values on every self-attention, FreeU's filter over the whole skip maps."""
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                install_forward(module, PatchConv2d, name, state)
            elif isinstance(module, nn.GroupNorm):
                install_forward(module, PatchGroupNorm, name, state)
            elif isinstance(module, FREEU_BLOCKS):
                install_forward(module, PatchFreeU, name, state)
            elif isinstance(module, Attention) and not isinstance(module.processor, CROSS_ATTENTION_PROCESSORS):
                install_processor(module, state, partial(PatchAttnProcessor, module, name, state))

    def switches(self, model: nn.Module) -> tuple:
        """FreeU's factors (`enable_freeu` sets, `disable_freeu` clears attributes of the up blocks):
        whether it runs, and values a CUDA graph would have baked in."""
        return tuple(getattr(b, a, None) for b in model.up_blocks for a in ("s1", "s2", "b1", "b2"))

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        return image_map_grid(inputs["sample"])

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        # A LoRA scale is the same on every strip; IP-Adapter masks (whole-image maps the processor
        # resizes to the tokens it sees) and other per-layer extras are not.
        check_kwargs_dict("UNet", inputs, "cross_attention_kwargs")
        rows, batch = strip_rows(partition), batch_slice(partition)
        return {k: local_maps(v, partition, batch, rows if k in SPATIAL_ARGS else None) for k, v in inputs.items()}

    def timestep_tensor(self, model: nn.Module, t: int | float) -> torch.Tensor:
        if isinstance(model, UNet2DModel):
            return torch.tensor(t, dtype=torch.long)
        return super().timestep_tensor(model, t)


def local_maps(value, partition: Partition, batch: slice, rows: tuple[int, int] | None):
    """This rank's part of one forward argument: its batch half, and (`rows` given) its rows of
    spatial maps."""
    if isinstance(value, dict):
        return {k: local_maps(v, partition, batch, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local_maps(v, partition, batch, rows) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != partition.batch:
        return value
    value = value[batch]
    if rows is None:
        return value
    # Spatial maps (the latent, ControlNet and T2I-Adapter residuals) at any level of the UNet: slice
    # their rows. The level is read from the rows alone (the height is a whole number of blocks, so every
    # level's rows divide it; a width that is not may round up on the way down).
    if value.dim() == 4 and partition.height % value.shape[2] == 0:
        factor = partition.height // value.shape[2]
        value = value[:, :, rows[0] // factor : rows[1] // factor]
    return value
