"""Config validation and input errors: raised before any collective, so checked in one process
with a runtime that claims several ranks (the check is the same on every rank)."""

import copy
from functools import partial

import pytest
import torch
from helpers import BLOCK, tiny_model

import distrifusion
from distrifusion.engine.comm import Runtime, SoloCommunicator
from distrifusion.engine.state import split_rows


def fake_runtime(world_size: int, rank: int = 0) -> Runtime:
    solo = SoloCommunicator()
    return Runtime(rank, world_size, torch.device("cpu"), solo, {1: solo, 2: solo})


@pytest.mark.parametrize(
    "field,value",
    [
        ("mode", "fast"),
        ("groupnorm", "batch"),
        ("warmup_steps", -1),
        ("warmup_steps", 1.5),
        ("warmup_steps", True),
        ("split_cfg", "yes"),
        ("split_cfg", 1),
        ("cuda_graphs", "yes"),
        ("cuda_graphs", 1),
        ("comm_bucket_mb", 0),
        ("timeout_s", -1),
    ],
)
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        distrifusion.ParallelConfig(**{field: value})


def test_config_steps():
    cfg = distrifusion.ParallelConfig(warmup_steps=2)
    assert [cfg.is_sync_step(s) for s in range(5)] == [True, True, True, False, False]
    assert all(distrifusion.ParallelConfig(mode="sync").is_sync_step(s) for s in range(5))
    assert not distrifusion.ParallelConfig(mode="naive").is_sync_step(0)


@pytest.mark.parametrize("height,parts", [(20, 2), (20, 3), (40, 4), (12, 3), (36, 8)])
def test_split_rows_whole_blocks_and_balanced(height, parts):
    rows = split_rows(height, BLOCK, parts)
    assert sum(rows) == height and all(r % BLOCK == 0 and r > 0 for r in rows)
    assert max(rows) - min(rows) <= BLOCK and list(rows) == sorted(rows, reverse=True)


def _call(model, batch, height, width=3 * BLOCK):
    sample = torch.randn(batch, 4, height, width, dtype=torch.float64)
    text = torch.randn(batch, 7, 16, dtype=torch.float64)
    return model(sample, 10, encoder_hidden_states=text)


def test_height_too_small_names_the_minimum():
    model = distrifusion.parallelize(
        tiny_model("sd15"), distrifusion.ParallelConfig(split_cfg=False), runtime=fake_runtime(4)
    )
    with pytest.raises(ValueError, match=f"minimum is {4 * BLOCK} rows"):
        _call(model, 2, 3 * BLOCK)


def test_height_not_a_whole_number_of_blocks():
    model = distrifusion.parallelize(tiny_model("sd15"), runtime=fake_runtime(2))
    with pytest.raises(ValueError, match=f"multiple of the model's block of {BLOCK}"):
        _call(model, 2, 5 * BLOCK + 2)


def test_forced_cfg_split_with_odd_batch():
    model = distrifusion.parallelize(
        tiny_model("sd15"), distrifusion.ParallelConfig(split_cfg="force"), runtime=fake_runtime(4)
    )
    with pytest.raises(ValueError, match="even batch"):
        _call(model, 3, 8 * BLOCK)


def test_forced_cfg_split_with_odd_world():
    model = distrifusion.parallelize(
        tiny_model("sd15"), distrifusion.ParallelConfig(split_cfg="force"), runtime=fake_runtime(3)
    )
    with pytest.raises(ValueError, match="even world size"):
        _call(model, 2, 8 * BLOCK)


def test_unsupported_models_raise_type_error():
    with pytest.raises(TypeError, match="supports UNet2DConditionModel"):
        distrifusion.parallelize(torch.nn.Linear(2, 2), runtime=fake_runtime(2))

    class TransformerPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="supports"):
        distrifusion.parallelize(TransformerPipeline(), runtime=fake_runtime(2))


def test_unsupported_layer_raises_type_error():
    model = tiny_model("sd15")
    model.conv_in.padding_mode = "reflect"
    with pytest.raises(TypeError, match="conv_in"):
        distrifusion.parallelize(model, runtime=fake_runtime(2))


ROW_CROSSING = {
    "transposed conv": lambda: torch.nn.ConvTranspose2d(8, 8, 3, padding=1),
    "overlapping pool": lambda: torch.nn.AvgPool2d(3, stride=1, padding=1),
    "row padding": lambda: torch.nn.ReflectionPad2d(1),
    "instance norm": lambda: torch.nn.InstanceNorm2d(8),
    "bilinear upsampling": lambda: torch.nn.Upsample(scale_factor=2, mode="bilinear"),
}
ROW_LOCAL = {
    "2x2 transposed conv": lambda: torch.nn.ConvTranspose2d(8, 8, 2, stride=2),
    "2x2 pool": lambda: torch.nn.AvgPool2d(2),
    "column padding": lambda: torch.nn.ReflectionPad2d((1, 1, 0, 0)),
    "nearest upsampling": lambda: torch.nn.Upsample(scale_factor=2),
}


