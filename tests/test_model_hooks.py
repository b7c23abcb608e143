"""diffusers' model hooks and quantised weights on a parallelised model (`distrifusion.engine.hooks`).

- Weights behind a hook or quantised: layerwise casting (float8 storage, `enable_layerwise_casting`), group
  offloading (block and leaf level) and torchao int8 weight-only quantisation, enabled before or after
  `parallelize`, on PixArt (self-attention's fused key/value projection read the weights directly) and a UNet
  (halo convs too). Sync mode on 2 ranks against the same cast/offloaded/quantised model in one process:
  float64 1e-9 of the output scale (reduction order only; measured 2e-16 PixArt, 4e-14 UNet); torchao in
  float32: PixArt bit-identical, the UNet within 2e-4 (measured 3.7e-5, as its unquantised float32 run:
  2.5e-5). Before the fix each of them failed ("mat1 and mat2 must have the same dtype", "Int8Tensor
  dispatch: ... aten.cat"). Group offloading here moves weights from the CPU to the CPU: the hooks run and
  the engine's layers sit beneath them, but no weight changes device (checked on a GPU: not yet).
- Hooks that decide from the data a rank sees (the first-block cache, MagCache while it calibrates) are
  refused by name on every rank before any collective: over 2 gloo ranks, with inputs on which the ranks'
  strips would decide differently (before: one rank skipped the remaining blocks, the other did not, and gloo
  failed with a collective mismatch). A cache on a fixed schedule (pyramid attention broadcast) stays exact.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from helpers import BLOCK, run_ranks, tiny_model
from helpers import denoise as unet_denoise
from transformer_helpers import call_inputs, image_shape, tiny_transformer
from transformer_helpers import denoise as transformer_denoise

import distrifusion
from distrifusion.measure.simulate import simulate_ranks

CPU = torch.device("cpu")
FEATURES = {
    "layerwise casting": lambda m: m.enable_layerwise_casting(
        storage_dtype=torch.float8_e4m3fn, compute_dtype=next(m.parameters()).dtype
    ),
    "block offloading": lambda m: m.enable_group_offload(CPU, CPU, offload_type="block_level", num_blocks_per_group=1),
    "leaf offloading": lambda m: m.enable_group_offload(CPU, CPU, offload_type="leaf_level"),
}


def _make(kind: str, dtype: torch.dtype):
    return tiny_transformer("pixart", dtype=dtype) if kind == "pixart" else tiny_model("sd15", dtype=dtype)


def _run(kind: str, model, dtype: torch.dtype) -> torch.Tensor:
    if kind == "pixart":
        return transformer_denoise(model, "pixart", 5, 3, steps=3, dtype=dtype)
    return unet_denoise(model, "sd15", 5 * BLOCK, 3 * BLOCK, steps=3, dtype=dtype)


def _parallel_against_one_process(kind: str, feature, order: str, dtype=torch.float64) -> tuple[list, torch.Tensor]:
    reference = _make(kind, dtype)
    feature(reference)
    expected = _run(kind, reference, dtype)
    models = [_make(kind, dtype) for _ in range(2)]  # built here: the global RNG is not for threads

    def rank(runtime):
        model = models[runtime.rank]
        if order == "before":
            feature(model)
        distrifusion.parallelize(model, distrifusion.ParallelConfig(mode="sync", split_cfg=False), runtime=runtime)
        if order == "after":
            _run(kind, model, dtype)  # an image first: the engine has read the weights once
            feature(model)
        return _run(kind, model, dtype)

    return simulate_ranks(2, rank), expected


def _relative(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out - expected).abs().max() / expected.abs().max()).item()


HOOK_CASES = [
    ("pixart", "layerwise casting", "before"),
    ("pixart", "layerwise casting", "after"),
    ("unet", "layerwise casting", "before"),
    ("unet", "layerwise casting", "after"),
    ("unet", "block offloading", "before"),
    ("pixart", "leaf offloading", "after"),
]


@pytest.mark.parametrize("kind,feature,order", HOOK_CASES)
def test_weights_behind_hooks_are_exact(kind, feature, order):
    results, expected = _parallel_against_one_process(kind, FEATURES[feature], order)
    if feature == "layerwise casting":  # the cast must matter for the test to mean anything
        assert _relative(_run(kind, _make(kind, torch.float64), torch.float64), expected) > 1e-3
    for out in results:
        assert _relative(out, expected) <= 1e-9


@pytest.mark.parametrize("kind,tol", [("pixart", 0.0), ("unet", 2e-4)])
def test_torchao_int8_weight_only_is_exact(kind, tol):
    quantization = pytest.importorskip("torchao.quantization")

    def quantise(model):
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig())

    results, expected = _parallel_against_one_process(kind, quantise, "before", dtype=torch.float32)
    for out in results:
        assert _relative(out, expected) <= tol


def test_quantised_conv_weights_are_refused_by_name():
    class Packed(torch.Tensor):  # stands for a quantised weight: a tensor subclass the layer cannot convolve with
        pass

    model = tiny_model("sd15")
    conv = model.down_blocks[0].resnets[0].conv1
    conv.weight = torch.nn.Parameter(conv.weight.detach().as_subclass(Packed))
    with pytest.raises(TypeError, match=r"conv 'down_blocks.0.resnets.0.conv1' holds Packed weights \(quantised\?\)"):
        distrifusion.parallelize(model, distrifusion.ParallelConfig(mode="sync"))


# ----------------------------------------------------------------------------- cache hooks

ROWS, COLS = 6, 4


def _flux_call(model, scale_bottom: float) -> torch.Tensor:
    """One Flux call on fixed noise whose bottom half (the second rank's strip) is scaled by `scale_bottom`."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, *image_shape("flux", ROWS, COLS), generator=g, dtype=torch.float64)
    x[:, ROWS * COLS // 2 :] *= scale_bottom
    t = torch.full((1,), 0.5, dtype=torch.float64)
    with torch.no_grad(), model.cache_context("cond"):  # as a pipeline calls a model with a cache
        return model(hidden_states=x, timestep=t, return_dict=False, **call_inputs("flux", 1, ROWS, COLS))[0]


def _first_block_cache_job(order: str) -> dict:
    from diffusers import FirstBlockCacheConfig

    model = tiny_transformer("flux")
    # The second call doubles the bottom strip: the first block's residual moves by 0.043 of its size on the
    # top strip and by 0.149 on the bottom one, so with a threshold of 0.1 the top rank alone would skip the
    # remaining blocks and the bottom rank would not.
    config = FirstBlockCacheConfig(threshold=0.1)
    out = {}
    if order == "before":
        model.enable_cache(config)
    try:
        distrifusion.parallelize(model, distrifusion.ParallelConfig(mode="sync", timeout_s=60))
        if order == "after":
            model.enable_cache(config)
        _flux_call(model, 1.0)
        _flux_call(model, 2.0)
    except ValueError as refusal:
        out["refusal"] = str(refusal)
    if order == "after":  # without the cache, the model runs again
        model.disable_cache()
        out["after disable"] = _flux_call(model, 2.0)
    return out


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_data_dependent_cache_is_refused_on_every_rank(order):
    results = run_ranks(2, _first_block_cache_job, order)
    for result in results:
        assert "first-block cache (FirstBlockCacheConfig)" in result["refusal"]
        assert "disable_cache()" in result["refusal"]
    if order == "after":
        expected = _flux_call(tiny_transformer("flux"), 2.0)
        for result in results:
            assert _relative(result["after disable"], expected) <= 1e-9


def test_magcache_calibration_is_refused():
    from diffusers import MagCacheConfig

    model = tiny_transformer("flux")
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=3))
    with pytest.raises(ValueError, match=r"MagCache calibration \(MagCacheConfig\(calibrate=True\)\)"):
        distrifusion.parallelize(model, distrifusion.ParallelConfig(mode="sync"))


