"""Tiny random-weight SANA and Z-Image transformers and flow-matching loops that call them as their
pipelines do (on the full inputs: the engine splits them itself).

SANA: sin-cos positions on (`interpolation_scale`, as the 2K/4K models) at a size other than its
`sample_size` (so they are interpolated from the input's own height), the linear attention and the
Mix-FFN's 3x3 depthwise conv, a text mask with padding. Z-Image: captions of 7 and 37 tokens in one CFG
batch (padded to 32 and 64: the image positions differ between the two samples and the joint sequence
needs a key mask), 5 x 3 image tokens (15, padded to 32 with the learned pad token).
"""

from __future__ import annotations

import torch
from diffusers import SanaTransformer2DModel, ZImageTransformer2DModel
from pipeline_helpers import _perturb_constants, tiny_vae

from distrifusion.measure.workload import _bytes_to_unicode

ROWS, COLS = 5, 3
"""Split units (SANA: latent rows, patch 1; Z-Image: token rows of 2 latent rows): 3+2, 2+2+1, 2+1+1+1."""
SANA_TEXT, SANA_TEXT_DIM = 7, 24
ZIMAGE_CAPTIONS, ZIMAGE_CAP_DIM = (7, 37), 16


def _perturb(model: torch.nn.Module, dtype) -> torch.nn.Module:
    """Zero-initialised or constant parameters (pad tokens, norms) perturbed: they would hide paths."""
    return _perturb_constants(model.to(dtype).eval())


def tiny_sana(dtype=torch.float64, seed: int = 0, **overrides) -> SanaTransformer2DModel:
    """The published block structure (linear self-attention, text cross-attention, GLUMBConv Mix-FFN)
    at toy width; positions on, made for 8 x 8 latents (so a 5 x 3 input interpolates them)."""
    torch.manual_seed(seed)
    config = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=SANA_TEXT_DIM,
        sample_size=8,
        patch_size=1,
        interpolation_scale=2.0,
    )
    return _perturb(SanaTransformer2DModel(**{**config, **overrides}), dtype)


def tiny_zimage(dtype=torch.float64, seed: int = 0, **overrides) -> ZImageTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=ZIMAGE_CAP_DIM,
        axes_dims=[4, 6, 6],
        axes_lens=[128, 32, 32],
    )
    return _perturb(ZImageTransformer2DModel(**{**config, **overrides}), dtype)


def sana_inputs(batch: int, seed: int = 1, dtype=torch.float64) -> dict:
    """SANA's conditioning: text features and a mask whose last tokens are padding (one fewer per sample)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, SANA_TEXT, dtype=torch.long)
    for i in range(batch):
        mask[i, SANA_TEXT - 1 - i :] = 0
    return dict(
        encoder_hidden_states=torch.randn(batch, SANA_TEXT, SANA_TEXT_DIM, generator=g, dtype=dtype),
        encoder_attention_mask=mask,
    )


def zimage_captions(batch: int, seed: int = 1, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ZIMAGE_CAPTIONS[i % 2], ZIMAGE_CAP_DIM, generator=g, dtype=dtype) for i in range(batch)]


def call_sana(model, x: torch.Tensor, sigma: float, cond: dict) -> torch.Tensor:
    timestep = torch.full((x.shape[0],), sigma * 1000.0, dtype=x.dtype)
    return model(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]


def call_zimage(model, x: torch.Tensor, sigma: float, captions: list[torch.Tensor]) -> torch.Tensor:
    """As ZImagePipeline calls it: lists in and out, t = 1 - sigma; the pipeline negates the output."""
    t = torch.full((x.shape[0],), 1.0 - sigma, dtype=x.dtype)
    out = model(list(x.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def denoise(model, family: str, batch: int = 2, steps: int = 5, seed: int = 1, dtype=torch.float64, rows=ROWS):
    """Euler flow matching from noise; with batch 2 the halves are guidance branches (scale 3)."""
    g = torch.Generator().manual_seed(seed)
    scale = 1 if family == "sana" else 2
    x = torch.randn(1, 4, rows * scale, COLS * scale, generator=g, dtype=dtype)
    cond = sana_inputs(batch, seed, dtype) if family == "sana" else zimage_captions(batch, seed, dtype)
    call = call_sana if family == "sana" else call_zimage
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = call(model, x.expand(batch, *x.shape[1:]), s, cond)
            v = v[:1] + 3.0 * (v[1:] - v[:1]) if batch == 2 else v
            x = x + (s_next - s) * v
    return x


# ----------------------------------------------------------------------------- tiny pipelines

PROMPT, NEGATIVE = "a red cat", "blurry"
SANA_SIZE = (224, 128)
"""Pixels (SanaPipeline takes multiples of 32): the tiny DC-AE's 32x gives 7 x 4 latent cells (uneven strips:
4 + 3, 3 + 2 + 2)."""
ZIMAGE_SIZE = (36, 24)
"""Pixels: the tiny VAE halves them and Z-Image packs 2 x 2 latent cells: 9 x 6 tokens (54, padded to 64)."""
PIPELINE_STEPS = 4


def byte_tokenizer():
    """A tokenizer built in memory: one token per byte (byte-level BPE without merges), a beginning-of-text
    token, right padding, and a minimal chat template (what ZImagePipeline's prompt encoding calls)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special + _bytes_to_unicode())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        chat_template=template,
    )


