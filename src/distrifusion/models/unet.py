"""UNets (SD 1.x/2.x, SDXL, pixel-space UNet2DModel): halo convs, whole-image GroupNorm and
self-attention over all strips; everything else is local to a strip."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.downsampling import Downsample2D
from torch import nn

from ..layers import PatchAttnProcessor, PatchConv2d, PatchGroupNorm
from ..state import ParallelState, Plan
from .base import ModelAdapter, batch_slice, check_processor, image_map_grid, strip_rows


class UNetAdapter(ModelAdapter):
    models = (UNet2DConditionModel, UNet2DModel)
    uses_groupnorm = True

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            kind = type(module).__name__
            if kind in ("AdaGroupNorm", "SpatialNorm", "FirDownsample2D", "KDownsample2D", "FirUpsample2D"):
                raise TypeError(f"distrifusion: layer {name!r} ({kind}) is not supported")
            if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0:
                raise TypeError(f"distrifusion: downsampler {name!r} pads asymmetrically (padding=0), not supported")
            if isinstance(module, Attention):
                check_processor(name, module, (AttnProcessor, AttnProcessor2_0))
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                PatchConv2d(module, name, None)  # validates padding and stride

    def block_rows(self, model: nn.Module) -> int:
        """The model's total downsampling: every strip must survive it in whole rows."""
        downsamplers = sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))
        return 2**downsamplers

    def install(self, model: nn.Module, state: ParallelState) -> None:
        """Halos on convs taller than one row, whole-image statistics on every GroupNorm,
        all-strip keys/values on every self-attention."""
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                module.forward = PatchConv2d(module, name, state)
            elif isinstance(module, nn.GroupNorm):
                module.forward = PatchGroupNorm(module, name, state)
            elif isinstance(module, Attention):
                module.set_processor(PatchAttnProcessor(module, name, state, module.processor))

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        return image_map_grid(inputs["sample"])

    def local_inputs(self, inputs: dict, plan: Plan) -> dict:
        return {k: local_maps(v, plan, batch_slice(plan), strip_rows(plan)) for k, v in inputs.items()}

    def timestep_tensor(self, model: nn.Module, t: int | float) -> torch.Tensor:
        if isinstance(model, UNet2DModel):
            return torch.tensor(t, dtype=torch.long)
        return super().timestep_tensor(model, t)


def local_maps(value, plan: Plan, batch: slice, rows: tuple[int, int]):
    """This rank's part of one forward argument: its batch half, and its rows of spatial maps."""
    if isinstance(value, dict):
        return {k: local_maps(v, plan, batch, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local_maps(v, plan, batch, rows) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != plan.batch:
        return value
    value = value[batch]
    # Spatial maps (the latent, ControlNet residuals) at any level of the UNet: slice their rows.
    height, width = plan.height, plan.width
    if value.dim() == 4 and height % value.shape[2] == 0 and width % value.shape[3] == 0:
        factor = height // value.shape[2]
        if width // value.shape[3] == factor:
            value = value[:, :, rows[0] // factor : rows[1] // factor]
    return value
