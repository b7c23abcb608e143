"""Pipelines that call the denoiser in less common ways, parallelised in `mode="sync"`, against the same
pipeline run in one process:

* SDXL base with `denoising_end` (latent output) handed to the refiner (StableDiffusionXLImg2ImgPipeline
  with `denoising_start`): a tiny version of the refiner's UNet (aesthetic-score time ids, only
  text_encoder_2), both pipelines parallelised and sharing the VAE and the second text encoder;
* StableDiffusionXLInpaintPipeline: the same hand-off with a 4-channel UNet (the pipeline blends the
  known region back after every step), and a 9-channel inpainting UNet (latent, mask and masked-image
  latent concatenated) from `denoising_start`;
* T2I-Adapter (StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline): the adapter's
  features reach the UNet as `down_intrablock_additional_residuals`, spatial maps at every level, which
  each rank must cut to its strip.

As in test_pipelines.py, everything runs in float64 and the tolerance is 1e-9 of the output's scale
(float reduction order gives ~1e-15; a mis-sliced map or conditioning gives O(1e-2) or more). All
parallel runs of one world size are one launch of the ranks (`rank_job`), in a module-scoped fixture;
3 ranks split the 5 blocks of latent rows unevenly (2 + 2 + 1).
"""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from helpers import run_ranks
from pipeline_helpers import (
    SD_LATENT,
    SD_SIZE,
    cond_image,
    inpaint_mask,
    run_adapter,
    run_handoff,
    run_inpaint_from,
    tiny_sd_adapter,
    tiny_sdxl,
    tiny_sdxl_adapter,
    tiny_sdxl_inpaint,
    tiny_sdxl_refiner,
)

import distrifusion

TOL = 1e-9
TOL_FLOAT32 = 1e-6  # StableDiffusionAdapterPipeline decodes to a float32 numpy image
torch.set_num_threads(1)  # the reference runs in this process; the ranks set their own


# ----------------------------------------------------------------------------- the cases


def _handoff():
    base = tiny_sdxl()
    return base, tiny_sdxl_refiner(base)


def _inpaint_handoff():
    base = tiny_sdxl_inpaint()
    return base, tiny_sdxl_refiner(base, StableDiffusionXLInpaintPipeline)


def _as_tensor(images):
    return torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images


def _adapter(pipe):
    latents, images = run_adapter(pipe)
    return latents, _as_tensor(images)


# name: (build the pipelines, run them given the pipelines)
CASES = {
    "handoff": (_handoff, lambda pipes: run_handoff(*pipes)),
    "inpaint handoff": (
        _inpaint_handoff,
        lambda pipes: run_handoff(*pipes, image=cond_image(), mask_image=inpaint_mask(), strength=1.0),
    ),
    "inpaint 9ch": (lambda: (tiny_sdxl_inpaint(9),), lambda pipes: run_inpaint_from(*pipes)),
    "sd adapter": (lambda: (tiny_sd_adapter(),), lambda pipes: _adapter(*pipes)),
    "sdxl adapter": (lambda: (tiny_sdxl_adapter(),), lambda pipes: _adapter(*pipes)),
}
WORLD_CASES = {2: list(CASES), 3: ["handoff", "sdxl adapter"]}


# ----------------------------------------------------------------------------- parallel runs


def rank_job(world_size: int) -> dict:
    """Every case of one world size, in one launch of the ranks. A case that raises leaves its
    traceback (as a string) instead of its outputs, so that the other cases still run."""
    out = {}
    config = distrifusion.ParallelConfig(mode="sync", split_cfg=False)
    for name in WORLD_CASES[world_size]:
        build, run = CASES[name]
        try:
            pipes = build()
            for pipe in pipes:  # a refiner shares the base's VAE, which is split once
                distrifusion.parallelize(pipe, config)
            out[name] = run(pipes)
        except Exception:
            out[name] = traceback.format_exc()
    return out


# ----------------------------------------------------------------------------- references and tests


@pytest.fixture(scope="module", params=sorted(WORLD_CASES))
def world(request):
    return request.param, run_ranks(request.param, rank_job, request.param)


