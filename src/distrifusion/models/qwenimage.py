"""Qwen-Image (`QwenImageTransformer2DModel`; Qwen-Image-Edit's reference image too): packed 2x2 latent
tokens in strips of token rows, [text, image] joint attention in every block (no single-stream
blocks), MSRoPE positions from `img_shapes`: the image's centred on it (`scale_rope`), the text's
after the largest image's extent. Positions are the whole image's and the whole text's, sliced to
this rank's tokens. A text mask (`encoder_hidden_states_mask`, a batch of prompts of different
lengths) travels with sharded text. Qwen-Image-Edit's reference-image tokens (after the image's, a
second entry of `img_shapes`) are context like the text (`Partition.extra`)."""

from __future__ import annotations

from functools import partial
from math import prod

from diffusers import QwenImageTransformer2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, apply_rotary_emb_qwen
from torch import nn

from ..engine.layers import PatchJointAttnProcessor
from ..engine.state import ParallelState, Partition
from .base import (
    PackedTokensAdapter,
    check_kwargs_dict,
    check_packed,
    check_processor,
    install_forward,
    install_processor,
    shard_text,
    slice_batch,
    slice_tokens,
    strip_rows,
    strip_tokens,
)

QWEN_IMAGE_21 = (
    "Qwen-Image 2.1 is another architecture: block-causal attention over a prefix of text and condition-image "
    "tokens held in a KV cache, which strips of the image cannot share"
)


class QwenImageAdapter(PackedTokensAdapter):
    models = (QwenImageTransformer2DModel,)
    refused = {"QwenImage21Transformer2DModel": QWEN_IMAGE_21}
    conditioning_args = ("encoder_hidden_states", "encoder_hidden_states_mask")  # true CFG: a negative-prompt call

    def check(self, model: nn.Module) -> None:
        config = model.config
        if config.get("zero_cond_t"):
            raise TypeError(
                "distrifusion: Qwen-Image with zero_cond_t (Qwen-Image-Edit-2511) modulates each token by the image "
                "it belongs to, from the whole image's token counts; it is not supported"
            )
        if config.get("use_layer3d_rope"):
            raise TypeError(
                "distrifusion: Qwen-Image with use_layer3d_rope (Qwen-Image-Layered) outputs several layers of the "
                "image, which are not one grid of rows; it is not supported"
            )
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                check_processor(name, module, (QwenDoubleStreamAttnProcessor2_0,))

    def install(self, model: nn.Module, state: ParallelState) -> None:
        install_forward(model.pos_embed, StripQwenRope, "pos_embed", state)
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                make = partial(
                    PatchJointAttnProcessor,
                    module,
                    name,
                    state,
                    text_first=True,
                    text_in_hidden=False,
                    split_rotary=qwen_rotary,
                    rotate=partial(apply_rotary_emb_qwen, use_real=False),
                )
                install_processor(module, state, make)

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        tokens = inputs["hidden_states"]
        check_packed("Qwen-Image", tokens)
        shapes = image_shapes(inputs.get("img_shapes"))
        frames, rows, cols = shapes[0]
        if frames != 1:
            raise ValueError(
                f"distrifusion: Qwen-Image img_shapes[0] {shapes[0]} has {frames} frames; one is supported"
            )
        if tokens.shape[1] != sum(prod(s) for s in shapes):
            raise ValueError(
                f"distrifusion: Qwen-Image img_shapes {shapes} describe {sum(prod(s) for s in shapes)} tokens, "
                f"hidden_states has {tokens.shape[1]}"
            )
        return tokens.shape[0], rows, cols

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        check_kwargs_dict("Qwen-Image", inputs, "attention_kwargs")
        batched = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance")
        batched += ("additional_t_cond", "controlnet_block_samples")
        local = {k: slice_batch(v, partition) if k in batched else v for k, v in inputs.items()}
        local["hidden_states"] = strip_tokens(local["hidden_states"], partition)
        start, end = (r * partition.width for r in strip_rows(partition))
        local["controlnet_block_samples"] = slice_tokens(local.get("controlnet_block_samples"), start, end)
        local = shard_text(local, partition, "encoder_hidden_states")
        mask = local.get("encoder_hidden_states_mask")
        if partition.sharded_text and mask is not None:  # (batch, tokens): the text's share of it
            first, share = sum(partition.text[: partition.patch_rank]), partition.text[partition.patch_rank]
            # An empty share has no mask (diffusers cannot take an empty one); the processor still exchanges it.
            local["encoder_hidden_states_mask"] = mask[:, first : first + share] if share else None
        return local

    def text_masked(self, inputs: dict) -> bool:
        return inputs.get("encoder_hidden_states_mask") is not None


def image_shapes(img_shapes) -> list[tuple[int, int, int]]:
    """The (frames, rows, columns) token grids of one sample's images, as QwenEmbedRope reads
    `img_shapes` (the first sample's entry; one grid or a list of them): the image first, then any
    reference images."""
    if not img_shapes:
        raise ValueError("distrifusion: Qwen-Image needs img_shapes (the token grid of the image and references)")
    shapes = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
    shapes = shapes if isinstance(shapes, list) else [shapes]
    return [tuple(int(v) for v in s) for s in shapes]


def qwen_rotary(rotary: tuple, n_text: int, n_image: int, text_first: bool) -> tuple:
    """(text's, image's) rotary tables from Qwen-Image's (image's, text's) pair of complex tables."""
    image, text = rotary
    return text, image


class StripQwenRope:
    """Qwen-Image's MSRoPE (`QwenEmbedRope`) of this rank's tokens: the positions of the whole image and
    references (centred on each, `scale_rope`) and of the whole text (after the largest image's
    extent), sliced to the strip's tokens, its reference tokens and its share of the text. On a strip
    alone the module would centre the positions on the strip and start the text after it."""

    def __init__(self, embed: nn.Module, name: str, state: ParallelState) -> None:
        self.embed, self.name, self.state = embed, name, state

    def __call__(self, video_fhw, *args, **kwargs):
        embed, state = self.embed, self.state
        forward = type(embed).forward
        if not state.split:
            return forward(embed, video_fhw, *args, **kwargs)
        partition = state.partition
        if args or set(kwargs) - {"device", "max_txt_seq_len"}:
            raise TypeError(f"distrifusion: {self.name!r} got arguments this version of the engine does not know")
        rank = partition.patch_rank
        text = sum(partition.text) if partition.sharded_text else partition.text[rank]
        image, text_table = forward(embed, video_fhw, device=kwargs.get("device"), max_txt_seq_len=text)
        image = strip_tokens(image, partition, dim=0)
        if partition.sharded_text:
            first = sum(partition.text[:rank])
            text_table = text_table[first : first + partition.text[rank]]
        return image, text_table
