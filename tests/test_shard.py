"""Weights sharded across the ranks (ParallelConfig.shard_weights, FSDP2) against the same ranks unsharded.

Float64 tiny models (UNets, Flux, SD3, Wan) on 2, 3 and 4 gloo processes: the sharded model's images must
equal the unsharded model's bit for bit (`torch.equal`) in sync mode and in displaced mode, for a
second image and after a size change; `remove` must give back a whole model (plain tensors, the
original classes, no hooks, the same bits, the same gradient flags). Each world size is one spawn of
its ranks, in which every case runs unsharded and sharded.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PerWorld, run_ranks, tiny_model
from helpers import denoise as unet_denoise
from transformer_helpers import denoise as dit_denoise
from transformer_helpers import tiny_transformer

import distrifusion

# (family, mode, ranks, shard_group, batch): each world size covers sync and displaced, uneven strips
# (3 ranks), and the CFG split (4 ranks, batch 2) with both shard groups.
CASES = {
    2: [("sdxl", "sync", "world", 2), ("sd3", "sync", "world", 2), ("wan", "sync", "world", 1)],
    3: [
        ("sd15", "displaced", "world", 2),
        ("flux", "displaced", "world", 1),
        ("sd3", "displaced", "world", 2),
        ("wan", "displaced", "world", 1),
    ],
    4: [("flux", "sync", "world", 2), ("flux", "sync", "cfg_group", 2), ("sdxl", "displaced", "cfg_group", 2)],
}
UNETS = ("sdxl", "sd15")


def _model(family):
    if family == "wan":
        from wan_helpers import tiny_wan

        return tiny_wan("t2v")
    return tiny_model(family) if family in UNETS else tiny_transformer(family)


def _images(model, family, batch):
    """Two images of one size (a reset between them) and one of another size."""
    out = []
    for size in (0, 0, 1):
        distrifusion.reset(model)
        if family == "wan":
            from wan_helpers import ROWS
            from wan_helpers import denoise as wan_denoise

            out.append(wan_denoise(model, steps=3, rows=ROWS - 2 * size))  # 5 token rows, then 4
        elif family in UNETS:
            out.append(unet_denoise(model, family, 20 + 4 * size, 16, steps=3))
        else:
            out.append(dit_denoise(model, family, 5 + size, 3, batch=batch, steps=3))
    return out


def _whole(model) -> dict:
    """What a whole, unparallelised model looks like: its weights (bits), gradient flags, classes, hooks."""
    return dict(
        weights={n: p.detach().clone() for n, p in model.named_parameters()},
        flags={n: p.requires_grad for n, p in model.named_parameters()},
        kinds={type(p).__name__ for p in model.parameters()} | {type(p.data).__name__ for p in model.parameters()},
        classes=[type(m).__name__ for m in model.modules()],
        hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        state_hooks=sum(len(m._state_dict_pre_hooks) + len(m._load_state_dict_pre_hooks) for m in model.modules()),
    )


def rank_job(world: int) -> dict:
    out = {}
    for family, mode, group, batch in CASES[world]:
        model = _model(family)
        next(model.parameters()).requires_grad_(False)  # a flag the user set: kept while sharded, restored after
        before = _whole(model)
        for shard in (False, True):
            config = distrifusion.ParallelConfig(mode=mode, warmup_steps=1, shard_weights=shard, shard_group=group)
            distrifusion.parallelize(model, config)
            state = model._distrifusion_state
            units = 0 if state.sharding is None else len(state.sharding.units)
            sharded_kinds = {type(p).__name__ for p in model.parameters()}
            images = _images(model, family, batch)
            out[family, mode, group, shard] = dict(images=images, units=units, kinds=sharded_kinds)
            distrifusion.remove(model)
        out[family, mode, group, "after"] = _whole(model)
        out[family, mode, group, "before"] = before
    return out


@pytest.fixture(scope="module")
def results():
    return PerWorld(rank_job)


# 4 ranks (the CFG split with both shard groups) with -m slow: the costliest run on CI's 2 cores.
ALL = [
    pytest.param(world, *case, marks=[pytest.mark.slow] * (world == 4))
    for world, cases in CASES.items()
    for case in cases
]


@pytest.mark.parametrize("world,family,mode,group,batch", ALL)
def test_sharded_images_equal_unsharded_bit_for_bit(results, world, family, mode, group, batch):
    for rank in results[world]:
        whole, sharded = rank[family, mode, group, False], rank[family, mode, group, True]
        assert sharded["units"] > 1 and "DTensor" in sharded["kinds"]  # it did shard
        assert whole["units"] == 0 and "DTensor" not in whole["kinds"]
        for a, b in zip(whole["images"], sharded["images"]):
            assert torch.equal(a, b)
        assert torch.equal(sharded["images"][0], sharded["images"][1])  # the second image: same as the first
        assert sharded["images"][2].shape != sharded["images"][0].shape  # the size did change
    first = results[world][0][family, mode, group, True]["images"]
    assert all(torch.equal(r[family, mode, group, True]["images"][0], first[0]) for r in results[world])


@pytest.mark.parametrize("world,family,mode,group,batch", ALL)
def test_remove_gives_back_the_whole_model(results, world, family, mode, group, batch):
    for rank in results[world]:
        before, after = rank[family, mode, group, "before"], rank[family, mode, group, "after"]
        assert after["kinds"] == {"Parameter", "Tensor"}
        assert after["classes"] == before["classes"] and after["hooks"] == before["hooks"]
        assert after["state_hooks"] == before["state_hooks"]
        assert after["flags"] == before["flags"] and not all(after["flags"].values())
        assert after["weights"].keys() == before["weights"].keys()
        assert all(torch.equal(after["weights"][n], w) for n, w in before["weights"].items())


# -- what cannot be sharded: one line on every rank, before any collective ------------------------


def refusal_job() -> dict:
    answers = {}
    for problem in ("non-contiguous", "meta"):
        model = tiny_transformer("flux")
        if problem == "non-contiguous":
            model.proj_out.weight.data = model.proj_out.weight.data.t().contiguous().t()
        else:
            model.proj_out.to_empty(device="meta")
        try:
            distrifusion.parallelize(model, distrifusion.ParallelConfig(shard_weights=True))
            answers[problem] = "accepted"
        except ValueError as refusal:
            import torch.distributed as dist

            answers[problem] = f"{refusal} | group: {dist.is_initialized()}"
    return answers


def test_unshardable_weights_refused_on_every_rank_before_any_collective():
    answers = run_ranks(2, refusal_job)
    for problem, message in (("non-contiguous", "not contiguous"), ("meta", "meta device")):
        first, second = answers[0][problem], answers[1][problem]
        assert first == second and message in first and "proj_out.weight" in first
        assert first.endswith("group: False") and "\n" not in first  # no process group was even made


def test_cuda_graphs_with_sharding_refused():
    with pytest.raises(ValueError, match="cannot capture FSDP2"):
        distrifusion.ParallelConfig(shard_weights=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="shard_weights"):
        distrifusion.ParallelConfig(shard_weights="yes")
    with pytest.raises(ValueError, match="shard_group"):
        distrifusion.ParallelConfig(shard_group="node")


def test_one_rank_runs_unsharded():
    model = tiny_transformer("flux")
    distrifusion.parallelize(model, distrifusion.ParallelConfig(shard_weights=True))
    assert model._distrifusion_state.sharding is None
    distrifusion.remove(model)


# -- a pipeline: the text encoders placed (ParallelConfig.text_encoders), and shard_weights="auto" ----------


def pipeline_job() -> dict:
    from pipeline_helpers import run_text, tiny_sdxl

    import distrifusion.measure.memory as memory

    out = {}
    pipe = tiny_sdxl()
    before = {name: _whole(getattr(pipe, name)) for name in ("text_encoder", "text_encoder_2")}
    for shard, placement in ((False, "replicated"), (True, "sharded"), (True, "cpu"), (True, "auto")):
        config = distrifusion.ParallelConfig(mode="sync", shard_weights=shard, text_encoders=placement)
        distrifusion.parallelize(pipe, config)
        kinds = {type(p).__name__ for p in pipe.text_encoder.parameters()}
        on_cpu = type(pipe.text_encoder.__dict__.get("forward")).__name__ == "_OnCPU"
        out[placement] = dict(result=run_text(pipe), kinds=kinds, on_cpu=on_cpu)
        distrifusion.remove(pipe)
    out["after"] = {name: _whole(getattr(pipe, name)) for name in ("text_encoder", "text_encoder_2")}
    out["before"] = before
    # shard_weights="auto": sharded only when the plan's peak does not fit the device (its size patched here).
    for capacity in (1e15, 1e9):
        memory.local_capacity = lambda device, capacity=capacity: capacity
        model = tiny_transformer("flux")
        distrifusion.parallelize(model, distrifusion.ParallelConfig(shard_weights="auto"))
        state = model._distrifusion_state
        out["auto", capacity] = (state.sharding is not None, state.config.shard_weights, state.auto_plan)
        distrifusion.remove(model)
    # A module replaced after sharding (as peft does when a LoRA is loaded): refused on every rank.
    model = distrifusion.parallelize(tiny_transformer("flux"), distrifusion.ParallelConfig(shard_weights=True))
    dit_denoise(model, "flux", 5, 3, steps=1)
    model.proj_out = torch.nn.Linear(model.proj_out.in_features, model.proj_out.out_features).double()
    distrifusion.reset(model)
    try:
        dit_denoise(model, "flux", 5, 3, steps=1)
        out["changed"] = "accepted"
    except ValueError as refusal:
        out["changed"] = str(refusal)
    distrifusion.remove(model)
    out["changed kinds"] = {type(p).__name__ for p in model.parameters()}
    return out


@pytest.fixture(scope="module")
def pipeline_results():
    return run_ranks(2, pipeline_job)


def test_text_encoders_placed_and_images_unchanged(pipeline_results):
    for rank in pipeline_results:
        reference_latents, reference_image = rank["replicated"]["result"]
        for placement in ("sharded", "cpu", "auto"):
            latents, image = rank[placement]["result"]
            assert torch.equal(latents, reference_latents) and torch.equal(image, reference_image), placement
        assert "DTensor" in rank["sharded"]["kinds"] and not rank["sharded"]["on_cpu"]
        assert rank["cpu"]["on_cpu"] and "DTensor" not in rank["cpu"]["kinds"]
        # auto: tiny encoders (far below 1 GB) stay whole beside a sharded denoiser
        assert "DTensor" not in rank["auto"]["kinds"] and not rank["auto"]["on_cpu"]
        for name, before in rank["before"].items():
            after = rank["after"][name]
            assert after["kinds"] == {"Parameter", "Tensor"} and after["classes"] == before["classes"]
            assert all(torch.equal(after["weights"][n], w) for n, w in before["weights"].items())


def test_shard_weights_auto_shards_only_what_does_not_fit(pipeline_results):
    for rank in pipeline_results:
        fits_sharded, fits_value, fits_plan = rank["auto", 1e15]
        assert not fits_sharded and fits_value is False and not fits_plan["memory"]["sharded"]
        tight_sharded, tight_value, tight_plan = rank["auto", 1e9]
        assert tight_sharded and tight_value is True and tight_plan["memory"]["capacity"] == 1e9


@pytest.mark.parametrize("offload", ["model", "sequential", "group", "text encoder"])
def test_offloading_is_refused_naming_shard_weights(offload):
    # accelerate's offloading is refused; diffusers' group offloading runs beneath the engine's layers
    # (tests/test_model_hooks.py) but not with sharded weights: both would move the denoiser's weights.
    from pipeline_helpers import tiny_sd

    pipe = tiny_sd()
    cpu = torch.device("cpu")
    config = distrifusion.ParallelConfig()
    if offload == "model":
        pipe.enable_model_cpu_offload(device=cpu)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=cpu)
    elif offload == "text encoder":  # accelerate's hook on a component other than the denoiser
        from accelerate import cpu_offload_with_hook

        cpu_offload_with_hook(pipe.text_encoder, execution_device=cpu)
    else:
        pipe.unet.enable_group_offload(cpu, cpu, offload_type="block_level", num_blocks_per_group=1)
        config = distrifusion.ParallelConfig(shard_weights=True)
    with pytest.raises(ValueError, match="offload.*shard_weights=True") as refusal:
        distrifusion.parallelize(pipe, config)
    assert "\n" not in str(refusal.value)
    assert not hasattr(pipe.unet, "_distrifusion_state")  # refused before anything was changed


def test_modules_changed_after_sharding_refused_on_every_rank(pipeline_results):
    assert pipeline_results[0]["changed"] == pipeline_results[1]["changed"]
    assert "changed after parallelize(shard_weights=True)" in pipeline_results[0]["changed"]
    assert all(r["changed kinds"] == {"Parameter"} for r in pipeline_results)  # remove still gives it back whole
