"""Z-Image (`ZImageTransformer2DModel`, Z-Image and Z-Image-Turbo): one stream of image and caption
tokens, in strips of image token rows.

What the source does (diffusers 0.41.0 and 0.42.1, `transformer_z_image.py`), and what a strip needs:

- The model takes and returns lists (one (channels, frames, height, width) latent per sample); each
  sample's image tokens are padded to a multiple of 32 with a learned pad token, at position
  (0, 0, 0), not masked: the pad count is the whole image's, and the pad tokens take part in every
  attention as queries and keys. Captions are padded alike; image positions start after each
  sample's padded caption (so they differ between the samples of a CFG batch).
  So every rank patchifies the whole image with the model's own code (`StripPatchify`: positions and
  pad tokens are exactly the model's) and keeps its strip's tokens and all pad tokens.
- The noise refiner is self-attention over the image tokens (and their pad tokens): exchanged. The
  context refiner sees the caption only: local. The main layers attend over [image tokens, pad,
  caption, caption pad] per sample, with a key mask where the batch's samples differ in length.
  `PatchZImageAttnProcessor` serves both: the first tokens of a rank's sequence are its strip's image
  tokens, whose keys/values are exchanged; the rest (pad and caption tokens) are computed by every rank
  (in a synchronous step every rank computes them identically: they see the same keys and values).
- Omni inputs (nested lists: several images per sample, SigLIP features, per-token noise masks) and
  ControlNet residuals over the joint sequence are refused: they are not a grid of image rows.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from diffusers import ZImageTransformer2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor
from torch import nn

from ..engine.layers import PatchProcessor, gather_tokens
from ..engine.state import ParallelState, Partition
from .base import (
    ModelAdapter,
    batch_slice,
    check_kwargs_dict,
    check_processor,
    install_forward,
    install_processor,
    refuse_inputs,
    strip_rows,
)

EXCHANGED = ("noise_refiner.", "layers.")
"""The attention blocks whose tokens include image tokens (the context and SigLIP refiners' do not)."""


class ZImageAdapter(ModelAdapter):
    models = (ZImageTransformer2DModel,)
    conditioning_args = ("cap_feats",)
    sample_arg = "x"
    timestep_arg = "t"
    output_dim = 3  # the output list, stacked: (batch, channels, frames, rows, columns)
    default_size = (1024, 1024)  # ZImagePipeline's default (the transformer's config has no sample_size)

    def noise_level(self, t: float) -> float:
        return -t  # ZImagePipeline passes (1000 - t) / 1000: rising over one image

    def check(self, model: nn.Module) -> None:
        patches, frames = tuple(model.config.all_patch_size), tuple(model.config.all_f_patch_size)
        if len(patches) != 1 or frames != (1,):
            raise TypeError(
                f"distrifusion: Z-Image with several patch sizes {patches} or frame patches {frames} is not supported "
                "(the published models have one patch size of 2 and frame patch 1)"
            )
        for name, module in model.named_modules():
            if isinstance(module, Attention):
                check_processor(name, module, (ZSingleStreamAttnProcessor,))

    def block_rows(self, model: nn.Module) -> int:
        return model.config.all_patch_size[0]

    def install(self, model: nn.Module, state: ParallelState) -> None:
        install_forward(model, StripPatchify, "patchify_and_embed", state, method="patchify_and_embed")
        for name, module in model.named_modules():
            if isinstance(module, Attention) and name.startswith(EXCHANGED):
                install_processor(module, state, partial(PatchZImageAttnProcessor, module, name, state))

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        images = inputs["x"]
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("distrifusion: Z-Image takes a list of latents (channels, frames, height, width)")
        if isinstance(images[0], (list, tuple)):
            raise ValueError(
                "distrifusion: Z-Image omni inputs (several images per sample, nested lists) cannot be split into "
                "strips: their reference images are not rows of the output; run them without distrifusion"
            )
        refuse_inputs("Z-Image", inputs, ["siglip_feats", "image_noise_mask"], "omni inputs are not rows of the image")
        refuse_inputs(
            "Z-Image", inputs, ["controlnet_block_samples"], "ControlNet residuals span the caption tokens as well"
        )
        check_kwargs_dict("Z-Image", inputs, "joint_attention_kwargs")
        shape = tuple(images[0].shape)
        if len(shape) != 4 or shape[1] != 1 or any(tuple(x.shape) != shape for x in images):
            raise ValueError(
                "distrifusion: Z-Image latents must be alike (channels, 1, height, width) tensors (one frame, the same "
                f"size for every sample); got {[tuple(x.shape) for x in images]}"
            )
        return len(images), shape[2], shape[3]

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        # The latents stay whole: StripPatchify patchifies the whole image, then keeps this strip's tokens.
        batch = batch_slice(partition)
        local = dict(inputs, x=list(inputs["x"][batch]), cap_feats=list(inputs["cap_feats"][batch]))
        t = inputs["t"]
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == partition.batch:
            local["t"] = t[batch]
        return local

    def sample_tensor(self, inputs: dict) -> torch.Tensor:
        return torch.stack(list(inputs["x"]))

    def output_tensor(self, sample) -> torch.Tensor:
        return torch.stack(list(sample))

    def output_sample(self, full: torch.Tensor):
        return list(full.unbind(0))


class StripPatchify:
    """Z-Image's `patchify_and_embed` for a strip: the model's own code on the whole image (positions,
    and the pad tokens that make each sample's image sequence a multiple of 32, are the whole image's),
    then this strip's image tokens and every pad token are kept, and the size is the strip's (so the
    model unpatchifies the strip's rows)."""

    def __init__(self, model: nn.Module, name: str, state: ParallelState) -> None:
        self.model, self.name, self.state = model, name, state

    def __call__(self, all_image, all_cap_feats, patch_size: int, f_patch_size: int):
        out = type(self.model).patchify_and_embed(self.model, all_image, all_cap_feats, patch_size, f_patch_size)
        if not self.state.split:
            return out
        images, captions, sizes, image_ids, caption_ids, image_pads, caption_pads = out
        partition = self.state.partition
        first, last = strip_rows(partition)
        per_row = partition.width // patch_size
        start, end = first // patch_size * per_row, last // patch_size * per_row
        tokens = partition.height // patch_size * per_row  # the image's own tokens; the pad tokens follow

        def keep(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[start:end], t[tokens:]])

        sizes = [(frames, last - first, width) for frames, _, width in sizes]
        return (
            [keep(t) for t in images],
            captions,
            sizes,
            [keep(t) for t in image_ids],
            caption_ids,
            [keep(t) for t in image_pads],
            caption_pads,
        )


