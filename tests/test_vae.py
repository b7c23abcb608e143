"""The VAE split in strips (decode and encode): N gloo ranks against one process.

Always synchronous, so always exact up to float reduction order (strip-wise convs with their
edge rows redone from halos, GroupNorm statistics merged from strips, the mid-block attention
over gathered keys/values): measured ~5e-15 of the output scale in float64; tolerance 1e-9.
"""

import copy

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import run_ranks
from test_config_and_errors import fake_runtime

import distrifusion

TOL = 1e-9
# Two layouts: SD/SDXL-like (4 levels, quant convs) and SD3/Flux-like (16 latent channels, no quant
# convs, 3 levels). Latents of 5 rows (uneven over 2, 3, 4 ranks); images of 5 encoder blocks.
LAYOUTS = {
    "sd": dict(block_out_channels=(8, 16, 32, 32), layers_per_block=2, latent_channels=4),
    "sd3": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}
WORLDS = [2, 3, 4]


def tiny_vae(layout: str) -> AutoencoderKL:
    torch.manual_seed(0)
    levels = len(LAYOUTS[layout]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **LAYOUTS[layout],
    )
    vae = vae.to(torch.float64).eval()
    with torch.no_grad():
        for p in vae.parameters():
            if p.numel() == 1 or torch.all(p == p.flatten()[0]):
                p.add_(torch.randn_like(p) * 0.1)
    return vae


def small_tiles(vae: AutoencoderKL) -> AutoencoderKL:
    """diffusers' tiling with tiles smaller than the test images, so that it really tiles."""
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    return vae


def vae_inputs(vae: AutoencoderKL, batch: int = 1):
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, vae.config.latent_channels, 5, 3, generator=g, dtype=torch.float64)
    x = torch.randn(batch, 3, 5 * factor, 3 * factor, generator=g, dtype=torch.float64)
    return z, x


def run(vae: AutoencoderKL, batch: int = 1):
    z, x = vae_inputs(vae, batch)
    with torch.no_grad():
        return vae.decode(z).sample, vae.encode(x).latent_dist.mean


def rank_job(world_size: int) -> dict:
    out = {}
    for layout in LAYOUTS:
        vae = distrifusion.parallelize(tiny_vae(layout))
        out[layout] = run(vae)
        out[layout, "batch 2"] = run(vae, batch=2)  # two images: halves of the ranks each, when even
        distrifusion.remove(vae)
    vae = distrifusion.parallelize(tiny_vae("sd"))
    small_tiles(vae)  # tiled calls run whole on every rank
    out["tiled"] = run(vae)
    return out


@pytest.fixture(scope="module")
def results():
    return {n: run_ranks(n, rank_job, n) for n in WORLDS}


def _close(a, b):
    return ((a - b).abs().max() / b.abs().max()).item() < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_and_encode_match_one_process(results, world, layout, batch):
    decoded, encoded = run(tiny_vae(layout), batch)
    for r in results[world]:
        rank_decoded, rank_encoded = r[layout] if batch == 1 else r[layout, "batch 2"]
        assert rank_decoded.shape == decoded.shape and _close(rank_decoded, decoded)
        assert rank_encoded.shape == encoded.shape and _close(rank_encoded, encoded)


@pytest.mark.parametrize("world", WORLDS)
def test_tiled_vae_runs_whole(results, world):
    vae = small_tiles(tiny_vae("sd"))
    decoded, encoded = run(vae)
    for r in results[world]:
        assert _close(r["tiled"][0], decoded) and _close(r["tiled"][1], encoded)


def test_encode_height_must_be_whole_latent_rows():
    vae = distrifusion.parallelize(tiny_vae("sd"), runtime=fake_runtime(2))
    x = torch.randn(1, 3, 5 * 8 + 4, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiple of the model's block of 8 image rows"):
        vae.encode(x)


def test_decode_too_few_latent_rows():
    vae = distrifusion.parallelize(tiny_vae("sd"), runtime=fake_runtime(4))
    with pytest.raises(ValueError, match="minimum is 4 rows"):
        vae.decode(torch.randn(1, 4, 3, 3, dtype=torch.float64))


def test_pipeline_vae_follows_split_vae_and_remove():
    from test_pipelines import tiny_sd

    pipe = tiny_sd()
    distrifusion.parallelize(pipe, distrifusion.ParallelConfig(split_vae=False), runtime=fake_runtime(2))
    assert not hasattr(pipe.vae, "_distrifusion_state")
    distrifusion.remove(pipe)
    before = copy.deepcopy(pipe.vae)
    distrifusion.parallelize(pipe, runtime=fake_runtime(2))
    assert "_decode" in pipe.vae.__dict__
    distrifusion.remove(pipe)
    assert not hasattr(pipe.vae, "_distrifusion_state")
    assert all(not k.startswith("_decode") and k != "forward" for m in pipe.vae.modules() for k in m.__dict__)
    z = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(pipe.vae.decode(z).sample, before.decode(z).sample)
