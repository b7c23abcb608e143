"""HunyuanVideo-1.5 (`HunyuanVideo15Transformer3DModel`): a video in strips of whole token rows across all
frames, or of whole latent frames (`ParallelConfig.video_split`); joint attention of the video and text
tokens ([video, text], the shared `PatchJointAttnProcessor`, text sharded or replicated), the 3D rotary
positions of the whole video, cut to the strip.

Facts read in diffusers' `transformer_hunyuan_video15.py` (identical in 0.41.0 and 0.42.1):
- input (batch, channels, frames, height, width): the latent, the image condition and its mask in the
  channels; patches of (`patch_size_t`, `patch_size`, `patch_size`) by a Conv3d with kernel = stride (no
  halo; 1 x 1 x 1 in the released models); tokens ordered (frame, row, column);
- `HunyuanVideo15RotaryPosEmbed` builds (cos, sin) tables (tokens, head_dim) from its input's shape, from
  position 0 on every axis, and rotates the video's queries and keys only (not the text's);
- the text tokens are prepared before the blocks, from the whole inputs: a token refiner (masked
  self-attention among the prompt's MLLM tokens), a ByT5 projection, the image embeddings (text-to-video
  when `torch.all(image_embeds == 0)` over the whole batch: their tokens are then masked), joined per
  sample valid tokens first ([valid image, ByT5, MLLM, then the padded ones]); one (batch, text) mask goes
  to every block;
- a block's joint attention (`HunyuanVideo15AttnProcessor2_0`: q/k RMSNorm per head) masks padded text
  tokens as keys and as queries (a padded query's row is all masked); everything else in a block is per
  token (modulation per sample, feed-forwards), the text stream apart from the video's; only the video
  tokens reach the output.

How it is split: the text preparation runs whole on every rank (it is cheap beside the blocks). At the
first block each rank keeps the call's valid text tokens only, and with sharded text its share of them:
padded tokens are masked as keys in every block, so they never reach a video token, and what they compute
as queries is never used. Synchronous steps then compute what one process does, up to the order of sums.
A call whose samples have different numbers of valid text tokens (a per-sample layout needing a mask per
sample), or that mixes image-conditioned and text-only samples (the model decides for the whole batch, a
CFG half would decide for its own), is refused by name.
"""

from __future__ import annotations

from functools import partial

from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import (
    HunyuanVideo15AttnProcessor2_0,
    HunyuanVideo15TransformerBlock,
)
from torch import nn

from ..engine.layers import PatchJointAttnProcessor, image_rotary
from ..engine.state import ParallelState, Partition
from .base import check_kwargs_dict, check_processor, install_forward, install_processor, slice_batch
from .video import StripVideoRoPE, VideoAdapter, check_frame_count, check_video_convs

FAMILY = "HunyuanVideo-1.5"
_TEXT = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2")


class HunyuanVideo15Adapter(VideoAdapter):
    models = (HunyuanVideo15Transformer3DModel,)
    # Guidance branches: the pipelines call the model once per branch (prompt, negative prompt).
    conditioning_args = ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
    joint_text = True

    @staticmethod
    def model_patch(model: nn.Module) -> tuple[int, int, int]:
        cfg = model.config
        return cfg.patch_size_t, cfg.patch_size, cfg.patch_size

    def check_pipeline_call(self, pipe, arguments: dict) -> None:
        """The pipelines round a frame count that is not 1 + 4k, and a size that is not a multiple of the
        VAE's cell, down without a word: a parallel run refuses them, naming the nearest."""
        check_frame_count(pipe, arguments, f"a {FAMILY} video")
        factor = getattr(pipe, "vae_scale_factor_spatial", None)
        transformer = getattr(pipe, "transformer", None)
        if isinstance(factor, int) and transformer is not None:
            cell = factor * transformer.config.patch_size
            for side in ("height", "width"):
                value = arguments.get(side)
                if isinstance(value, int) and value % cell:
                    below = value // cell * cell
                    raise ValueError(
                        f"distrifusion: {side}={value}: a {FAMILY} video's {side} is a multiple of {cell} px (its "
                        f"VAE's {factor} px per latent cell); use {below or cell} or {below + cell}"
                    )

    def check(self, model: nn.Module) -> None:
        # The token refiner's attentions see the text alone: computed whole on every rank, any processor.
        for name, module in model.named_modules():
            if isinstance(module, HunyuanVideo15TransformerBlock):
                check_processor(f"{name}.attn", module.attn, (HunyuanVideo15AttnProcessor2_0,))
        check_video_convs(model)

    def install(self, model: nn.Module, state: ParallelState) -> None:
        install_forward(model.rope, HunyuanStripRoPE, "rope", state)
        for name, module in model.named_modules():
            if isinstance(module, HunyuanVideo15TransformerBlock):
                install_forward(module, ValidTextBlock, name, state)
                make = partial(
                    PatchJointAttnProcessor,
                    module.attn,
                    f"{name}.attn",
                    state,
                    text_first=False,
                    text_in_hidden=False,
                    split_rotary=image_rotary,
                )
                install_processor(module.attn, state, make)

    def grid(self, inputs: dict) -> tuple[int, int, int]:
        video = inputs["hidden_states"]
        if video.dim() != 5:
            raise ValueError(
                f"distrifusion: {FAMILY} expects a video (batch, channels, frames, height, width), got "
                f"{tuple(video.shape)}"
            )
        check_kwargs_dict(FAMILY, inputs, "attention_kwargs")  # here: before the ranks' first collective
        valid_text_tokens(inputs)  # refuses a text layout that cannot be split
        return self.video_grid(video.shape[0], *video.shape[2:])

    def text_tokens(self, inputs: dict) -> int:
        return valid_text_tokens(inputs)

    def local_inputs(self, inputs: dict, partition: Partition) -> dict:
        local = {k: slice_batch(v, partition) for k, v in inputs.items()}
        start, length = partition.row_start, partition.rows[partition.patch_rank]
        local["hidden_states"] = local["hidden_states"].narrow(self.axis.dim, start, length)
        return local  # the text whole: its blocks keep the valid tokens (`ValidTextBlock`)


