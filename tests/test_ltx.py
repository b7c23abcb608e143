"""LTX-Video 0.9 (`LTXVideoTransformer3DModel`): N gloo ranks against one process.

A tiny float64 model (video_helpers.py) of 5 latent frames x 5 rows x 3 columns of packed tokens (patch 1),
so that strips are uneven for 2 (3+2), 3 (2+2+1) and 4 (2+1+1+1) ranks, in rows (bands of latent rows across
all frames: one run of tokens per frame) and in frames alike. The model is called once per step with the CFG
batch [negative, prompt] (as the pipelines do): with `split_cfg=False` every rank takes a strip of both
halves; with the default each guidance half goes to half the ranks (4 ranks: 2 x 2 strips). Text-to-video
with one timestep per sample, image-to-video with one per token (0 on the first frame). The synchronous path,
and displaced steps whose warm-up covers every step, differ from one process by float reduction order only
(measured up to 4.2e-16 of the output scale; the pipelines: 0); tolerance 1e-9 of the output scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import SLOW_WORLDS, PerWorld, errors_on_every_rank
from video_helpers import (
    check_lossless_codec,
    denoise_ltx,
    displaced_and_naive_psnr,
    ltx_inputs,
    parallel_runs,
    per_token_timestep,
    rel_error,
    run_ltx_pipeline,
    same_on_every_rank,
    tiny_ltx,
    tiny_ltx_pipeline,
)

import distrifusion
from distrifusion.measure.simulate import simulate_ranks

TOL = 1e-9
WORLDS = SLOW_WORLDS  # 4 ranks with -m slow (CI's budget)
SPLITS = ["rows", "frames"]
STEPS = 3
BARE = {"t2v": False, "i2v": True}  # kind: per-token timestep
MODES = {"sync": 0, "displaced": STEPS + 1}  # warm-up covering every step: exact


def _config(mode: str, split: str, warmup: int = 0, split_cfg: bool = False) -> distrifusion.ParallelConfig:
    return distrifusion.ParallelConfig(mode=mode, warmup_steps=warmup, video_split=split, split_cfg=split_cfg)


def rank_job(world_size: int) -> dict:
    runs = {}
    for kind, per_token in BARE.items():
        for split in SPLITS:
            for mode, warmup in MODES.items():
                runs[kind, split, mode] = _config(mode, split, warmup), (per_token,)
        # The CFG halves on different ranks (an odd world keeps the batch whole).
        runs[kind, "rows", "split_cfg"] = _config("displaced", "rows", STEPS + 1, split_cfg=True), (per_token,)
    for split in SPLITS:  # the approximations: displaced after one warm-up step, and naive strips
        for mode in ("displaced", "naive"):
            runs["t2v", split, mode, "approx"] = _config(mode, split, 1), (False,)
    out = parallel_runs(tiny_ltx(), runs, lambda model, per_token: denoise_ltx(model, STEPS, per_token=per_token))
    for kind in BARE:
        base = tiny_ltx_pipeline(kind)
        runs = {("pipeline", kind, split): (_config("sync", split), (kind, 2)) for split in SPLITS}
        out.update(parallel_runs(base, runs, run_ltx_pipeline))
    return out


@pytest.fixture(scope="module")
def results():
    return PerWorld(rank_job)


@pytest.fixture(scope="module")
def references():
    refs = {kind: denoise_ltx(tiny_ltx(), STEPS, per_token=per_token) for kind, per_token in BARE.items()}
    for kind in BARE:
        refs["pipeline", kind] = run_ltx_pipeline(tiny_ltx_pipeline(kind), kind, 2)
    return refs


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode,split", [(mode, split) for mode in MODES for split in SPLITS] + [("split_cfg", "rows")])
@pytest.mark.parametrize("kind", list(BARE))
def test_bare_model_matches_one_process(results, references, world, split, mode, kind):
    out = same_on_every_rank([r[kind, split, mode] for r in results[world]])
    assert rel_error(out, references[kind]) < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", list(BARE))
def test_pipelines_match_one_process(results, references, world, split, kind):
    """LTXPipeline and LTXImageToVideoPipeline (its per-token timestep) in sync mode, VAE encode/decode whole."""
    out = same_on_every_rank([r["pipeline", kind, split] for r in results[world]])
    assert rel_error(out, references["pipeline", kind]) < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("split", SPLITS)
def test_displaced_is_closer_than_naive(results, references, world, split):
    # Measured (3 steps, 1 warm-up, random weights, simulated ranks, 2026-12-06): displaced 66.5-68.7 dB, naive
    # 42.7-50.1 dB against one process (18-24 dB apart); 8 dB asserted.
    displaced, naive = displaced_and_naive_psnr(results[world][0], references["t2v"], split)
    assert displaced > naive + 8, (displaced, naive)


# -- the lossless codec: the compressed path's bookkeeping equals uncompressed displaced ---------------


@pytest.mark.parametrize("split", SPLITS)
def test_lossless_codec_is_uncompressed_displaced(monkeypatch, split):
    sizes = dict(frames=4, rows=8, cols=8)  # each strip's keys/values get coded
    run = lambda model: denoise_ltx(model, STEPS, **sizes)  # noqa: E731
    config = dict(mode="displaced", warmup_steps=1, video_split=split, split_cfg=False)
    check_lossless_codec(monkeypatch, tiny_ltx(), run, config)


# -- bad input: the same one-line error on every rank, before any collective ----------------------------


def _call(**changes):
    def call(model):
        inputs = {**ltx_inputs(model), "timestep": torch.tensor([500.0, 500.0]), **changes}
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if v is not ...})

    return call


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(num_frames=...), "LTX-Video needs num_frames, height and width"),
        (dict(height=4), "got 75 tokens for a latent video of 5 x 4 x 3"),
        (dict(hidden_states=torch.zeros(2, 5, 5, 3, 4)), "expects packed tokens (batch, tokens, channels)"),
        (dict(video_coords=torch.zeros(2, 3, 75)), "input 'video_coords' is not supported"),
        (dict(timestep=per_token_timestep(500.0, 2)[:, :-1]), "per-token timestep of 74 tokens for a video of 75"),
        (dict(attention_kwargs={"mask": 1}), "attention_kwargs ['mask'] cannot be split"),
    ],
)
def test_bad_inputs_are_refused_alike(changes, message):
    model = tiny_ltx()
    messages = errors_on_every_rank(3, lambda: copy.deepcopy(model), _call(**changes), _config("sync", "rows"))
    assert len(messages) == 1 and message in messages.pop()


@pytest.mark.parametrize(
    "split,sizes,world,message",
    [
        ("rows", dict(rows=2), 3, "video height of 2 latent rows is too small to split over 3 ranks; the minimum is 3"),
        ("frames", dict(frames=3), 4, "video length of 3 latent frames is too small to split over 4 ranks"),
    ],
)
def test_videos_that_do_not_split_are_refused_alike(split, sizes, world, message):
    def call(model):
        inputs = ltx_inputs(model, **sizes)
        with torch.no_grad():
            model(timestep=torch.tensor([500.0, 500.0]), **inputs)

    messages = errors_on_every_rank(world, tiny_ltx, call, _config("sync", split))
    assert len(messages) == 1 and message in messages.pop()


def test_a_frame_count_the_vae_cannot_take_is_refused():
    """diffusers' LTX pipelines round it down without a word; a parallel run refuses it, before any work."""
    base = tiny_ltx_pipeline("t2v")

    def call(pipe):
        pipe(prompt="a cat", num_frames=20, height=160, width=96, num_inference_steps=1, output_type="latent")

    messages = errors_on_every_rank(2, lambda: copy.deepcopy(base), call)
    assert messages == {
        "distrifusion: num_frames=20: an LTX-Video video has 1 + 8k frames (its VAE compresses time 8x); use 17 or 25"
    }


