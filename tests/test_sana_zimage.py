"""SANA and Z-Image (issue 22): N gloo ranks against one process, bad input, exchanged bytes.

Tiny float64 models with the published block structure (tests/sana_zimage_helpers.py), 5 x 3 split
units: uneven strips for 2 (3+2), 3 (2+2+1) and 4 (2+1+1+1) ranks; a CFG batch of 2, split over two
rank groups or not; SANA's text mask with padding; Z-Image's captions of 7 and 37 tokens (padded to
32 and 64 with the learned pad token), whose image positions therefore differ within the batch.

Tolerances, of the output's scale:
- Z-Image 1e-9: synchronous patch parallelism differs from one process by float64 reduction order
  only (measured 3e-16 to 5e-16).
- SANA 1e-6: diffusers' linear attention casts queries, keys and values to float32 whatever the
  model's dtype, so the strips' sums added over the ranks differ from one process's single sum by
  float32 rounding (measured 6e-9 to 8e-9 over 5 steps). A wrong strip, halo, position or sum moves the
  output by 1e-3 or more (naive strips: 6e-3 to 8e-2).
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from helpers import SLOW_WORLDS, PerWorld, psnr
from sana_zimage_helpers import COLS, ROWS, call_sana, denoise, sana_inputs, tiny_sana, tiny_zimage
from sana_zimage_helpers import zimage_captions as captions

import distrifusion
from distrifusion.engine.comm import Runtime
from distrifusion.measure.simulate import simulate_ranks

STEPS = 5
WORLDS = SLOW_WORLDS  # 4 ranks with -m slow (CI's budget)
FAMILIES = ["sana", "zimage"]
TOL = {"sana": 1e-6, "zimage": 1e-9}
TINY = {"sana": tiny_sana, "zimage": tiny_zimage}
EXACT_CASES = [
    (family, mode, split) for family in FAMILIES for mode in ("sync", "displaced") for split in (True, False)
]


def _run(model, family, config, **kwargs):
    distrifusion.parallelize(model, config)
    try:
        return denoise(model, family, steps=STEPS, **kwargs)
    finally:
        distrifusion.remove(model)


def rank_job(world_size: int) -> dict:
    out = {}
    for family in FAMILIES:
        model = TINY[family]()
        for _, mode, split in [c for c in EXACT_CASES if c[0] == family]:
            warmup = STEPS if mode == "displaced" else 0  # every step synchronous: must be exact
            out[family, mode, split] = _run(
                model, family, distrifusion.ParallelConfig(mode=mode, warmup_steps=warmup, split_cfg=split)
            )
        for mode in ("displaced", "naive"):
            out[family, mode, "approx"] = _run(
                model, family, distrifusion.ParallelConfig(mode=mode, warmup_steps=1, split_cfg=False)
            )
    # SANA 1.5 / Sprint: RMS norm of queries and keys across heads (per token: local).
    sync = distrifusion.ParallelConfig(mode="sync", split_cfg=False)
    out["sana qk_norm"] = _run(tiny_sana(qk_norm="rms_norm_across_heads"), "sana", sync)
    return out


@pytest.fixture(scope="module")
def results():
    return PerWorld(rank_job)


@pytest.fixture(scope="module")
def references():
    refs = {family: denoise(TINY[family](), family, steps=STEPS) for family in FAMILIES}
    refs["sana qk_norm"] = denoise(tiny_sana(qk_norm="rms_norm_across_heads"), "sana", steps=STEPS)
    return refs


def _rel_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("family,mode,split", EXACT_CASES)
def test_exact_paths_match_one_process(results, references, world, family, mode, split):
    outs = [r[family, mode, split] for r in results[world]]
    assert all(torch.equal(o, outs[0]) for o in outs), "ranks finished with different images"
    assert _rel_error(outs[0], references[family]) < TOL[family]


@pytest.mark.parametrize("world", WORLDS)
def test_sana_with_qk_norm_matches_one_process(results, references, world):
    for r in results[world]:
        assert _rel_error(r["sana qk_norm"], references["sana qk_norm"]) < TOL["sana"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_displaced_is_closer_than_naive(results, references, world, family):
    # Measured (5 steps, 1 warm-up, 2/3/4 ranks): SANA displaced 66.5/64.3/63.8 dB, naive 57.7/53.0/51.9 dB;
    # Z-Image displaced 57.2/55.8/55.2 dB, naive 40.2/38.7/38.4 dB.
    ref = references[family]
    displaced = psnr(results[world][0][family, "displaced", "approx"], ref)
    naive = psnr(results[world][0][family, "naive", "approx"], ref)
    assert displaced > naive + {"sana": 6, "zimage": 12}[family], (displaced, naive)


# -- a lossless codec equals uncompressed displaced steps ---------------------------------------------


def _coded_images(family: str, config: distrifusion.ParallelConfig) -> list[torch.Tensor]:
    """2 simulated ranks of a model wide enough that its payloads are coded (>= 4096 values): SANA's
    per-head sums (4 heads x 33 x 32), Z-Image's strips' keys/values (12 x 3 tokens x 128)."""
    if family == "sana":
        base = tiny_sana(num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128)
    else:
        base = tiny_zimage(dim=64, n_heads=4, n_kv_heads=4)

    def rank(runtime):
        model = copy.deepcopy(base)
        distrifusion.parallelize(model, config, runtime=runtime)
        return denoise(model, family, batch=1, steps=4, rows=24)

    return simulate_ranks(2, rank)


@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_codec_is_uncompressed_displaced(monkeypatch, family):
    """A coded buffer is decoded only when the next step waits for it: a lossless codec shows that the
    displaced path never reads another rank's row after this step's gather has started."""
    from distrifusion.engine.compress import BlockCodec

    config = dict(mode="displaced", warmup_steps=1, split_cfg=False)
    plain = _coded_images(family, distrifusion.ParallelConfig(**config))
    coded = []

    class Lossless(BlockCodec):
        def encode(self, x, out):
            coded.append(x.numel())
            super().encode(x, out)

    monkeypatch.setattr("distrifusion.engine.state.make_codec", lambda compress: Lossless("lossless"))
    lossless = _coded_images(family, distrifusion.ParallelConfig(**config, compress="int8"))
    assert coded, "the payloads did go through the codec"
    for a, b in zip(plain, lossless):
        assert torch.equal(a, b)


# -- SANA: what a layer exchanges does not grow with the image ------------------------------------------


def test_sana_linear_attention_bytes_do_not_depend_on_the_image_size():
    """Counted on the meta device with the published 4K model's widths (2 of its 20 layers), CFG batch of
    2 split over 2 groups of 4 ranks: every linear attention sends batch 1 x 70 heads x 33 x 32 float32
    (295,680 bytes) at 1024 px and at 4096 px; the Mix-FFN's halo rows (2 rows of 11,200 channels) grow
    with the width only."""
    from distrifusion.measure.traffic import layer_payloads
    from distrifusion.measure.workload import build_model, model_inputs

    model = build_model(_depth("sana_4k", 2), torch.float32, torch.device("meta"))
    small, large = (layer_payloads(model, model_inputs(model, px, px), 8) for px in (1024, 4096))
    attention = [k for k in small if ".attn1" in k]
    halos = [k for k in small if ".conv_depth" in k]
    assert len(attention) == len(halos) == 2 and set(small) == set(large) == {*attention, *halos}
    assert all(small[k] == large[k] == 70 * 33 * 32 * 4 for k in attention)
    assert all(small[k] == 11200 * 2 * 32 * 4 and large[k] == 4 * small[k] for k in halos)


def _depth(arch: str, layers: int) -> str:
    """A config file like `arch`'s with `layers` transformer blocks (the published widths)."""
    import json
    import tempfile
    from pathlib import Path

    from distrifusion.measure.archs import arch_config_path

    config = json.loads(arch_config_path(arch).read_text())
    for key in ("num_layers", "n_layers"):
        if key in config:
            config[key] = layers
    path = Path(tempfile.mkdtemp()) / f"{arch}_{layers}.json"
    path.write_text(json.dumps(config))
    return str(path)


