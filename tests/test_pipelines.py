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

import pytest
import torch
from helpers import run_ranks
from pipeline_helpers import (
    DDIM_SIZES,
    SD_LATENT,
    SD_SIZE,
    STEPS,
    run_ddim,
    run_img2img,
    run_text,
    tiny_ddim,
    tiny_img2img,
    tiny_sd,
    tiny_sdxl,
)

import distrifusion

TOL = 1e-9
torch.set_num_threads(1)  # the reference runs in this process; the ranks set their own


# ----------------------------------------------------------------------------- parallel runs


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