def test_a_patch_other_than_one_is_refused():
    messages = errors_on_every_rank(2, lambda: tiny_ltx(patch_size=2), lambda m: None)
    assert len(messages) == 1 and "patch_size 2 and patch_size_t 1 is not supported" in messages.pop()


def test_an_unknown_attention_processor_is_refused():
    model = tiny_ltx()
    model.transformer_blocks[0].attn1.set_processor(lambda *a, **k: None)
    messages = errors_on_every_rank(2, lambda: model, lambda m: None)
    assert len(messages) == 1 and "LTXVideoAttnProcessor" in messages.pop()


def test_ltx2_is_refused_with_the_reason():
    ltx2 = pytest.importorskip("diffusers.models.transformers.transformer_ltx2")  # by name: not in every diffusers

    def make():
        with torch.device("meta"):  # the refusal reads the class only
            return ltx2.LTX2VideoTransformer3DModel(num_layers=1)

    messages = errors_on_every_rank(2, make, lambda m: None)
    assert len(messages) == 1
    message = messages.pop()
    assert "does not support LTX2VideoTransformer3DModel" in message and "audio stream" in message


def test_the_unsplit_vae_is_noticed(monkeypatch):
    """Once per VAE class, on the first rank (the log itself: another test may have changed the logger's level)."""
    notices = []
    monkeypatch.setattr("distrifusion.parallel.parallelize._NOTICED_VAES", set())
    monkeypatch.setattr("distrifusion.parallel.parallelize.log.warning", lambda msg, *args: notices.append(msg % args))
    base = tiny_ltx_pipeline("t2v")

    def rank(runtime):
        pipe = copy.deepcopy(base)
        distrifusion.parallelize(pipe, _config("sync", "rows"), runtime=runtime)
        run_ltx_pipeline(pipe, "t2v", 1)
        run_ltx_pipeline(pipe, "t2v", 1)

    simulate_ranks(2, rank)
    assert notices == [
        "distrifusion: the pipeline's VAE (AutoencoderKLLTXVideo) is not split; every rank decodes the whole output"
    ]


def test_bench_knows_the_video_archs():
    """`distrifusion bench --arch ltx_video_2b / hunyuan_video15_720p`: their VAEs' frames and pixels per cell."""
    from distrifusion.app.cli_checks import UsageError, bench_geometry, check_video

    ltx, hunyuan = bench_geometry("ltx_video_2b"), bench_geometry("hunyuan_video15_720p")
    assert (ltx.time_factor, ltx.own_px, ltx.cfg) == (8, 32, True)
    assert (hunyuan.time_factor, hunyuan.own_px, hunyuan.cfg) == (4, 16, False)
    check_video(ltx, 121, 704, 1280, 8, "rows")
    with pytest.raises(UsageError, match="1 \\+ 8k frames"):
        check_video(ltx, 120, 704, 1280, 2, "rows")
    with pytest.raises(UsageError, match="multiple of the model.s block of 16 px"):
        check_video(hunyuan, 121, 712, 1280, 2, "rows")
