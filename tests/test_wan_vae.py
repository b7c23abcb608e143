"""The Wan video VAE (`AutoencoderKLWan`) split in rows (decode and encode): N gloo ranks against
one process, and a tiny WanPipeline's video with and without the split.

Always synchronous, so exact up to float reduction order (causal 3D convs with halo rows of every
frame, their per-rank caches of the previous chunk's frames, the frames' attention over gathered
keys/values): measured 0 to 3e-15 of the output scale in float64; tolerance 1e-9.
"""

import functools
import logging

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from helpers import SLOW_WORLDS, PerWorld
from pipeline_helpers import _perturb_constants, tiny_tokenizer
from transformers import UMT5Config, UMT5EncoderModel

import distrifusion
from distrifusion.engine.comm import Runtime
from distrifusion.models import WanVAEAdapter, find_vae

TOL = 1e-9
WORLDS = SLOW_WORLDS  # 4 ranks with -m slow (CI's budget)
Z = 4  # latent channels of the tiny VAEs
# Wan 2.1's layout (8x8 px per latent cell, 4x in time) and Wan 2.2's (residual blocks with
# AvgDown3D/DupUp3D shortcuts, a 2x2 patchify: 16x16 px per cell, 12 channels in and out), few channels.
LAYOUTS = {
    "wan21": dict(base_dim=4, dim_mult=[1, 2, 2, 2]),
    "wan22": dict(
        base_dim=4,
        decoder_base_dim=8,
        dim_mult=[1, 2, 2, 2],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
    ),
}
# Latents of 5 rows (uneven over 2, 3 and 4 ranks). Decode walks the latent frames one at a time (the
# first is not upsampled in time, the second finds its caches empty, later ones full); encode takes one
# frame, then chunks of four: 9 frames (wan21) and 5 (wan22) give 3 and 2 latent frames.
LATENT_FRAMES = {"wan21": 3, "wan22": 2}


def tiny_wan_vae(layout: str) -> AutoencoderKLWan:
    torch.manual_seed(0)
    config = dict(z_dim=Z, num_res_blocks=1, latents_mean=[0.0] * Z, latents_std=[1.0] * Z, **LAYOUTS[layout])
    return _perturb_constants(AutoencoderKLWan(**config).to(torch.float64).eval())


