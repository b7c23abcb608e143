"""Tiny random-weight diffusers pipelines (no downloads) and the calls the pipeline tests make.

Every pipeline runs in float64 unless a caller converts it; the CLIP tokenizer is written from a
minimal byte-level vocabulary.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from helpers import BLOCK, CONFIGS, TEXT_DIM, tiny_model
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from distrifusion.measure.workload import byte_tokenizer

DTYPE = torch.float64
STEPS = 3
TEXT_LEN = 12  # enough for the prompt: one token per byte, plus start and end
PROMPT, NEGATIVE = "a red cat", "blurry"
# Latent sizes (height, width). The tiny UNets have three levels (a block of BLOCK = 4 latent rows):
# 5 blocks split 3+2 over 2 ranks; 3 blocks split 2+1. Non-square on purpose.
SD_LATENT = (5 * BLOCK, 3 * BLOCK)
DDIM_SIZES = [(5 * BLOCK, 3 * BLOCK), (3 * BLOCK, 4 * BLOCK)]
VAE_FACTOR = 2  # the tiny VAE has two levels
SD_SIZE = (SD_LATENT[0] * VAE_FACTOR, SD_LATENT[1] * VAE_FACTOR)  # 40 x 24 pixels, multiples of 8


# ----------------------------------------------------------------------------- tiny pipelines


def _perturb_constants(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb constant parameters (norm affines, zero-initialised convs) so every path matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or torch.all(p == p.flatten()[0]):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges (every byte a token), TEXT_LEN tokens long."""
    return byte_tokenizer(TEXT_LEN)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, **kwargs) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=TEXT_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=32,
    )


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_ddim() -> DDIMPipeline:
    """An unconditional pixel-space UNet2DModel (the helpers' "unet2d" without class embeddings)."""
    torch.manual_seed(0)
    config = {k: v for k, v in CONFIGS["unet2d"].items() if k != "num_class_embeds"}
    unet = _perturb_constants(UNet2DModel(sample_size=DDIM_SIZES[0], **config).to(DTYPE).eval())
    # The output images are clamped to [0, 1], which would hide errors where they saturate. With a
    # random epsilon-predicting UNet ~90% of pixels saturate; with v-prediction and no x0 clipping
    # ~90% stay inside (the test checks that most do).
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=False, prediction_type="v_prediction"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd() -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_DIM)).eval()
    vae = tiny_vae().eval()
    unet = tiny_model("sd15", dtype=DTYPE, seed=1)  # cross_attention_dim == TEXT_DIM
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=DTYPE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl() -> StableDiffusionXLPipeline:
    """Two text encoders whose penultimate hidden states concatenate to the UNet's cross-attention
    width (8 + 8 = TEXT_DIM), the second one's projection (16) feeding the pooled text embedding."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    half = TEXT_DIM // 2
    text_encoder = CLIPTextModel(_text_config(tokenizer, half)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, half, projection_dim=16)).eval()
    vae = tiny_vae().eval()
    unet = tiny_model("sdxl", dtype=DTYPE, seed=1)  # projection_class_embeddings_input_dim = 16 + 6 * 8
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        add_watermarker=False,
    ).to(dtype=DTYPE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- calls


def run_ddim(pipe: DDIMPipeline, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """DDIMPipeline takes its size from the UNet's config, so a new size is set there."""
    pipe.unet.register_to_config(sample_size=size)
    gen = torch.Generator().manual_seed(seed)
    return pipe(generator=gen, num_inference_steps=STEPS, output_type="pt").images


def run_text(pipe, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A guided text-to-image call (guidance > 1: the UNet sees the CFG batch of 2); `kwargs` go to
    the pipeline.

    Returns the final latent (unclamped, straight from the denoising loop) and the decoded image.
    """
    final = {}

    def keep_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    kwargs = {"height": SD_SIZE[0], "width": SD_SIZE[1], **kwargs}
    image = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        callback_on_step_end=keep_latents,
        **kwargs,
    ).images
    return final["latents"], image


def tiny_img2img():
    """The tiny SD pipeline's components in an image-to-image pipeline: the VAE encodes too."""
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**tiny_sd().components)