def _text_config(tokenizer) -> dict:
    """What the tiny decoder-only text encoders share (their widths are the transformers' text widths)."""
    return dict(
        vocab_size=len(tokenizer),
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
    )


def tiny_sana_pipeline(dtype=torch.float64):
    """SanaPipeline: a tiny Gemma2 text encoder (its width is the transformer's caption_channels), a tiny
    DC-AE (AutoencoderDC with 6 levels of 8 channels: 32x, as the published one), flow-matching Euler steps."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(
        Gemma2Config(**_text_config(tokenizer), hidden_size=SANA_TEXT_DIM, num_hidden_layers=1)
    ).eval()
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock",) * 5 + ("EfficientViTBlock",),
        decoder_block_types=("ResBlock",) * 5 + ("EfficientViTBlock",),
        encoder_block_out_channels=(8,) * 6,
        decoder_block_out_channels=(8,) * 6,
        encoder_qkv_multiscales=((),) * 5 + ((5,),),
        decoder_qkv_multiscales=((),) * 5 + ((5,),),
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=tiny_sana(dtype, seed=1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    ).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_zimage_pipeline(dtype=torch.float64):
    """ZImagePipeline: a tiny Qwen3 text encoder (its width is the transformer's cap_feat_dim; the pipeline
    takes its second-to-last hidden states), a tiny AutoencoderKL with a shift factor, flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    # The pipeline takes the second-to-last hidden states: two layers, so that one runs.
    text_encoder = Qwen3Model(
        Qwen3Config(**_text_config(tokenizer), hidden_size=ZIMAGE_CAP_DIM, num_hidden_layers=2)
    ).eval()
    vae = tiny_vae().eval()
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)  # Z-Image's VAE has a shift factor
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_zimage(dtype, seed=1),
    ).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A guided call (the transformer sees a CFG batch of 2). Returns (final latent, decoded image)."""
    from diffusers import SanaPipeline

    final = {}

    def keep_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    sana = isinstance(pipe, SanaPipeline)
    height, width = SANA_SIZE if sana else ZIMAGE_SIZE
    extra = dict(complex_human_instruction=None, use_resolution_binning=False) if sana else {}
    image = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=height,
        width=width,
        num_inference_steps=PIPELINE_STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=48,
        output_type="pt",
        callback_on_step_end=keep_latents,
        **extra,
    ).images
    return final["latents"], image
