"""Tiny random-weight pipelines of the newer image transformers (no downloads): Qwen-Image and
Qwen-Image-Edit, Flux.2 (dev-like, with distilled guidance) and Flux.2 klein (CFG by a second call),
Flux.1 Kontext; the calls the tests make, in float32.

Text encoders: Kontext's CLIP and T5, Qwen-Image's Qwen2.5-VL (text only: one layer of width 32, a
one-block vision tower it does not use) and klein's Qwen3 (3 layers of width 16, stacked to 48, with a
plain chat template) are built tiny in memory, with the byte-level tokenizer of `pipeline_helpers`
(Qwen-Image's prompt template then makes ~170 tokens after the pipeline drops its fixed 34: longer text
than with Qwen's tokenizer, the same code path). Qwen-Image-Edit's encoder (Qwen2.5-VL reading the
condition image through its processor) and Flux.2-dev's Mistral-3 are not built: those pipelines take
their prompt embeddings (and Qwen-Image-Edit's text mask) prepared, the way their `prompt_embeds`
arguments allow, so everything after the text encoder runs as in use (latents, reference-image
encoding, the scheduler, guidance, the VAE's decode).

Qwen-Image-Edit resizes its condition image to about 1024 x 1024 pixels (`calculate_dimensions`), which
would make 4096 reference tokens: `edit_pipeline` makes that module function return 48 x 64 instead (in
whichever process builds the pipeline).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxKontextPipeline,
    QwenImageEditPipeline,
    QwenImagePipeline,
)
from pipeline_helpers import _text_config, tiny_tokenizer, tiny_vae
from transformer_helpers import POOLED_DIM, TEXT_DIM, tiny_transformer
from transformers import CLIPTextModel, T5Config, T5EncoderModel

DTYPE = torch.float32
STEPS = 4
HEIGHT, WIDTH = 80, 64  # Qwen-Image and Flux.2: 5 x 4 tokens of 16 px (uneven strips over 2 and 3 ranks)
KONTEXT_SIZE = (20, 16)  # the tiny Kontext VAE halves once: 5 x 4 tokens of 4 px
PIPELINES = ["qwen", "qwen_edit", "flux2", "flux2_ref", "klein", "kontext"]


def _prompts(batch: int, seed: int = 0) -> dict:
    """Prompt embeddings of `batch` prompts and of negative ones, with Qwen-Image's masks: the first prompt
    has 4 of 7 tokens (padding, as a batch of prompts of different lengths has), the second negative 3 of 5."""
    g = torch.Generator().manual_seed(seed)
    mask, negative_mask = torch.ones(batch, 7, dtype=torch.long), torch.ones(batch, 5, dtype=torch.long)
    mask[0, 4:] = 0
    negative_mask[-1, 3:] = 0
    return dict(
        prompt_embeds=torch.randn(batch, 7, TEXT_DIM, generator=g, dtype=DTYPE),
        prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.randn(batch, 5, TEXT_DIM, generator=g, dtype=DTYPE),
        negative_prompt_embeds_mask=negative_mask,
    )


def condition_image(height: int = 64, width: int = 48) -> PIL.Image.Image:
    pixels = np.random.RandomState(0).rand(height, width, 3) * 255
    return PIL.Image.fromarray(pixels.astype(np.uint8))


def _qwen_vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(1)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return vae.to(DTYPE).eval()


def _flux2_vae() -> AutoencoderKLFlux2:
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32
    )
    return vae.to(DTYPE).eval()


def _qwen_text_encoder():
    """Qwen-Image's text encoder, tiny: Qwen2.5-VL with a text model of one layer of width `TEXT_DIM`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2)
    text.update(num_key_value_heads=1, intermediate_size=64, max_position_embeddings=1024)
    text.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=tokenizer.bos_token_id)
    text.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=TEXT_DIM)
    torch.manual_seed(3)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    return model.to(DTYPE).eval(), tokenizer


