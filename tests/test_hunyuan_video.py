"""HunyuanVideo-1.5 (`HunyuanVideo15Transformer3DModel`): N gloo ranks against one process.

A tiny float64 model (video_helpers.py) of 5 latent frames x 5 rows x 3 columns (patch 1), so that strips
are uneven for 2 (3+2), 3 (2+2+1) and 4 (2+1+1+1) ranks, in rows and in frames alike. Two calls per step
(prompt: 6 of 9 MLLM tokens valid; negative: 4), each with 2 of 4 ByT5 tokens valid; text-to-video (zero
image embeddings: their 3 tokens masked) and image-to-video (3 image tokens valid). Text tokens sharded
over the ranks (the default) and replicated. The synchronous path, and displaced steps whose warm-up covers
every step, differ from one process by float reduction order only (measured up to 4.2e-16 of the output
scale); tolerance 1e-9 of the output scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import SLOW_WORLDS, PerWorld, errors_on_every_rank
from video_helpers import (
    _mask,
    check_lossless_codec,
    denoise_hunyuan,
    displaced_and_naive_psnr,
    hunyuan_inputs,
    parallel_runs,
    rel_error,
    run_hunyuan_pipeline,
    same_on_every_rank,
    tiny_hunyuan,
    tiny_hunyuan_pipeline,
)

import distrifusion

TOL = 1e-9
WORLDS = SLOW_WORLDS  # 4 ranks with -m slow (CI's budget)
SPLITS = ["rows", "frames"]
STEPS = 3
BARE = {"t2v": False, "i2v": True}  # kind: image embeddings given
MODES = {"sync": 0, "displaced": STEPS + 1}  # warm-up covering every step: exact


def _config(mode: str, split: str, warmup: int = 0, text: str = "sharded") -> distrifusion.ParallelConfig:
    return distrifusion.ParallelConfig(mode=mode, warmup_steps=warmup, video_split=split, text_tokens=text)


def rank_job(world_size: int) -> dict:
    runs = {}
    for kind, image in BARE.items():
        for split in SPLITS:
            for mode, warmup in MODES.items():
                runs[kind, split, mode] = _config(mode, split, warmup), (image,)
        runs[kind, "rows", "replicated"] = _config("displaced", "rows", STEPS + 1, text="replicated"), (image,)
    for split in SPLITS:  # the approximations: displaced after one warm-up step, and naive strips
        for mode in ("displaced", "naive"):
            runs["t2v", split, mode, "approx"] = _config(mode, split, 1), (False,)
    out = parallel_runs(tiny_hunyuan(), runs, lambda model, image: denoise_hunyuan(model, STEPS, image=image))
    runs = {("pipeline", split): (_config("sync", split), (2,)) for split in SPLITS}
    out.update(parallel_runs(tiny_hunyuan_pipeline(), runs, run_hunyuan_pipeline))
    return out


@pytest.fixture(scope="module")
def results():
    return PerWorld(rank_job)


@pytest.fixture(scope="module")
def references():
    refs = {kind: denoise_hunyuan(tiny_hunyuan(), STEPS, image=image) for kind, image in BARE.items()}
    refs["pipeline"] = run_hunyuan_pipeline(tiny_hunyuan_pipeline(), 2)
    return refs


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode,split", [(mode, split) for mode in MODES for split in SPLITS] + [("replicated", "rows")])
@pytest.mark.parametrize("kind", list(BARE))
def test_bare_model_matches_one_process(results, references, world, split, mode, kind):
    out = same_on_every_rank([r[kind, split, mode] for r in results[world]])
    assert rel_error(out, references[kind]) < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("split", SPLITS)
def test_pipeline_matches_one_process(results, references, world, split):
    """HunyuanVideo15Pipeline (Qwen2.5-VL and ByT5 text, guider) in sync mode, its VAE whole."""
    out = same_on_every_rank([r["pipeline", split] for r in results[world]])
    assert rel_error(out, references["pipeline"]) < TOL


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("split", SPLITS)
def test_displaced_is_closer_than_naive(results, references, world, split):
    # Measured (3 steps, 1 warm-up, random weights, simulated ranks, 2026-12-06): displaced 71.4-74.9 dB, naive
    # 50.1-56.7 dB against one process (17-21 dB apart); 8 dB asserted.
    displaced, naive = displaced_and_naive_psnr(results[world][0], references["t2v"], split)
    assert displaced > naive + 8, (displaced, naive)


# -- the lossless codec: the compressed path's bookkeeping equals uncompressed displaced ---------------


@pytest.mark.parametrize("split", SPLITS)
def test_lossless_codec_is_uncompressed_displaced(monkeypatch, split):
    sizes = dict(frames=4, rows=8, cols=8)  # each strip's keys/values get coded
    run = lambda model: denoise_hunyuan(model, STEPS, **sizes)  # noqa: E731
    config = dict(mode="displaced", warmup_steps=1, video_split=split)
    check_lossless_codec(monkeypatch, tiny_hunyuan(), run, config)


# -- bad input: the same one-line error on every rank, before any collective ----------------------------


def _call(batch: int = 1, **changes):
    def call(model):
        inputs = {**hunyuan_inputs(model, batch=batch), "timestep": torch.full((batch,), 500.0), **changes}
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if v is not ...})

    return call


def _mixed_images():
    embeds = torch.zeros(2, 3, 8, dtype=torch.float64)
    embeds[1] = 1
    return embeds


def _uneven_masks():
    mask = _mask(2, 9, 6)
    mask[1, 5] = 0
    return mask


@pytest.mark.parametrize(
    "batch,changes,message",
    [
        (1, dict(encoder_hidden_states_2=...), "HunyuanVideo-1.5 needs encoder_hidden_states_2"),
        (1, dict(hidden_states=torch.zeros(1, 9, 5, 15)), "expects a video (batch, channels, frames, height, width)"),
        (2, dict(image_embeds=_mixed_images()), "image_embeds are zero in some samples of the call and not in others"),
        (2, dict(encoder_attention_mask=_uneven_masks()), "different numbers of valid text tokens ([8, 7])"),
        (1, dict(attention_kwargs={"mask": 1}), "attention_kwargs ['mask'] cannot be split"),
    ],
)
def test_bad_inputs_are_refused_alike(batch, changes, message):
    model = tiny_hunyuan()
    config = distrifusion.ParallelConfig(split_cfg=False)
    messages = errors_on_every_rank(3, lambda: copy.deepcopy(model), _call(batch, **changes), config)
    assert len(messages) == 1 and message in messages.pop()


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(num_frames=20), "num_frames=20: a HunyuanVideo-1.5 video has 1 + 4k frames"),
        (dict(height=72), "height=72: a HunyuanVideo-1.5 video's height is a multiple of 16 px"),
    ],
)
def test_pipeline_sizes_the_vae_cannot_take_are_refused(changes, message):
    """diffusers' HunyuanVideo-1.5 pipeline rounds them down without a word; a parallel run refuses them."""
    base = tiny_hunyuan_pipeline()
    call = lambda pipe: run_hunyuan_pipeline(pipe, 1, **changes)  # noqa: E731
    messages = errors_on_every_rank(2, lambda: copy.deepcopy(base), call)
    assert len(messages) == 1 and message in messages.pop()


def test_an_unknown_attention_processor_is_refused():
    model = tiny_hunyuan()
    model.transformer_blocks[0].attn.set_processor(lambda *a, **k: None)
    messages = errors_on_every_rank(2, lambda: model, lambda m: None)
    assert len(messages) == 1 and "HunyuanVideo15AttnProcessor2_0" in messages.pop()