def vae_inputs(vae: AutoencoderKLWan, layout: str, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    frames, px = LATENT_FRAMES[layout], vae.config.scale_factor_spatial
    z = torch.randn(batch, Z, frames, 5, 3, generator=g, dtype=torch.float64)
    x = torch.randn(batch, 3, 1 + 4 * (frames - 1), 5 * px, 3 * px, generator=g, dtype=torch.float64)
    return z, x


@functools.cache
def one_process(layout: str, batch: int = 1, tiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: decode and encode of the unsplit VAE in this process."""
    vae = tiny_wan_vae(layout)
    return run(small_tiles(vae) if tiled else vae, layout, batch)


def run(vae: AutoencoderKLWan, layout: str, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    z, x = vae_inputs(vae, layout, batch)
    with torch.no_grad():
        return vae.decode(z).sample, vae.encode(x).latent_dist.mean


def small_tiles(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """diffusers' tiling with tiles smaller than the test videos (two tiles each), so that it really tiles."""
    vae.enable_tiling(32, 32, 24, 24)
    return vae


# -- a tiny WanPipeline (no download: UMT5 from a config, the byte-level tokenizer in memory) -----------

PIPE_CALL = dict(prompt="a red cat", negative_prompt="blurry", height=80, width=48, num_frames=9)


def tiny_wan_pipeline() -> WanPipeline:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text = UMT5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0
    )
    text_encoder = UMT5EncoderModel(text).eval()
    transformer = WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=Z,
        out_channels=Z,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_wan_vae("wan21"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_perturb_constants(transformer).eval(),
    )
    pipe.to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_video(pipe: WanPipeline) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(
            **PIPE_CALL,
            num_inference_steps=2,
            guidance_scale=4.0,
            max_sequence_length=12,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
    return out.frames


def rank_job(world_size: int) -> dict:
    from distrifusion.engine.comm import init_runtime
    from distrifusion.engine.config import ParallelConfig
    from distrifusion.parallel.parallelize import parallelize_model

    out = {}
    for layout in LAYOUTS:
        vae = distrifusion.parallelize(tiny_wan_vae(layout))
        out[layout] = run(vae, layout)
        if layout == "wan21":
            out[layout, "batch 2"] = run(vae, layout, batch=2)  # two videos: halves of the ranks each, when even
        distrifusion.remove(vae)
    if world_size == 2:  # tiled calls run whole on every rank (whatever their number)
        vae = distrifusion.parallelize(tiny_wan_vae("wan21"))
        out["tiled"] = run(small_tiles(vae), "wan21")
    # The pipeline's VAE split on its own (the Wan transformer runs whole on every rank here).
    pipe = tiny_wan_pipeline()
    parallelize_model(pipe.vae, ParallelConfig(), init_runtime(), WanVAEAdapter())
    out["pipeline"] = pipeline_video(pipe)
    return out


@pytest.fixture(scope="module")
def results():
    return PerWorld(rank_job)


def _close(a, b):
    return a.shape == b.shape and ((a - b).abs().max() / b.abs().max()).item() < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", [("wan21", 1), ("wan21", 2), ("wan22", 1)])
def test_decode_and_encode_match_one_process(results, world, case):
    layout, batch = case
    decoded, encoded = one_process(layout, batch)
    assert (decoded.abs() < 1).float().mean() > 0.9  # the clamp to [-1, 1] hides little
    for r in results[world]:
        rank_decoded, rank_encoded = r[layout] if batch == 1 else r[layout, "batch 2"]
        assert _close(rank_decoded, decoded) and _close(rank_encoded, encoded)


def test_tiled_vae_runs_whole(results):
    decoded, encoded = one_process("wan21", tiled=True)
    assert not torch.allclose(decoded, one_process("wan21")[0])  # it did tile
    for r in results[2]:
        assert _close(r["tiled"][0], decoded) and _close(r["tiled"][1], encoded)


@functools.cache
def one_process_video() -> torch.Tensor:
    return pipeline_video(tiny_wan_pipeline())


@pytest.mark.parametrize("world", WORLDS)
def test_pipeline_video_with_split_vae_is_the_same(results, world):
    video = one_process_video()
    assert video.shape == (1, PIPE_CALL["num_frames"], 3, PIPE_CALL["height"], PIPE_CALL["width"])
    assert video.std() > 0.01  # not a flat (clamped) video
    for r in results[world]:
        assert _close(r["pipeline"], video)


# -- errors, the same on every rank before any collective -------------------------------------------


class _NoCollectives:
    """A communicator that fails the test if any collective is issued."""

    rank, size, capturable = 0, 1, False

    def all_gather(self, *args, **kwargs):
        raise AssertionError("a collective ran before the input was refused")

    all_gather_inplace = all_gather


def _runtime(world: int, rank: int) -> Runtime:
    comm = _NoCollectives()
    return Runtime(rank, world, torch.device("cpu"), comm, {1: comm, 2: comm})


@pytest.mark.parametrize(
    "layout,method,shape,message",
    [
        ("wan21", "encode", (1, 3, 6, 40, 24), "encodes 1 \\+ 4k frames .* got 6 frames: pass 5 or 9"),
        ("wan21", "encode", (1, 3, 0, 40, 24), "got 0 frames: pass 1 or 5"),
        ("wan21", "encode", (1, 3, 5, 44, 24), "multiple of the model's block of 8 image rows"),
        ("wan22", "encode", (1, 3, 5, 40, 48), "multiple of the model's block of 16 image rows"),
        ("wan21", "decode", (1, Z, 2, 3, 3), "too small to split over 4 ranks; the minimum is 4 rows"),
        ("wan21", "decode", (1, Z, 0, 5, 3), "at least one latent frame"),
        ("wan21", "decode", (1, Z, 5, 3), "expected a 5-D latent"),
    ],
)
def test_bad_input_is_refused_alike_on_every_rank(layout, method, shape, message):
    messages = set()
    for rank in range(4):
        vae = distrifusion.parallelize(tiny_wan_vae(layout), runtime=_runtime(4, rank))
        with pytest.raises(ValueError, match=message) as error, torch.no_grad():
            getattr(vae, method)(torch.zeros(shape, dtype=torch.float64))
        assert "\n" not in str(error.value)
        messages.add(str(error.value))
    assert len(messages) == 1


def test_unknown_downsampler_padding_is_refused_by_name():
    vae = tiny_wan_vae("wan21")
    down = next(m for m in vae.encoder.modules() if getattr(m, "mode", "").startswith("downsample"))
    down.resample[0] = torch.nn.ZeroPad2d((0, 1, 1, 1))
    with pytest.raises(TypeError, match="Wan downsampler 'encoder.down_blocks.*pads \\(0, 1, 1, 1\\)"):
        distrifusion.parallelize(vae, runtime=_runtime(2, 0))


def test_pipeline_vae_is_found_by_its_adapter_and_others_run_whole(caplog, monkeypatch):
    """A pipeline VAE that no adapter splits (here LTX-Video's) runs whole on every rank: one notice
    per VAE class, no error."""
    from diffusers import AutoencoderKLLTXVideo
    from test_config_and_errors import fake_runtime
    from test_pipelines import tiny_sd

    assert isinstance(find_vae(tiny_wan_vae("wan21")), WanVAEAdapter)
    pipe = tiny_sd()
    channels = dict(block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, latent_channels=4)
    pipe.register_modules(
        vae=AutoencoderKLLTXVideo(layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, **channels)
    )
    assert find_vae(pipe.vae) is None
    monkeypatch.setattr("distrifusion.parallel.parallelize._NOTICED_VAES", set())  # once per process: not yet here
    with caplog.at_level(logging.WARNING, logger="distrifusion"):
        for _ in range(2):
            distrifusion.parallelize(pipe, runtime=fake_runtime(2))
            assert not hasattr(pipe.vae, "_distrifusion_state")
            distrifusion.remove(pipe)
    notices = [r.getMessage() for r in caplog.records if "VAE" in r.getMessage()]
    assert notices == [
        "distrifusion: the pipeline's VAE (AutoencoderKLLTXVideo) is not split; every rank decodes the whole output"
    ]


def test_remove_gives_the_model_back():
    vae = tiny_wan_vae("wan22")
    distrifusion.parallelize(vae, runtime=_runtime(2, 0))
    patched = [m for m in vae.modules() if "forward" in m.__dict__]
    kinds = {type(m.__dict__["forward"]).__name__ for m in patched}
    assert {"PatchCausalConv3d", "PatchConv2d", "PatchZeroPad", "WanFrameAttention"} <= kinds
    assert {"_decode", "_encode"} <= set(vae.__dict__)
    distrifusion.remove(vae)
    assert not hasattr(vae, "_distrifusion_state") and not {"_decode", "_encode"} & set(vae.__dict__)
    assert all("forward" not in m.__dict__ for m in vae.modules())
    z, _ = vae_inputs(vae, "wan22")
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, tiny_wan_vae("wan22").decode(z).sample)
