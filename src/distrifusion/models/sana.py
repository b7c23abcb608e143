"""SANA (`SanaTransformer2DModel`; 1024px, 2K and 4K, SANA 1.5, Sprint): patch tokens in strips of
whole patch rows; ReLU linear self-attention over all strips through per-strip sums (a few numbers
per head, whatever the image size); the Mix-FFN's 3x3 depthwise conv over the token grid with halo
rows; cross-attention to the text (local); sin-cos positions of the whole image (the 2K and 4K
models interpolate them by the input's own height: a strip alone would get the wrong ones).

The pipelines' DC-AE (`AutoencoderDC`) is not split: it decodes the whole image on every rank."""

from __future__ import annotations

from functools import partial

from diffusers import SanaTransformer2DModel
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from torch import nn

from ..engine.layers import PatchConv2d, PatchLinearAttnProcessor, StripPatchEmbed
from ..engine.state import ParallelState, Partition
from .base import (
    ModelAdapter,
    check_kwargs_dict,
    check_processor,
    image_map_grid,
    install_forward,
    install_processor,
    refuse_inputs,
    slice_batch,
    slice_tokens,
    strip_rows,
)
from .unet import ATTENTION_PROCESSORS

CROSS_ATTENTION_PROCESSORS = (SanaAttnProcessor2_0, *ATTENTION_PROCESSORS)
"""Processors left in place on the text cross-attention: each query row attends to the text only."""


class SanaAdapter(ModelAdapter):
    models = (SanaTransformer2DModel,)
    conditioning_args = ("encoder_hidden_states", "encoder_attention_mask", "guidance")
    sample_arg = "hidden_states"
    halo_convs = True  # the Mix-FFN's depthwise 3x3 conv reads the rows next to a strip's

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                # Self-attention must be the linear attention (SanaPAGPipeline's processors, or a softmax one
                # set by set_default_attn_processor, compute something else: refused by name).
                allowed = CROSS_ATTENTION_PROCESSORS if module.is_cross_attention else (SanaLinearAttnProcessor2_0,)
                check_processor(name, module, allowed)
            elif _reads_rows(module):
                PatchConv2d(module, name, None)  # validates padding and stride

    def block_rows(self, model: nn.Module) -> int:
        return model.config.patch_size  # the patch embedding is a conv with kernel = stride: no halo

    def install(self, model: nn.Module, state: ParallelState) -> None:
        install_forward(model.patch_embed, StripPatchEmbed, "patch_embed", state)
        for name, module in model.named_modules():
            if _reads_rows(module):
                install_forward(module, PatchConv2d, name, state)
            elif isinstance(module, Attention) and not module.is_cross_attention:
                install_processor(module, state, partial(PatchLinearAttnProcessor, module, name, state))

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        # Checked here, before the first collective of a call, identically on every rank.
        check_kwargs_dict("SANA", inputs, "attention_kwargs")
        refuse_inputs("SANA", inputs, ["attention_mask"], "a mask over image tokens cannot be split into strips")
        return image_map_grid(inputs["hidden_states"])

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        local = {k: slice_batch(v, partition) for k, v in inputs.items()}
        first, last = strip_rows(partition)
        local["hidden_states"] = local["hidden_states"][:, :, first:last]
        if local.get("controlnet_block_samples") is not None:  # SanaControlNetModel's residuals: (batch, tokens, c)
            per_row = partition.width // partition.block
            start, end = first // partition.block * per_row, last // partition.block * per_row
            local["controlnet_block_samples"] = slice_tokens(local["controlnet_block_samples"], start, end)
        return local


def _reads_rows(module: nn.Module) -> bool:
    """A conv whose windows overlap rows (the Mix-FFN's 3x3), not one with kernel = stride (the patch embedding)."""
    if not isinstance(module, nn.Conv2d) or module.kernel_size[0] == 1:
        return False
    return not (module.kernel_size[0] == module.stride[0] and module.padding[0] == 0)
