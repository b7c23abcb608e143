"""Wan 2.1 / 2.2 video (`WanTransformer3DModel`): N gloo ranks against one process.

Tiny float64 models (wan_helpers.py) of 5 latent frames x 5 token rows x 3 token columns, so that
strips are uneven for 2 (3+2), 3 (2+2+1) and 4 (2+1+1+1) ranks, in rows (bands of token rows across
all frames) and in frames (runs of latent frames) alike. Bare models: 2.1 T2V, 2.1 I2V (CLIP image
tokens through added keys/values), 2.2 TI2V (a per-token timestep, 0 on the first frame); pipelines:
a 2.2 A14B-style WanPipeline (two experts switched at the boundary), WanImageToVideoPipeline with a
CLIP image encoder (2.1 I2V) and with expand_timesteps (2.2 TI2V). The synchronous path, and displaced
steps whose warm-up covers every step, may differ from one process by float reduction order only
(~1e-16 measured); tolerance 1e-9 of the output scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import SLOW_WORLDS, PerWorld, errors_on_every_rank, psnr
from video_helpers import check_lossless_codec
from wan_helpers import (
    FRAMES,
    HEIGHT,
    ROWS,
    WIDTH,
    denoise,
    per_token_timestep,
    run_pipeline,
    tiny_pipeline,
    tiny_wan,
    video_inputs,
)

import distrifusion
from distrifusion.measure.simulate import simulate_ranks

TOL = 1e-9
WORLDS = SLOW_WORLDS  # 4 ranks with -m slow (CI's budget)
SPLITS = ["rows", "frames"]
STEPS = 4
BARE = {"t2v": False, "i2v": False, "ti2v": True}  # kind: per-token timestep
PIPELINES = ["a14b", "i2v", "ti2v"]
MODES = {"sync": 0, "displaced": STEPS + 1}  # warm-up covering every step: exact


def _config(mode: str, split: str, warmup: int) -> distrifusion.ParallelConfig:
    return distrifusion.ParallelConfig(mode=mode, warmup_steps=warmup, video_split=split)


def rank_job(world_size: int) -> dict:
    out = {}
    for kind, per_token in BARE.items():
        model = tiny_wan(kind)
        for split in SPLITS:
            for mode, warmup in MODES.items():
                distrifusion.parallelize(model, _config(mode, split, warmup))
                out[kind, split, mode] = denoise(model, STEPS, per_token=per_token)
                distrifusion.remove(model)
    model = tiny_wan("t2v")
    for split in SPLITS:  # the approximations: displaced after one warm-up step, and naive strips
        for mode in ("displaced", "naive"):
            distrifusion.parallelize(model, _config(mode, split, 1))
            out["t2v", split, mode, "approx"] = denoise(model, STEPS)
            distrifusion.remove(model)
    for kind in PIPELINES:
        base = tiny_pipeline(kind)
        for split in SPLITS:
            for mode, warmup in MODES.items() if kind == "a14b" else [("sync", 0)]:
                pipe = copy.deepcopy(base)
                distrifusion.parallelize(pipe, _config(mode, split, warmup))
                out["pipeline", kind, split, mode] = run_pipeline(pipe, kind, STEPS)
    return out


@pytest.fixture(scope="module")
def results():
    return PerWorld(rank_job)


@pytest.fixture(scope="module")
def references():
    refs = {kind: denoise(tiny_wan(kind), STEPS, per_token=per_token) for kind, per_token in BARE.items()}
    for kind in PIPELINES:
        refs["pipeline", kind] = run_pipeline(tiny_pipeline(kind), kind, STEPS)
    return refs


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _same_on_every_rank(outs: list) -> torch.Tensor:
    assert all(torch.equal(o, outs[0]) for o in outs), "ranks finished with different videos"
    return outs[0]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(BARE))
def test_bare_models_match_one_process(results, references, world, split, mode, kind):
    out = _same_on_every_rank([r[kind, split, mode] for r in results[world]])
    assert _rel_error(out, references[kind]) < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind,mode", [("a14b", "sync"), ("a14b", "displaced"), ("i2v", "sync"), ("ti2v", "sync")])
def test_pipelines_match_one_process(results, references, world, split, kind, mode):
    """A14B: two experts, each its own state (the second's first call synchronous); I2V with CLIP image
    tokens; TI2V's per-token timestep through WanImageToVideoPipeline(expand_timesteps=True)."""
    out = _same_on_every_rank([r["pipeline", kind, split, mode] for r in results[world]])
    assert _rel_error(out, references["pipeline", kind]) < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("split", SPLITS)
def test_displaced_is_closer_than_naive(results, references, world, split):
    # Measured (4 steps, 1 warm-up, random weights, simulated ranks): displaced 68.9-72.6 dB, naive 48.9-54.0 dB
    # against one process (17-20 dB apart); 8 dB asserted.
    ref = references["t2v"]
    displaced = psnr(results[world][0]["t2v", split, "displaced", "approx"], ref)
    naive = psnr(results[world][0]["t2v", split, "naive", "approx"], ref)
    assert displaced > naive + 8, (displaced, naive)


def test_both_experts_run_each_with_its_own_state():
    """The tiny A14B pipeline's 4 steps (timesteps 1000, 858, 602, 9; boundary 500): the first expert
    takes 3, the second 1. Each has its own state and guidance branches (prompt, negative); the second
    expert's first call is its own step 0, synchronous, although the first expert is past its warm-up."""
    pipe = tiny_pipeline("a14b")

    def rank(runtime):
        replica = copy.deepcopy(pipe)
        distrifusion.parallelize(replica, _config("displaced", "rows", 0), runtime=runtime)
        experts = (replica.transformer, replica.transformer_2)
        states = [model._distrifusion_state for model in experts]
        seen = []
        for i, model in enumerate(experts):  # inside the split call: the step and branch of this call
            record = lambda m, a, i=i: seen.append((i, states[i].branch, states[i].step, states[i].sync_step))  # noqa: E731
            model.blocks[0].attn1.register_forward_pre_hook(record)
        run_pipeline(replica, "a14b", STEPS)
        distrifusion.remove(replica)
        assert not hasattr(replica.transformer_2, "_distrifusion_state")
        return seen

    for seen in simulate_ranks(2, rank):
        first = [(b, step, sync) for i, b, step, sync in seen if i == 0]
        assert first == [(0, 0, True), (1, 0, True), (0, 1, False), (1, 1, False), (0, 2, False), (1, 2, False)]
        assert [(b, step, sync) for i, b, step, sync in seen if i == 1] == [(0, 0, True), (1, 0, True)]


# -- the lossless codec: the compressed path's bookkeeping equals uncompressed displaced ---------------


@pytest.mark.parametrize("split", SPLITS)
def test_lossless_codec_is_uncompressed_displaced(monkeypatch, split):
    sizes = dict(frames=4, rows=16, cols=16)  # 4 x 8 x 8 tokens: each strip's keys/values get coded
    config = dict(mode="displaced", warmup_steps=1, video_split=split)
    check_lossless_codec(monkeypatch, tiny_wan("t2v"), lambda model: denoise(model, STEPS, **sizes), config)


# -- bad input: the same one-line error on every rank, before any collective ----------------------------


def _bare_call(frames=FRAMES, rows=ROWS, **extra):
    def call(model):
        inputs = {**video_inputs(model, frames=frames, rows=rows), **extra}
        with torch.no_grad():
            model(timestep=torch.tensor([500.0]), **inputs)

    return call


@pytest.mark.parametrize(
    "split,frames,rows,world,message",
    [
        ("rows", FRAMES, 4, 3, "video height of 4 latent rows is too small to split over 3 ranks; the minimum is 6"),
        ("rows", FRAMES, 9, 2, "video height of 9 latent rows must be a multiple of the model's block of 2"),
        ("frames", 3, ROWS, 4, "video length of 3 latent frames is too small to split over 4 ranks; the minimum is 4"),
    ],
)
def test_videos_that_do_not_split_are_refused_alike(split, frames, rows, world, message):
    config = distrifusion.ParallelConfig(video_split=split)
    messages = errors_on_every_rank(world, lambda: tiny_wan("t2v"), _bare_call(frames, rows), config)
    assert len(messages) == 1 and message in messages.pop()


def test_a_per_token_timestep_of_the_wrong_length_is_refused():
    model = tiny_wan("ti2v")

    def call(m):
        t = per_token_timestep(m, 500.0, 1)[:, :-1]
        with torch.no_grad():
            m(timestep=t, **video_inputs(m))

    messages = errors_on_every_rank(2, lambda: copy.deepcopy(model), call)
    assert len(messages) == 1 and "per-token timestep of 74 tokens for a video of 75" in messages.pop()


def test_a_frame_count_the_vae_cannot_take_is_refused():
    """diffusers' Wan pipelines round it with a warning; a parallel run refuses it, before any work."""
    base = tiny_pipeline("t2v")

    def call(pipe):
        pipe(prompt="a cat", num_frames=20, height=HEIGHT, width=WIDTH, num_inference_steps=1, output_type="latent")

    messages = errors_on_every_rank(2, lambda: copy.deepcopy(base), call)
    assert messages == {
        "distrifusion: num_frames=20: a Wan video has 1 + 4k frames (its VAE compresses time 4x); use 17 or 21"
    }


def test_unsupported_video_variants_are_refused_by_name():
    from diffusers import WanVACETransformer3DModel

    vace = lambda: WanVACETransformer3DModel(  # noqa: E731
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
        ffn_dim=32, num_layers=2, vace_layers=[0], vace_in_channels=8,
    )  # fmt: skip
    messages = errors_on_every_rank(2, vace, lambda m: None)
    assert len(messages) == 1 and "got WanVACETransformer3DModel" in messages.pop()


def test_an_unknown_attention_processor_is_refused():
    model = tiny_wan("t2v")
    model.blocks[0].attn1.set_processor(lambda *a, **k: None)
    messages = errors_on_every_rank(2, lambda: model, lambda m: None)
    assert len(messages) == 1 and "WanAttnProcessor" in messages.pop()


def test_video_split_is_validated():
    with pytest.raises(ValueError, match="video_split"):
        distrifusion.ParallelConfig(video_split="columns")


def test_a_first_block_cache_enabled_after_parallelize_equals_one_process():
    """A diffusers cache that decides from the activations (FirstBlockCache: a residual's change), enabled after
    parallelize (no module is added: the check before each image sees it), takes the whole video's decision on
    every rank (`distrifusion.engine.caches`): sync mode equals one process with the same cache."""
    from diffusers import FirstBlockCacheConfig

    from distrifusion.engine.caches import cache_decisions
    from distrifusion.measure.caching import ComputedCalls

    def run(model):
        with model.cache_context("cond"):
            return denoise(model, steps=4)

    base = tiny_wan("t2v")
    reference = copy.deepcopy(base)
    reference.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD_WAN))
    counter = ComputedCalls(reference)
    expected = run(reference)
    assert 1 < counter.computed < counter.calls  # the cache skips some calls and computes others

    def rank(runtime):
        replica = copy.deepcopy(base)
        distrifusion.parallelize(replica, distrifusion.ParallelConfig(mode="sync"), runtime=runtime)
        replica.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD_WAN))
        return run(replica), cache_decisions(replica)

    results = simulate_ranks(2, rank)
    for out, decisions in results:
        assert decisions == results[0][1] and 1 + sum(decisions) == counter.computed
        assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-9


THRESHOLD_WAN = 0.1