def _qwen3_text_encoder():
    """Flux.2 klein's text encoder, tiny: Qwen3 with 3 layers of width 16 (the pipeline stacks the three)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(4)
    return Qwen3ForCausalLM(config).to(DTYPE).eval(), tokenizer


def build(name: str):
    """A tiny pipeline (a new one each call: every rank and the reference get their own)."""
    if name in ("qwen", "qwen_edit"):
        transformer = tiny_transformer("qwen", dtype=DTYPE)
        if name == "qwen":
            encoder, tokenizer = _qwen_text_encoder()
            pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), _qwen_vae(), encoder, tokenizer, transformer)
        else:
            import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit

            edit.calculate_dimensions = lambda area, ratio: (48, 64, None)  # width, height: see the docstring
            pipe = QwenImageEditPipeline(FlowMatchEulerDiscreteScheduler(), _qwen_vae(), None, None, None, transformer)
    elif name in ("flux2", "flux2_ref"):
        transformer = tiny_transformer("flux2", dtype=DTYPE, guidance_embeds=True)  # FLUX.2-dev: distilled guidance
        pipe = Flux2Pipeline(FlowMatchEulerDiscreteScheduler(), _flux2_vae(), None, None, transformer)
    elif name in ("klein", "klein_kv"):
        encoder, tokenizer = _qwen3_text_encoder()
        transformer = tiny_transformer("flux2", dtype=DTYPE, joint_attention_dim=48)  # klein base: CFG by a 2nd call
        cls = Flux2KleinPipeline if name == "klein" else Flux2KleinKVPipeline  # KV: not supported
        pipe = cls(FlowMatchEulerDiscreteScheduler(), _flux2_vae(), encoder, tokenizer, transformer)
    elif name == "kontext":
        tokenizer = tiny_tokenizer()
        torch.manual_seed(2)
        clip = CLIPTextModel(_text_config(tokenizer, POOLED_DIM)).to(DTYPE).eval()  # pooled: CLIP's width
        t5 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
        )
        transformer = tiny_transformer("flux", dtype=DTYPE)
        torch.manual_seed(1)
        config = {k: v for k, v in tiny_vae().config.items() if not k.startswith("_")}
        vae = AutoencoderKL(**{**config, "shift_factor": 0.1}).to(DTYPE).eval()  # Flux's VAEs shift their latents
        scheduler = FlowMatchEulerDiscreteScheduler()
        pipe = FluxKontextPipeline(scheduler, vae, clip, tokenizer, t5.to(DTYPE).eval(), tokenizer, transformer)
    else:
        raise ValueError(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, name: str) -> torch.Tensor:
    """The decoded image(s), (batch, 3, height, width) in [0, 1], of a fixed seed."""
    kwargs = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), output_type="pt")
    if name == "qwen":  # two prompts of different lengths (the pipeline pads one: a text mask) and true CFG
        kwargs.update(prompt=["a red cat", "a blue dog in deep snow"], negative_prompt=["blurry", "dark"])
        kwargs.update(true_cfg_scale=4.0, height=HEIGHT, width=WIDTH)
    elif name == "qwen_edit":  # the same, with prepared embeddings and a reference image
        kwargs.update(_prompts(2), true_cfg_scale=4.0, height=HEIGHT, width=WIDTH, image=condition_image())
    elif name in ("flux2", "flux2_ref"):
        kwargs.update(prompt_embeds=_prompts(1)["prompt_embeds"], height=HEIGHT, width=WIDTH, guidance_scale=3.0)
        if name == "flux2_ref":
            kwargs["image"] = [condition_image(64, 64)]  # Flux.2's smallest reference
    elif name == "klein":  # through its text encoder: the prompt, and "" as the negative one (CFG by a 2nd call)
        kwargs.update(prompt="a red cat", image=[condition_image(64, 64)], height=HEIGHT, width=WIDTH)
        kwargs.update(guidance_scale=4.0, max_sequence_length=12, text_encoder_out_layers=(1, 2, 3))
    else:  # Kontext: the text through its tiny encoders, a reference image, true CFG
        height, width = KONTEXT_SIZE
        kwargs.update(prompt="a red cat", negative_prompt="blurry", true_cfg_scale=2.0, max_sequence_length=12)
        kwargs.update(image=condition_image(24, 16), height=height, width=width, max_area=height * width)
        kwargs["_auto_resize"] = False  # the reference as it is, not resized to about 1024 x 1024
    with torch.no_grad():
        return pipe(**kwargs).images