class PatchZImageAttnProcessor(PatchProcessor):
    """Z-Image's attention (`ZSingleStreamAttnProcessor`) with the image in strips: a rank's sequence is
    [its strip's image tokens, other tokens (image pad tokens; in the main layers the caption and its
    pad)], and the keys/values are [every strip's image tokens in image order, this rank's other
    tokens]: the one-process order. Image keys/values are exchanged after RoPE (this strip's fresh, the
    others' fresh in a synchronous step and a step old in a displaced one); the mask over the other
    tokens (the batch's samples differ in caption length) is the model's."""

    def __init__(self, attn: nn.Module, name: str, state: ParallelState, original) -> None:
        self.name, self.state, self.original = name, state, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        state = self.state
        if not state.split:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        partition = state.partition
        n_image = partition.rows[partition.patch_rank] // partition.block * (partition.width // partition.block)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (p.unflatten(-1, (attn.heads, -1)) for p in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        kv = torch.cat([key, value], -1).flatten(2)  # (batch, tokens, heads * 2 * head_dim)
        image_kv = kv[:, :n_image]
        if not state.naive:
            image_kv = gather_tokens(state, self.name, image_kv, state.sizes(n_image))
        n_keys = image_kv.shape[1]
        key, value = torch.cat([image_kv, kv[:, n_image:]], 1).unflatten(-1, (attn.heads, -1)).chunk(2, -1)
        mask = None
        if attention_mask is not None:  # (batch, tokens), True = attend: the image tokens always are
            image = attention_mask.new_ones(attention_mask.shape[0], n_keys)
            mask = torch.cat([image, attention_mask[:, n_image:]], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:  # dropout
            out = attn.to_out[1](out)
        return out


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary embedding, as its processor applies it (complex product in float32)."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis.unsqueeze(2)
    return torch.view_as_real(rotated).flatten(3).type_as(x)
