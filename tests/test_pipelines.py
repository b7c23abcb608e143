"""Parallelised diffusers *pipelines* against the same pipeline run in one process.

Every pipeline is built from tiny random-weight components (no downloads: the CLIP tokenizer is
written from a minimal byte-level vocabulary) and runs in float64, in `mode="sync"` or in
`mode="displaced"` with a warm-up covering every step, both of which are exact patch parallelism.
The only difference a correct implementation may show is float reduction order (strip-wise convs,
GroupNorm statistics merged from strips, attention over concatenated keys), measured at 1e-15 to 3e-15
of the output's scale here. The tolerance, 1e-9 of the output's scale, is far below anything a wrong halo,
a misplaced strip, a mis-sliced conditioning or state left over from an earlier call would give
(those are O(1e-2) or more).

All ranks' work for one world size is done in one launch (`rank_job`), in a module-scoped fixture.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DModel,
)
from helpers import BLOCK, CONFIGS, TEXT_DIM, run_ranks, tiny_model
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import distrifusion

DTYPE = torch.float64
STEPS = 3
TOL = 1e-9
TEXT_LEN = 12  # enough for the prompt: one token per byte, plus start and end
PROMPT, NEGATIVE = "a red cat", "blurry"
# Latent sizes (height, width). The tiny UNets have three levels (a block of BLOCK = 4 latent rows):
# 5 blocks split 3+2 over 2 ranks; 3 blocks split 2+1. Non-square on purpose.
SD_LATENT = (5 * BLOCK, 3 * BLOCK)
DDIM_SIZES = [(5 * BLOCK, 3 * BLOCK), (3 * BLOCK, 4 * BLOCK)]
VAE_FACTOR = 2  # the tiny VAE has two levels
SD_SIZE = (SD_LATENT[0] * VAE_FACTOR, SD_LATENT[1] * VAE_FACTOR)  # 40 x 24 pixels, multiples of 8

torch.set_num_threads(1)  # the reference runs in this process; the ranks set their own


# ----------------------------------------------------------------------------- tiny pipelines


def _perturb_constants(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb constant parameters (norm affines, zero-initialised convs) so every path matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or torch.all(p == p.flatten()[0]):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token (word-final bytes get `</w>`)."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(tokens)}, f)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=TEXT_LEN)


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


def run_text(pipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A guided text-to-image call (guidance > 1: the UNet sees the CFG batch of 2).

    Returns the final latent (unclamped, straight from the denoising loop) and the decoded image.
    """
    final = {}

    def keep_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return tensors

    image = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=SD_SIZE[0],
        width=SD_SIZE[1],
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        callback_on_step_end=keep_latents,
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


def _parallel(pipe, **config):
    distrifusion.remove(pipe)
    return distrifusion.parallelize(pipe, distrifusion.ParallelConfig(**config))


def rank_job(world_size: int) -> dict:
    """Everything the tests need from one world size, in one launch of the ranks."""
    out = {}
    if world_size == 2:
        pipe = _parallel(tiny_ddim(), mode="sync", split_cfg=False)
        for size in DDIM_SIZES:  # two sizes on the same parallelised pipeline...
            out["ddim", size] = run_ddim(pipe, size)
        out["ddim repeat"] = run_ddim(pipe, DDIM_SIZES[0])  # ...then the first again: no leftover state

        pipe = tiny_sd()
        _parallel(pipe, mode="sync", split_cfg=False)
        out["sd", "sync"] = run_text(pipe)
        _parallel(pipe, mode="displaced", warmup_steps=STEPS, split_cfg=False)
        out["sd", "displaced"] = run_text(pipe)

        out["sdxl", "sync"] = run_text(_parallel(tiny_sdxl(), mode="sync", split_cfg=False))
        out["img2img", "sync"] = run_img2img(_parallel(tiny_img2img(), mode="sync", split_cfg=False))
    else:  # 4 ranks: CFG halves on two groups of two, each group splitting the rows
        out["sd", "sync"] = run_text(_parallel(tiny_sd(), mode="sync", split_cfg="force"))
    return out