def valid_text_tokens(inputs: dict) -> int:
    """The text tokens that the blocks attend to (unmasked), the same in every sample of the call, as the
    model lays them out: the valid MLLM and ByT5 tokens, and the image tokens unless every sample's image
    embeddings are zero (text-to-video). Refuses what cannot be split exactly, on every rank alike."""
    missing = [name for name in (*_TEXT, "image_embeds") if inputs.get(name) is None]
    if missing:
        raise ValueError(
            f"distrifusion: {FAMILY} needs {', '.join(missing)} (its pipelines pass them all: for a prompt without "
            "quoted text a zero ByT5 embedding and mask, for text-to-video zero image embeddings)"
        )
    image = inputs["image_embeds"]
    masks = [inputs["encoder_attention_mask"], inputs["encoder_attention_mask_2"]]
    if image.device.type == "meta":  # a shape-only run: every token counts
        return inputs["encoder_hidden_states"].shape[1] + inputs["encoder_hidden_states_2"].shape[1] + image.shape[1]
    blank = (image == 0).flatten(1).all(1)
    if blank.any() and not blank.all():
        raise ValueError(
            f"distrifusion: {FAMILY} image_embeds are zero in some samples of the call and not in others: the model "
            "decides text-to-video or image-to-video for the whole batch, which a split batch cannot keep; pass "
            "samples of one kind per call"
        )
    counts = sum((mask != 0).sum(1) for mask in masks) + (0 if blank.all() else image.shape[1])
    if counts.min() != counts.max():
        raise ValueError(
            f"distrifusion: {FAMILY} samples of one call with different numbers of valid text tokens "
            f"({counts.tolist()}) cannot be split (their text layout differs per sample); call the model once per "
            "prompt (as its pipelines do for the prompt and the negative prompt)"
        )
    return int(counts[0])


class ValidTextBlock:
    """A HunyuanVideo-1.5 joint block given only the call's valid text tokens (the first ones of every sample,
    as the model orders them), this rank's share of them with sharded text, and no mask: padded tokens are
    masked as keys in every block, so they never reach a video token. The first block cuts the text; the
    next ones get its cut text back (and the model's full mask again, which they no longer need)."""

    def __init__(self, block: nn.Module, name: str, state: ParallelState) -> None:
        self.block, self.name, self.state = block, name, state

    def __call__(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, *args, **kwargs):
        block, state = self.block, self.state
        if state.split and attention_mask is not None:
            if encoder_hidden_states.shape[1] == attention_mask.shape[1]:  # the model's whole text
                partition = state.partition
                rank = partition.patch_rank
                start = sum(partition.text[:rank]) if partition.sharded_text else 0
                encoder_hidden_states = encoder_hidden_states[:, start : start + partition.text[rank]]
            attention_mask = None
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, attention_mask, *args, **kwargs)


class HunyuanStripRoPE(StripVideoRoPE):
    """HunyuanVideo-1.5's 3D rotary tables (`HunyuanVideo15RotaryPosEmbed`: (tokens, head_dim) each) for one
    strip."""

    token_dim = 0

    def patch(self) -> tuple[int, int, int]:
        return self.rope.patch_size_t, self.rope.patch_size, self.rope.patch_size