_REFERENCES = {}


def reference(name: str):
    """The same pipelines, not parallelised, in this process."""
    if name not in _REFERENCES:
        build, run = CASES[name]
        _REFERENCES[name] = run(build())
    return _REFERENCES[name]


def _check(result: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> float:
    assert result.shape == ref.shape and result.dtype == ref.dtype, what
    err = (result - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"
    return err / scale


def _results(world, name: str) -> list:
    size, results = world
    if name not in WORLD_CASES[size]:
        pytest.skip(f"not run with {size} ranks")
    for rank, result in enumerate(results):
        if isinstance(result[name], str):
            pytest.fail(f"{size} ranks, rank {rank}, {name} raised:\n{result[name]}")
    return [result[name] for result in results]


def _compare(world, name: str, labels: tuple[str, ...], tols: tuple[float, ...] | None = None) -> None:
    size = world[0]
    results = _results(world, name)
    refs = reference(name)
    tols = tols or (TOL,) * len(labels)
    for rank, outputs in enumerate(results):
        for label, out, ref, tol in zip(labels, outputs, refs, tols):
            _check(out, ref, f"{size} ranks, rank {rank}, {name} {label}", tol)


def test_sdxl_base_to_refiner_handoff(world):
    """SDXL base (denoising_end=0.6, latent output) into a refiner StableDiffusionXLImg2ImgPipeline
    (denoising_start=0.6): the hand-off latent, the refiner's final latent and the image match."""
    handed, latents, image = reference("handoff")
    assert handed.shape[-2:] == latents.shape[-2:] == SD_LATENT and image.shape[-2:] == SD_SIZE
    assert (latents - handed).abs().max() > 1e-2 * handed.abs().max()  # the refiner did denoise
    _compare(world, "handoff", ("hand-off latent", "final latent", "image"))


def test_sdxl_inpaint_handoff(world):
    """StableDiffusionXLInpaintPipeline (4-channel UNet, the known region blended back every step):
    base with denoising_end=0.6 into an inpainting refiner with denoising_start=0.6."""
    _compare(world, "inpaint handoff", ("hand-off latent", "final latent", "image"))


def test_sdxl_inpaint_9_channels_from_denoising_start(world):
    """A 9-channel inpainting UNet (latent, mask, masked-image latent) from denoising_start=0.6."""
    _compare(world, "inpaint 9ch", ("final latent", "image"))


def test_sd_t2i_adapter(world):
    """StableDiffusionAdapterPipeline: adapter features at 1, 1/2 and 1/4 of the latent, added in the
    down blocks (the pipeline decodes to a float32 numpy image, compared at float32 precision)."""
    _compare(world, "sd adapter", ("final latent", "image"), (TOL, TOL_FLOAT32))


def test_sdxl_t2i_adapter(world):
    """StableDiffusionXLAdapterPipeline: adapter features at 1/2, 1/2, 1/4 and 1/4 of the latent (the
    last one added in the mid block)."""
    _compare(world, "sdxl adapter", ("final latent", "image"))


@pytest.mark.parametrize("name", ["sd adapter", "sdxl adapter"])
def test_adapter_features_matter(name):
    """Without the adapter's features (conditioning scale 0) the result differs by far more than the
    tolerance: the adapter tests would catch features that were dropped or misplaced."""
    build = {"sd adapter": tiny_sd_adapter, "sdxl adapter": tiny_sdxl_adapter}[name]
    latents, _ = reference(name)
    pipe = build()
    without, _ = run_adapter(pipe, adapter_conditioning_scale=0.0)
    assert (without - latents).abs().max() > 1e-3 * latents.abs().max()


def test_ranks_agree(world):
    """Every rank returns bitwise the same outputs."""
    _, results = world
    for rank, result in enumerate(results[1:], 1):
        assert result.keys() == results[0].keys()
        for key, value in results[0].items():
            if isinstance(value, str) or isinstance(result[key], str):
                continue  # a case that raised is reported by its own test
            for a, b in zip(value, result[key]):
                assert torch.equal(a, b), f"rank {rank} differs from rank 0 on {key}"