# ----------------------------------------------------------------------------- references and tests

WORLDS = [2, 4]


@pytest.fixture(scope="module", params=WORLDS)
def world(request):
    return request.param, run_ranks(request.param, rank_job, request.param)


_REFERENCES = {}


def reference(name: str):
    """The same pipeline, not parallelised, in this process."""
    if name not in _REFERENCES:
        if name == "ddim":
            pipe = tiny_ddim()
            _REFERENCES[name] = {size: run_ddim(pipe, size) for size in DDIM_SIZES}
        elif name == "img2img":
            _REFERENCES[name] = run_img2img(tiny_img2img())
        else:
            _REFERENCES[name] = run_text({"sd": tiny_sd, "sdxl": tiny_sdxl}[name]())
    return _REFERENCES[name]


def _check(result: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert result.shape == ref.shape and result.dtype == ref.dtype, what
    err = (result - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _needs(size: int, world_size: int) -> None:
    if size != world_size:
        pytest.skip(f"checked with {world_size} ranks")


def test_ddim_pipeline_two_sizes(world):
    """DDIMPipeline (unconditional UNet2DModel, batch 1): two sizes on one parallelised pipeline."""
    size, results = world
    _needs(size, 2)
    ref = reference("ddim")
    for hw in DDIM_SIZES:
        # The images are clamped to [0, 1]; the comparison means something only where they are not.
        inside = ((ref[hw] > 0) & (ref[hw] < 1)).double().mean().item()
        assert inside > 0.5, f"{hw}: only {inside:.0%} of the reference pixels are unclamped"
        assert ref[hw].shape[-2:] == hw
        for rank, result in enumerate(results):
            _check(result["ddim", hw], ref[hw], f"rank {rank}, size {hw}")


def test_ddim_pipeline_repeated_call_is_identical(world):
    """Each pipeline call restarts the step count: a repeated call (after another size) is bitwise the first."""
    size, results = world
    _needs(size, 2)
    for result in results:
        assert torch.equal(result["ddim repeat"], result["ddim", DDIM_SIZES[0]])


def test_img2img_pipeline_encodes_and_decodes_in_strips(world):
    """StableDiffusionImg2ImgPipeline: the VAE's encode (split) and the final image match."""
    size, results = world
    _needs(size, 2)
    encoded, image = reference("img2img")
    for rank, result in enumerate(results):
        rank_encoded, rank_image = result["img2img", "sync"]
        _check(rank_encoded, encoded, f"rank {rank}, img2img encoded latent")
        _check(rank_image, image, f"rank {rank}, img2img image")


@pytest.mark.parametrize("name,mode", [("sd", "sync"), ("sd", "displaced"), ("sdxl", "sync")])
def test_text_to_image_pipeline(world, name, mode):
    """StableDiffusion(XL)Pipeline with guidance: the final latent and the decoded image match."""
    size, results = world
    if (name, mode) not in results[0]:
        pytest.skip(f"not run with {size} ranks")
    latents, image = reference(name)
    assert latents.shape[-2:] == SD_LATENT and image.shape[-2:] == SD_SIZE
    for rank, result in enumerate(results):
        rank_latents, rank_image = result[name, mode]
        _check(rank_latents, latents, f"{size} ranks, rank {rank}, {name} {mode} latents")
        _check(rank_image, image, f"{size} ranks, rank {rank}, {name} {mode} image")


def test_ranks_agree(world):
    """Every rank returns bitwise the same outputs (the output gather is complete and ordered)."""
    _, results = world
    for rank, result in enumerate(results[1:], 1):
        assert result.keys() == results[0].keys()
        for key, value in results[0].items():
            values = value if isinstance(value, tuple) else (value,)
            others = result[key] if isinstance(value, tuple) else (result[key],)
            for a, b in zip(values, others):
                assert torch.equal(a, b), f"rank {rank} differs from rank 0 on {key}"