def run_img2img(pipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a smooth image, denoise from strength 0.7, decode. Returns (encoded latent, image)."""
    rows = torch.linspace(0, 1, SD_SIZE[0], dtype=DTYPE)[:, None]
    cols = torch.linspace(0, 1, SD_SIZE[1], dtype=DTYPE)[None, :]
    init = torch.stack(torch.broadcast_tensors(rows * cols, rows, cols))[None]
    with torch.no_grad():
        encoded = pipe.vae.encode(init * 2 - 1).latent_dist.mean
    image = pipe(
        PROMPT,
        image=init,
        strength=0.7,
        num_inference_steps=STEPS + 1,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    return encoded, image


# ----------------------------------------------------------------------------- pipeline variants
# (SDXL base + refiner hand-off, SDXL inpainting, T2I-Adapter; used by test_pipeline_variants.py)

HANDOFF_STEPS = 4  # DDIM timesteps 751, 501, 251, 1: the base runs the first two, the refiner the rest
HANDOFF = 0.6  # denoising_end of the first pipeline = denoising_start of the second
AESTHETIC_IDS = 5  # the refiner's time ids: original size (2), crop (2), aesthetic score (1)


def tiny_refiner_unet(in_channels: int = 4, seed: int = 2) -> UNet2DConditionModel:
    """The SDXL refiner's UNet made small, as `tiny_model("sdxl")` makes the base's.

    The published refiner (stabilityai/stable-diffusion-xl-refiner-1.0) has down blocks
    DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D (up blocks mirrored),
    `addition_embed_type="text_time"` with 5 time ids (the aesthetic score among them:
    projection_class_embeddings_input_dim 2560 = 1280 + 5 * 256) and cross-attention on
    text_encoder_2's hidden states alone (cross_attention_dim 1280). Here three levels keep the
    block of 4 latent rows of the other tiny UNets (one cross-attention level fewer), and the
    widths follow the tiny text_encoder_2 (hidden 8, projection 16).
    """
    torch.manual_seed(seed)
    half = TEXT_DIM // 2
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=half,
        transformer_layers_per_block=(1, 2, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + AESTHETIC_IDS * 8,
    )
    return _perturb_constants(unet.to(DTYPE).eval())


def tiny_sdxl_refiner(base, cls=None):
    """A refiner pipeline (`cls`: StableDiffusionXLImg2ImgPipeline by default, or the inpainting
    one) sharing the base's VAE and second text encoder, as the diffusers docs build it; no first
    text encoder, aesthetic-score time ids."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    cls = cls or StableDiffusionXLImg2ImgPipeline
    pipe = cls(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=tiny_refiner_unet(),
        scheduler=sd_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    ).to(dtype=DTYPE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_inpaint(in_channels: int = 4):
    """The tiny SDXL pipeline's components in StableDiffusionXLInpaintPipeline; with 9 input channels
    (latent, mask, masked-image latent) a dedicated inpainting UNet of the same architecture."""
    from diffusers import StableDiffusionXLInpaintPipeline

    components = tiny_sdxl().components
    if in_channels != 4:
        torch.manual_seed(3)
        unet = UNet2DConditionModel(sample_size=16, in_channels=in_channels, out_channels=4, **CONFIGS["sdxl"])
        components["unet"] = _perturb_constants(unet.to(DTYPE).eval())
    pipe = StableDiffusionXLInpaintPipeline(**components).to(dtype=DTYPE)
    # With force_upcast (AutoencoderKL's default) the inpainting pipeline encodes its images in float32
    # whatever the VAE's dtype, which would bound the comparison at float32 rounding (~1e-7).
    pipe.vae.register_to_config(force_upcast=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t2i_adapter(xl: bool):
    """A random-weight T2IAdapter whose features match the tiny UNets' levels. SD ("full_adapter"):
    16, 32, 32 channels at 1, 1/2, 1/4 of the latent (added at the end of each down block's
    resnets). SDXL ("full_adapter_xl"): 16, 32, 32, 32 channels at 1/2, 1/2, 1/4, 1/4 (after the first
    block's downsampler, in the cross-attention blocks, and in the mid block)."""
    from diffusers import T2IAdapter

    torch.manual_seed(4)
    adapter = T2IAdapter(
        in_channels=3,
        channels=[16, 32, 32, 32] if xl else [16, 32, 32],
        num_res_blocks=1,
        downscale_factor=2 * VAE_FACTOR if xl else VAE_FACTOR,
        adapter_type="full_adapter_xl" if xl else "full_adapter",
    )
    return _perturb_constants(adapter.to(DTYPE).eval())


def tiny_sd_adapter():
    from diffusers import StableDiffusionAdapterPipeline

    base = tiny_sd()
    pipe = StableDiffusionAdapterPipeline(
        **{k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        adapter=tiny_t2i_adapter(xl=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=DTYPE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_adapter():
    from diffusers import StableDiffusionXLAdapterPipeline

    base = tiny_sdxl()
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    pipe = StableDiffusionXLAdapterPipeline(
        **{k: getattr(base, k) for k in names}, adapter=tiny_t2i_adapter(xl=True)
    ).to(dtype=DTYPE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cond_image() -> torch.Tensor:
    """A smooth (1, 3, H, W) image in [0, 1] of SD_SIZE."""
    rows = torch.linspace(0, 1, SD_SIZE[0], dtype=DTYPE)[:, None]
    cols = torch.linspace(0, 1, SD_SIZE[1], dtype=DTYPE)[None, :]
    return torch.stack(torch.broadcast_tensors(rows * cols, rows, cols))[None]


def inpaint_mask() -> torch.Tensor:
    """A (1, 1, H, W) mask: a rectangle to repaint that crosses the strips' borders."""
    mask = torch.zeros(1, 1, *SD_SIZE, dtype=DTYPE)
    mask[..., SD_SIZE[0] // 4 : 3 * SD_SIZE[0] // 4, SD_SIZE[1] // 4 :] = 1
    return mask


def _guided(pipe, steps: int, seed: int, old_callback: bool = False, **kwargs):
    """A guided call that also returns its final latent (straight from the denoising loop).
    `old_callback`: the pipeline takes `callback(step, timestep, latents)`, not `callback_on_step_end`."""
    final = {}

    def keep_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    def keep(step, timestep, latents):
        final["latents"] = latents.clone()

    if old_callback:
        kwargs["callback"] = keep
    else:
        kwargs["callback_on_step_end"] = keep_latents
    images = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images
    return final["latents"], images


def run_handoff(base, refiner, **image_kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base with denoising_end=HANDOFF (latent output) into the refiner with denoising_start=HANDOFF.

    `image_kwargs` (e.g. image and mask_image for inpainting) go to the base; the refiner gets the
    base's latent as its image (and the same mask_image). Returns (hand-off latent, refiner's final
    latent, decoded image)."""
    size = dict(height=SD_SIZE[0], width=SD_SIZE[1])
    _, handed = _guided(base, HANDOFF_STEPS, 0, denoising_end=HANDOFF, output_type="latent", **size, **image_kwargs)
    refine_kwargs = {k: v for k, v in image_kwargs.items() if k == "mask_image"}
    latents, image = _guided(
        refiner, HANDOFF_STEPS, 1, image=handed, denoising_start=HANDOFF, output_type="pt", **size, **refine_kwargs
    )
    return handed, latents, image


def run_inpaint_from(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Inpainting of the pixel test image from denoising_start=HANDOFF (no noise added: the loop starts
    from the encoded image). Returns (final latent, image)."""
    return _guided(
        pipe,
        HANDOFF_STEPS,
        0,
        image=cond_image(),
        mask_image=inpaint_mask(),
        denoising_start=HANDOFF,
        height=SD_SIZE[0],
        width=SD_SIZE[1],
        output_type="pt",
    )


def run_adapter(pipe, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A guided T2I-Adapter call conditioned on the test image. Returns (final latent, image)."""
    size = dict(height=SD_SIZE[0], width=SD_SIZE[1])
    # The T2I-Adapter pipelines take the older callback.
    return _guided(pipe, STEPS, 0, old_callback=True, image=cond_image(), output_type="pt", **size, **kwargs)
