"""diffusers' step caches on a parallelised model (`distrifusion.engine.caches`, issue 26).

- First-block cache on tiny float64 Flux over 2 gloo processes, on inputs whose strips' own statistics would
  decide differently (the top strip's first-block residual moves by less than the threshold, the bottom
  one's by more): every rank takes the whole image's decision, the one process's, and sync mode's output
  equals one process with the same cache (measured 2e-16 of the output scale; bound 1e-9).
- A first-block cache hook that cannot be fed the whole image's statistic (a subclass deciding its own way)
  is refused by name on every gloo rank before any collective, on the same diverging inputs.
- With the CFG split (2 and 4 ranks, batch 2 on Flux) the statistic spans both branches, as in one process.
- The same agreement on the embedded DiT (its pipeline, 3 simulated ranks, CFG-free) and in displaced mode
  whose warm-up covers every step (= one process); MagCache's calibration records the whole image's ratios;
  SeaCache (decides from the model's whole input, above the split) on Wan T2V equals one process.
- Hooks on fixed schedules stay exact: pyramid attention broadcast and TaylorSeer on SD3 (3 ranks, CFG split),
  MagCache with given ratios on Flux. FasterCache is refused with the CFG split; the first-block cache is
  refused by name on SD3, where diffusers' own hook cannot run (its last block returns no text stream).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import run_ranks
from transformer_helpers import call_inputs, denoise, image_shape, tiny_transformer

import distrifusion
from distrifusion.engine.caches import cache_decisions
from distrifusion.measure.caching import ComputedCalls, cache_context, enable_cache, parse_cache
from distrifusion.measure.simulate import simulate_ranks

ROWS, COLS = 6, 4
THRESHOLD = 0.1


def _relative(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out - expected).abs().max() / expected.abs().max()).item()


def _flux_call(model, scale_bottom: float) -> torch.Tensor:
    """One Flux call on fixed noise whose bottom half (the second rank's strip) is scaled by `scale_bottom`."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, *image_shape("flux", ROWS, COLS), generator=g, dtype=torch.float64)
    x[:, ROWS * COLS // 2 :] *= scale_bottom
    t = torch.full((1,), 0.5, dtype=torch.float64)
    with torch.no_grad(), model.cache_context("cond"):  # as a pipeline calls a model with a cache
        return model(hidden_states=x, timestep=t, return_dict=False, **call_inputs("flux", 1, ROWS, COLS))[0]


SCALES = (1.0, 2.0, 3.0, 3.05)
"""The calls: the second doubles the bottom strip: its first-block residual moves by 0.149 of its size there, by
0.043 on the top strip, 0.093 on the whole image; with THRESHOLD 0.1 the top rank alone would skip, the bottom one
compute, one process skips. The third moves the whole image's by 0.125 (computed), the fourth by 0.001 (skipped)."""


def _head_hook(model):
    return model.transformer_blocks[0]._diffusers_hook.hooks["fbc_leader_block_hook"]


def _first_block_cache_job(subclass: bool) -> dict:
    from diffusers import FirstBlockCacheConfig
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    model = tiny_transformer("flux")
    model.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    if subclass:  # a hook distrifusion does not know how to feed

        class OwnHead(FBCHeadBlockHook):
            pass

        _head_hook(model).__class__ = OwnHead
    out: dict = {"outputs": [], "local_ratios": []}
    try:  # refused at parallelize (or at the first call, were the hook enabled after it)
        distrifusion.parallelize(model, distrifusion.ParallelConfig(mode="sync", timeout_s=60))
        out["outputs"].append(_flux_call(model, SCALES[0]))
        fed = _head_hook(model)._distrifusion_fed  # this rank's own sums, before they are reduced
        whole = fed.whole
        fed.whole = lambda *sums: (out["local_ratios"].append((sums[0] / sums[1]).item()), whole(*sums))[1]
        out["outputs"] += [_flux_call(model, s) for s in SCALES[1:]]
    except ValueError as refusal:
        out["refusal"] = str(refusal)
    out["decisions"] = cache_decisions(model)
    return out


def test_first_block_cache_takes_the_whole_image_decision_on_every_gloo_rank():
    from diffusers import FirstBlockCacheConfig

    reference = tiny_transformer("flux")
    reference.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
    computed = ComputedCalls(reference)
    expected = [_flux_call(reference, s) for s in SCALES]
    assert computed.computed == 2  # one process computes the first and third calls: the test sees both decisions
    results = run_ranks(2, _first_block_cache_job, False)
    top, bottom = (r["local_ratios"][0] for r in results)
    assert top < THRESHOLD < bottom  # each rank alone would have decided differently
    for result in results:
        assert result["decisions"] == [False, True, False]  # one process's, on every rank
        for out, want in zip(result["outputs"], expected, strict=True):
            assert _relative(out, want) <= 1e-9


def test_a_first_block_cache_hook_that_cannot_be_fed_is_refused_on_every_gloo_rank():
    for result in run_ranks(2, _first_block_cache_job, True):
        assert "first-block cache (FirstBlockCacheConfig)" in result["refusal"]
        assert "OwnHead" in result["refusal"] and "disable_cache()" in result["refusal"]
        assert result["outputs"] == [] and result["decisions"] == []


def _parallel(base, ranks: int, run, config: dict, cache=None, order="before") -> list:
    """`run(model)` on `ranks` simulated ranks, each with its own copy of `base` (with `cache` enabled before or
    after `parallelize`): [(output, calls computed, whole-image decisions)] per rank."""
    models = [copy.deepcopy(base) for _ in range(ranks)]

    def rank(runtime):
        model = models[runtime.rank]
        if cache and order == "before":
            cache(model)
        distrifusion.parallelize(model, distrifusion.ParallelConfig(timeout_s=60, **config), runtime=runtime)
        if cache and order == "after":
            cache(model)
        target = getattr(model, "transformer", model)
        counter = ComputedCalls(target)
        return run(model), counter.computed, cache_decisions(target)

    return simulate_ranks(ranks, rank)


@pytest.fixture(scope="module")
def dit():
    from distrifusion.app.pipelines import load_texture_dit_pipeline

    pipe = load_texture_dit_pipeline(torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_image(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(["grass"], height=24, width=16, num_inference_steps=5, generator=generator, output_type="pt").images


@pytest.mark.parametrize("mode", ["sync", "displaced"])
def test_first_block_cache_on_the_embedded_dit_equals_one_process(dit, mode):
    # Displaced mode whose warm-up covers every step is synchronous throughout: one process's image.
    spec = parse_cache("fbcache:0.4")  # at 5 steps the DiT's first block moves by 0.26-0.5: some calls skip
    reference = copy.deepcopy(dit)
    enable_cache(reference.transformer, spec)
    counter = ComputedCalls(reference.transformer)
    expected = _dit_image(reference)
    assert 1 < counter.computed < counter.calls == 5
    config = dict(mode=mode, warmup_steps=5)
    order = "after" if mode == "sync" else "before"
    results = _parallel(dit, 3, _dit_image, config, lambda p: enable_cache(p.transformer, spec), order)
    for out, computed, decisions in results:
        assert computed == counter.computed and decisions == results[0][2] and len(decisions) == 4
        assert _relative(out, expected) <= 1e-9


def test_magcache_calibration_records_the_whole_image_ratios():
    from diffusers import MagCacheConfig

    def calibrate(model):
        model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=10))

    def ratios(model) -> list[float]:
        with model.cache_context("cond"):
            denoise(model, "flux", ROWS, COLS, batch=1, steps=3)
            hook = model.single_transformer_blocks[-1]._diffusers_hook.hooks["mag_cache_block_hook"]
            return list(hook.state_manager.get_state().calibration_ratios)

    reference = tiny_transformer("flux")
    calibrate(copy.deepcopy(reference))
    one = copy.deepcopy(reference)
    calibrate(one)
    expected = ratios(one)
    assert len(expected) == 3
    for got, _, _ in _parallel(reference, 2, ratios, dict(mode="sync"), calibrate):
        # diffusers averages the float32 ratios in float32, the whole image's mean sums them in float64: float32
        # rounding apart (measured 2e-8).
        assert got == pytest.approx(expected, rel=1e-6)


def _sd3_denoise(model) -> torch.Tensor:
    with cache_context(model, "cond"):  # SD3's model has no CacheMixin: the context set on its hooks alike
        return denoise(model, "sd3", 6, 4, batch=2, steps=4)


@pytest.mark.parametrize("cache", ["pab:2", "taylorseer:2"])
def test_caches_on_fixed_schedules_stay_exact_on_sd3(cache):
    spec = parse_cache(cache)
    base = tiny_transformer("sd3")
    reference = copy.deepcopy(base)
    enable_cache(reference, spec)
    expected = _sd3_denoise(reference)
    assert _relative(_sd3_denoise(copy.deepcopy(base)), expected) > 1e-4  # the cache changes the image
    for out, _, _ in _parallel(base, 3, _sd3_denoise, dict(mode="sync"), lambda m: enable_cache(m, spec)):
        assert _relative(out, expected) <= 1e-9


def test_magcache_with_given_ratios_stays_exact_on_flux():
    from diffusers import MagCacheConfig

    def magcache(model):
        ratios = torch.tensor([1.0, 0.99, 0.98, 0.97, 0.96])
        model.enable_cache(MagCacheConfig(mag_ratios=ratios, num_inference_steps=5, threshold=0.5, retention_ratio=0))

    def run(model):
        with model.cache_context("cond"):
            return denoise(model, "flux", ROWS, COLS, batch=2, steps=5)

    base = tiny_transformer("flux")
    reference = copy.deepcopy(base)
    magcache(reference)
    counter = ComputedCalls(reference)
    expected = run(reference)
    assert counter.computed < counter.calls
    for out, computed, _ in _parallel(base, 2, run, dict(mode="sync", split_cfg=False), magcache):
        assert computed == counter.computed and _relative(out, expected) <= 1e-9


def test_faster_cache_is_refused_with_the_cfg_split():
    from diffusers import FasterCacheConfig

    def faster(model):
        model.enable_cache(FasterCacheConfig(current_timestep_callback=lambda: 500))

    with pytest.raises(ValueError, match=r"FasterCache .*split_cfg=False"):
        _parallel(tiny_transformer("flux"), 2, lambda m: _flux_call(m, 1.0), dict(mode="sync"), faster)


def test_first_block_cache_is_refused_by_name_where_diffusers_cannot_run_it():
    with pytest.raises(ValueError, match=r"fbcache does not run on SD3Transformer2DModel"):
        enable_cache(tiny_transformer("sd3"), parse_cache("fbcache:0.1"))


def test_cache_specs_are_checked():
    assert str(parse_cache("fbcache:0.1")) == "fbcache:0.1" and str(parse_cache("pab:3")) == "pab:3"
    with pytest.raises(ValueError, match="unknown cache 'teacache'"):
        parse_cache("teacache:0.1")
    with pytest.raises(ValueError, match="whole number of calls >= 2"):
        parse_cache("taylorseer:1.5")
    with pytest.raises(ValueError, match="positive number"):
        parse_cache("fbcache:-1")


def test_seacache_decides_above_the_split_and_equals_one_process_on_wan():
    # SeaCache's root hook decides from the model's input latent (its spectral indicator), which every rank
    # receives whole: the same decisions as one process without a collective.
    config_cls = pytest.importorskip("diffusers").SeaCacheConfig
    from wan_helpers import tiny_wan, video_inputs

    steps = 6

    def run(model) -> torch.Tensor:
        inputs = video_inputs(model)
        x = inputs.pop("hidden_states")
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        with torch.no_grad():
            for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
                with model.cache_context("cond", step_index=i, sigma=s, num_inference_steps=steps):
                    v = model(hidden_states=x, timestep=torch.full((1,), 1000 * s), return_dict=False, **inputs)[0]
                x = x + (s_next - s) * v
        return x

    def seacache(model):
        model.enable_cache(config_cls(threshold=10.0, max_consecutive_cached=2))

    base = tiny_wan("t2v")
    reference = copy.deepcopy(base)
    seacache(reference)
    counter = ComputedCalls(reference)
    expected = run(reference)
    assert counter.computed < counter.calls == steps  # some calls reuse the cached residual
    for out, computed, _ in _parallel(base, 2, run, dict(mode="sync"), seacache):
        assert computed == counter.computed and _relative(out, expected) <= 1e-9


@pytest.mark.parametrize("ranks", [2, 4])
def test_first_block_cache_spans_both_cfg_branches_with_the_cfg_split(ranks):
    # One process's statistic is over the whole CFG batch; with the CFG split each rank group computes one
    # branch, so the sums are reduced over every rank (both groups), and the decisions are one process's.
    spec = parse_cache("fbcache:0.3")

    def run(model):
        with model.cache_context("cond"):
            return denoise(model, "flux", ROWS, COLS, batch=2, steps=8)

    base = tiny_transformer("flux")
    reference = copy.deepcopy(base)
    enable_cache(reference, spec)
    counter = ComputedCalls(reference)
    expected = run(reference)
    assert 1 < counter.computed < counter.calls
    for out, computed, _ in _parallel(base, ranks, run, dict(mode="sync"), lambda m: enable_cache(m, spec)):
        assert computed == counter.computed and _relative(out, expected) <= 1e-9
