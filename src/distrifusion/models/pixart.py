"""PixArt-α/Σ (`PixArtTransformer2DModel`): patch tokens in strips of whole patch rows,
self-attention over all strips, cross-attention to the text (local), sin-cos positions of the
whole image; resolution and aspect-ratio conditions come from the pipeline unchanged."""

from __future__ import annotations

from functools import partial

from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from ..engine.layers import PatchAttnProcessor, StripPatchEmbed
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
    strip_rows,
)
from .unet import ATTENTION_PROCESSORS


class PixArtAdapter(ModelAdapter):
    models = (PixArtTransformer2DModel,)
    conditioning_args = ("encoder_hidden_states", "encoder_attention_mask")
    sample_arg = "hidden_states"

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                check_processor(name, module, ATTENTION_PROCESSORS)

    def block_rows(self, model: nn.Module) -> int:
        return model.config.patch_size

    def install(self, model: nn.Module, state: ParallelState) -> None:
        install_forward(model.pos_embed, StripPatchEmbed, "pos_embed", state)
        for name, module in model.named_modules():
            if isinstance(module, Attention):  # attn1 over all strips; attn2 (text) runs unchanged
                install_processor(module, state, partial(PatchAttnProcessor, module, name, state))

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        return image_map_grid(inputs["hidden_states"])

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        check_kwargs_dict("PixArt", inputs, "cross_attention_kwargs")
        refuse_inputs("PixArt", inputs, ["attention_mask"], "a mask over image tokens cannot be split into strips")
        local = {k: slice_batch(v, partition) for k, v in inputs.items()}
        first, last = strip_rows(partition)
        local["hidden_states"] = local["hidden_states"][:, :, first:last]
        return local
