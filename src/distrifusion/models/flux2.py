"""Flux.2 (`Flux2Transformer2DModel`: FLUX.2-dev, FLUX.2-klein): Flux.1's layout (packed tokens in
strips of token rows, [text, image] joint attention in double-stream blocks, then single-stream
blocks over text and image joined) with 4-axis RoPE from `img_ids`/`txt_ids`, and single-stream
blocks whose attention shares one projection with the MLP (`to_qkv_mlp_proj`). Reference images
(`Flux2Pipeline(image=...)`, `Flux2KleinPipeline(image=...)`) are tokens after the image's, with
another time coordinate: context like the text (`Partition.extra`)."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2AttnProcessor,
    Flux2ParallelSelfAttention,
    Flux2ParallelSelfAttnProcessor,
)
from torch import nn

from ..engine.layers import PatchJointAttnProcessor, heads
from ..engine.state import ParallelState
from .base import check_processor, install_processor, refuse_inputs
from .flux import FluxAdapter

KV_CACHE = (
    "Flux.2 klein's KV-cache mode (Flux2KleinKVPipeline): its reference tokens attend only to themselves and are "
    "cached from the first step; use Flux2KleinPipeline, which the engine splits"
)


class Flux2Adapter(FluxAdapter):
    models = (Flux2Transformer2DModel,)
    conditioning_args = ("encoder_hidden_states", "txt_ids")  # klein's CFG: a negative-prompt call
    family = "Flux.2"
    batched = ("hidden_states", "encoder_hidden_states", "timestep", "guidance")

    def check(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, (Flux2Attention, Flux2ParallelSelfAttention)):
                if "KV" in type(module.processor).__name__:  # Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor
                    raise TypeError(f"distrifusion: attention {name!r} is set for {KV_CACHE}")
                single = isinstance(module, Flux2ParallelSelfAttention)
                check_processor(name, module, (Flux2ParallelSelfAttnProcessor if single else Flux2AttnProcessor,))

    def install(self, model: nn.Module, state: ParallelState) -> None:
        for name, module in model.named_modules():
            if isinstance(module, Flux2Attention):
                make = partial(PatchJointAttnProcessor, module, name, state, text_first=True, text_in_hidden=False)
                install_processor(module, state, make)
            elif isinstance(module, Flux2ParallelSelfAttention):
                install_processor(module, state, partial(Flux2SingleStreamProcessor, module, name, state))

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        refuse_inputs("Flux.2", inputs, ["kv_cache", "kv_cache_mode"], KV_CACHE)
        if inputs.get("num_ref_tokens"):
            raise ValueError(f"distrifusion: Flux.2 input 'num_ref_tokens' is not supported: {KV_CACHE}")
        return super().grid(inputs)


class Flux2SingleStreamProcessor(PatchJointAttnProcessor):
    """Flux.2's single-stream attention (`Flux2ParallelSelfAttention`): one linear projects every token
    to its query, key, value and MLP input; the attention of those queries and keys/values is the
    joint attention of the strip (text and image joined, the text first, its length the partition's),
    and one linear projects the attention and the MLP's output together."""

    def __init__(self, attn: nn.Module, name: str, state: ParallelState, original) -> None:
        super().__init__(attn, name, state, original, text_first=True, text_in_hidden=True)

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, **kwargs):
        if not self.state.split:
            return self.original(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)
        self.refuse(attention_mask, kwargs)
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = projected.split([3 * attn.inner_dim, projected.shape[-1] - 3 * attn.inner_dim], -1)
        out_txt, out_img = self.attend(attn, qkv, None, image_rotary_emb, None)
        return attn.to_out(torch.cat([torch.cat([out_txt, out_img], 1), attn.mlp_act_fn(mlp)], -1))

    def project(self, attn, x: torch.Tensor, added: bool, rotary):
        """`x` is already projected: the tokens' queries, keys and values side by side."""
        return heads(attn, *x.chunk(3, -1), attn.norm_q, attn.norm_k, rotary, self.rotate)