@pytest.mark.parametrize("layer", list(ROW_CROSSING))
def test_a_layer_that_reads_across_rows_is_refused_by_name(layer):
    # Whatever custom or added layer would see a strip's edge as the image's edge: refused, not run.
    model = tiny_model("sd15")
    model.mid_block.resnets[0].extra = ROW_CROSSING[layer]()
    with pytest.raises(TypeError, match=r"mid_block\.resnets\.0\.extra.*cannot be split"):
        distrifusion.parallelize(model, runtime=fake_runtime(2))


@pytest.mark.parametrize("layer", list(ROW_LOCAL))
def test_a_layer_local_to_rows_is_accepted(layer):
    model = tiny_model("sd15")
    model.mid_block.resnets[0].extra = ROW_LOCAL[layer]()
    distrifusion.parallelize(model, runtime=fake_runtime(2))


def _row_crossing_added_job(runtime, base):
    from helpers import denoise

    model = copy.deepcopy(base)
    distrifusion.parallelize(model, distrifusion.ParallelConfig(split_cfg=False), runtime=runtime)
    denoise(model, "sd15", 4 * BLOCK, 2 * BLOCK, steps=1)
    model.up_blocks[0].extra = torch.nn.InstanceNorm2d(8)  # after parallelize: checked at the next call
    try:
        denoise(model, "sd15", 4 * BLOCK, 2 * BLOCK, steps=1)
    except TypeError as error:
        return str(error)
    return "ran"


def test_a_row_crossing_layer_added_after_parallelize_is_refused_on_every_rank():
    from distrifusion.measure.simulate import simulate_ranks

    results = simulate_ranks(2, partial(_row_crossing_added_job, base=tiny_model("sd15")))
    assert all("up_blocks.0.extra" in r and "InstanceNorm2d" in r for r in results), results


def test_a_transformer_conv_with_overlapping_windows_is_refused():
    from transformer_helpers import tiny_transformer

    model = tiny_transformer("pixart")
    distrifusion.remove(distrifusion.parallelize(model, runtime=fake_runtime(2)))  # its patch embedding is fine
    model.pos_embed.smooth = torch.nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(TypeError, match="pos_embed.smooth"):
        distrifusion.parallelize(model, runtime=fake_runtime(2))


def test_config_must_be_a_parallel_config():
    with pytest.raises(TypeError, match="ParallelConfig"):
        distrifusion.parallelize(tiny_model("sd15"), {"mode": "sync"}, runtime=fake_runtime(2))


def test_reset_needs_a_parallelised_model():
    with pytest.raises(ValueError, match="parallelize"):
        distrifusion.reset(tiny_model("sd15"))


def test_parallelize_twice_raises_and_remove_restores():
    model = tiny_model("sd15")
    sample = torch.randn(2, 4, 4 * BLOCK, 3 * BLOCK, dtype=torch.float64)
    text = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(sample, 10, encoder_hidden_states=text).sample
        distrifusion.parallelize(model)
        with pytest.raises(ValueError, match="already parallelised"):
            distrifusion.parallelize(model)
        alone = model(sample, 10, encoder_hidden_states=text).sample  # one process: unchanged results
        distrifusion.remove(model)
        after = model(sample, 10, encoder_hidden_states=text).sample
    assert torch.equal(before, after) and torch.equal(before, alone)
    assert all("forward" not in m.__dict__ for m in model.modules())  # every layer gone, FreeU's too


def _mismatch_job(runtime, what: str, base):
    from helpers import denoise

    model = copy.deepcopy(base)  # built once: ranks built at once would share (and race on) the global RNG
    odd = runtime.rank == 1
    compress = "int8" if (what == "config" and odd) else None
    config = distrifusion.ParallelConfig(compress=compress, timeout_s=30.0 + runtime.rank, split_cfg=False)
    distrifusion.parallelize(model, config, runtime=runtime)
    try:
        if what == "nan":  # the same latent on every rank, with a NaN in it
            sample = torch.zeros(2, 4, 4 * BLOCK, 2 * BLOCK, dtype=torch.float64)
            sample[0, 0, 0, 0] = float("nan")
            with torch.no_grad():
                model(sample, 10, encoder_hidden_states=torch.zeros(2, 7, 16, dtype=torch.float64))
        else:
            denoise(model, "sd15", 4 * BLOCK, 2 * BLOCK, steps=2, seed=2 if (what == "inputs" and odd) else 1)
    except ValueError as error:
        return str(error)
    return "ran"


@pytest.mark.parametrize(
    "what, message",
    [
        ("config", "different ParallelConfig settings"),
        ("inputs", "the model inputs differ between ranks"),
        ("nothing", "ran"),  # a different timeout alone is no mismatch
        ("nan", "ran"),
    ],
)
def test_ranks_that_disagree_are_refused_before_any_layer_exchanges(what, message):
    """Every rank checks, at an image's first step, that the others run the same config on the same
    inputs (a NaN in the same place on every rank is the same input)."""
    from distrifusion.measure.simulate import simulate_ranks

    results = simulate_ranks(2, partial(_mismatch_job, what=what, base=tiny_model("sd15")))
    assert all(message in result for result in results), results