def test_a_cache_on_a_fixed_schedule_stays_exact_in_sync_mode():
    # Pyramid attention broadcast: attention recomputed every other call, reused in between (the timestep
    # range covers every step). The same calls skip on every rank, so the image is one process's.
    from diffusers import PyramidAttentionBroadcastConfig

    def with_broadcast(model):
        clock = {"t": 1000}
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: clock["t"],
        )
        model.enable_cache(config)
        return model

    base = tiny_transformer("flux")
    expected = transformer_denoise(with_broadcast(copy.deepcopy(base)), "flux", ROWS, COLS, batch=1, steps=4)
    assert _relative(transformer_denoise(copy.deepcopy(base), "flux", ROWS, COLS, batch=1, steps=4), expected) > 1e-3

    def rank(runtime, order):
        model = models[runtime.rank] if order == "after" else with_broadcast(models[runtime.rank])
        distrifusion.parallelize(model, distrifusion.ParallelConfig(mode="sync"), runtime=runtime)
        if order == "after":
            with_broadcast(model)
        return transformer_denoise(model, "flux", ROWS, COLS, batch=1, steps=4)

    for order in ("before", "after"):
        models = [copy.deepcopy(base) for _ in range(2)]
        for out in simulate_ranks(2, partial(rank, order=order)):
            assert _relative(out, expected) <= 1e-9, order
