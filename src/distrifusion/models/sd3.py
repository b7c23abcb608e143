"""SD3 / SD3.5 (`SD3Transformer2DModel`): patch tokens in strips of whole patch rows, joint
attention with the text ([image, text]), SD3.5's second image-only attention, cropped positions."""

from __future__ import annotations

from functools import partial

from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, FusedJointAttnProcessor2_0, JointAttnProcessor2_0
from torch import nn

from ..engine.layers import PatchJointAttnProcessor, StripPatchEmbed
from ..engine.state import ParallelState, Partition
from .base import (
    ModelAdapter,
    check_kwargs_dict,
    check_processor,
    image_map_grid,
    install_forward,
    install_processor,
    shard_text,
    slice_batch,
    slice_tokens,
    strip_rows,
)


class SD3Adapter(ModelAdapter):
    models = (SD3Transformer2DModel,)
    conditioning_args = ("encoder_hidden_states", "pooled_projections", "skip_layers")  # skip-layer guidance
    sample_arg = "hidden_states"
    joint_text = True

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                check_processor(name, module, (JointAttnProcessor2_0, FusedJointAttnProcessor2_0))

    def block_rows(self, model: nn.Module) -> int:
        return model.config.patch_size  # the patch embedding is a conv with kernel = stride: no halo

    def install(self, model: nn.Module, state: ParallelState) -> None:
        install_forward(model.pos_embed, StripPatchEmbed, "pos_embed", state)
        for name, module in model.named_modules():
            if isinstance(module, Attention):  # joint attention, and SD3.5's image-only attn2
                make = partial(PatchJointAttnProcessor, module, name, state, text_first=False, text_in_hidden=False)
                install_processor(module, state, make)

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        return image_map_grid(inputs["hidden_states"])

    def text_tokens(self, inputs: dict) -> int:
        return inputs["encoder_hidden_states"].shape[1]

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        check_kwargs_dict("SD3", inputs, "joint_attention_kwargs")
        batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
        batched += ("block_controlnet_hidden_states",)
        local = {k: slice_batch(v, partition) if k in batched else v for k, v in inputs.items()}
        first, last = strip_rows(partition)
        local["hidden_states"] = local["hidden_states"][:, :, first:last]
        per_row = partition.width // partition.block
        start, end = first // partition.block * per_row, last // partition.block * per_row
        local["block_controlnet_hidden_states"] = slice_tokens(local.get("block_controlnet_hidden_states"), start, end)
        return shard_text(local, partition, "encoder_hidden_states")