# -- bad input: the same one-line error on every rank, before any collective -------------------------


class _NoCollective:
    """A communicator that fails the test if any collective is issued."""

    capturable = False

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank

    def all_gather(self, tensor, async_op=False):
        raise AssertionError("a collective was issued before the error")

    all_gather_inplace = all_gather


def _no_collective_runtime(world_size: int, rank: int) -> Runtime:
    comm = _NoCollective(world_size, rank)
    return Runtime(rank, world_size, torch.device("cpu"), comm, {1: comm, 2: _NoCollective(world_size // 2, rank)})


def _refusal(make_model, call, world_size: int = 2) -> str:
    """The error every rank raises, checked to be one line and the same on every rank."""
    messages = []
    for rank in range(world_size):
        model = make_model()
        with pytest.raises((TypeError, ValueError)) as error:
            distrifusion.parallelize(model, runtime=_no_collective_runtime(world_size, rank))
            with torch.no_grad():
                call(model)
        messages.append(str(error.value))
    assert len(set(messages)) == 1 and "\n" not in messages[0], messages
    return messages[0]


def _sana_call(model, **overrides):
    x = torch.randn(2, 4, ROWS, COLS, dtype=torch.float64)
    return call_sana(model, x, 0.5, {**sana_inputs(2), **overrides})


def _zimage_call(model, x=None, **overrides):
    x = torch.randn(2, 4, 2 * ROWS, 2 * COLS, dtype=torch.float64) if x is None else x
    t = torch.full((x.shape[0],), 0.5, dtype=x.dtype)
    return model(list(x.unsqueeze(2).unbind(0)), t, captions(2), return_dict=False, **overrides)[0]


def test_sana_variants_that_cannot_be_split_are_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0, PAGCFGSanaLinearAttnProcessor2_0

    def pag():
        model = tiny_sana()
        model.transformer_blocks[0].attn1.set_processor(PAGCFGSanaLinearAttnProcessor2_0())
        return model

    assert "PAGCFGSanaLinearAttnProcessor2_0" in _refusal(pag, _sana_call)

    def softmax():  # set_default_attn_processor: softmax attention instead of the linear one
        model = tiny_sana()
        model.set_attn_processor(AttnProcessor2_0())
        return model

    assert "SanaLinearAttnProcessor2_0" in _refusal(softmax, _sana_call)
    mask = torch.ones(2, ROWS * COLS, dtype=torch.long)
    assert "attention_mask" in _refusal(tiny_sana, partial(_sana_call, attention_mask=mask))
    assert "attention_kwargs" in _refusal(tiny_sana, partial(_sana_call, attention_kwargs={"extra": 1}))


def test_zimage_variants_that_cannot_be_split_are_refused():
    def omni(model):
        x = [[torch.randn(4, 1, 2 * ROWS, 2 * COLS, dtype=torch.float64)]] * 2
        t = torch.full((2,), 0.5, dtype=torch.float64)
        return model(x, t, [[c] for c in captions(2)], siglip_feats=[None, None], image_noise_mask=[[1], [1]])

    assert "omni" in _refusal(tiny_zimage, omni)
    frames = torch.randn(2, 4, 2, 2 * ROWS, 2 * COLS, dtype=torch.float64)

    def video(model):
        t = torch.full((2,), 0.5, dtype=torch.float64)
        return model(list(frames.unbind(0)), t, captions(2), return_dict=False)

    assert "one frame" in _refusal(tiny_zimage, video)
    residuals = {0: torch.zeros(2, 96, 32, dtype=torch.float64)}
    assert "controlnet_block_samples" in _refusal(
        tiny_zimage, partial(_zimage_call, controlnet_block_samples=residuals)
    )
    assert "patch sizes" in _refusal(lambda: tiny_zimage(all_patch_size=(2, 4), all_f_patch_size=(1, 1)), _zimage_call)


# -- remove, and a SANA ControlNet's residuals ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_model(family):
    model = TINY[family]()
    before = copy.deepcopy(model)

    def processors():
        return {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "set_processor")}

    original = processors()
    distrifusion.parallelize(model)
    distrifusion.remove(model)
    assert processors() == original
    assert all("forward" not in m.__dict__ and "patchify_and_embed" not in m.__dict__ for m in model.modules())
    call = _sana_call if family == "sana" else _zimage_call
    torch.manual_seed(0)
    after = call(model)
    torch.manual_seed(0)
    expected = call(before)
    after, expected = (torch.stack(list(v)) if isinstance(v, list) else v for v in (after, expected))
    assert torch.equal(after, expected)


def test_sana_controlnet_residuals_are_cut_in_strips():
    """SanaControlNetPipeline adds (batch, tokens, channels) residuals after the blocks: each rank takes its
    strip's tokens (sync mode, 3 ranks of uneven strips)."""
    model = tiny_sana(num_layers=3)
    x = torch.randn(2, 4, ROWS, COLS, dtype=torch.float64)
    residuals = tuple(torch.randn(2, ROWS * COLS, 16, dtype=torch.float64) for _ in range(2))
    cond = dict(sana_inputs(2), controlnet_block_samples=residuals)
    with torch.no_grad():
        reference = call_sana(model, x, 0.5, cond)
        without = call_sana(model, x, 0.5, sana_inputs(2))
    assert _rel_error(without, reference) > 1e-3, "the residuals must matter"

    def rank(runtime):
        replica = copy.deepcopy(model)
        distrifusion.parallelize(replica, distrifusion.ParallelConfig(mode="sync", split_cfg=False), runtime=runtime)
        with torch.no_grad():
            return call_sana(replica, x, 0.5, cond)

    for out in simulate_ranks(3, rank):
        assert _rel_error(out, reference) < TOL["sana"]


def test_zimage_output_is_the_models_list():
    """The model takes and returns lists: a split call returns a list of per-sample tensors, as one process."""
    model = tiny_zimage()
    x = torch.randn(2, 4, 2 * ROWS, 2 * COLS, dtype=torch.float64)
    with torch.no_grad():
        reference = _zimage_call(model, x)

    def rank(runtime):
        replica = copy.deepcopy(model)
        distrifusion.parallelize(replica, distrifusion.ParallelConfig(mode="sync", split_cfg=False), runtime=runtime)
        with torch.no_grad():
            return _zimage_call(replica, x)

    for out in simulate_ranks(2, rank):
        assert isinstance(out, list) and len(out) == 2
        for a, b in zip(out, reference):
            assert a.shape == b.shape and _rel_error(a, b) < TOL["zimage"]


def test_the_command_line_knows_the_published_configs():
    """`distrifusion bench --arch sana_4k | z_image` (torch-free checks): SANA's block is one latent row of
    its DC-AE's 32 px with a CFG batch; Z-Image-Turbo's one token row of 2 x 8 px, without CFG."""
    from distrifusion.app.cli_checks import UsageError, bench_geometry, check_image_size

    sana, zimage = bench_geometry("sana_4k"), bench_geometry("z_image")
    assert (sana.block_px, sana.cfg, zimage.block_px, zimage.cfg) == (32, True, 16, False)
    with pytest.raises(UsageError, match="multiple of the model's block of 32 px"):
        check_image_size(sana, 1000, 1024, 8)
    assert check_image_size(zimage, 4096, 4096, 8) == 8


def test_zimage_rising_timestep_is_one_image():
    """ZImagePipeline passes t = (1000 - timestep) / 1000, which rises over an image: the engine must not take
    each call for a new image's first (every step would then run synchronously, never displaced)."""
    base = tiny_zimage()

    def rank(runtime):
        model = copy.deepcopy(base)
        distrifusion.parallelize(model, distrifusion.ParallelConfig(warmup_steps=1), runtime=runtime)
        denoise(model, "zimage", batch=1, steps=4)
        return model._distrifusion_state.step

    assert simulate_ranks(2, rank) == [4, 4]
