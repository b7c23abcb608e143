"""Pipelines that call the denoiser more than once per step with other conditioning (Flux's true CFG
with a negative prompt, SD3's skip-layer guidance, a UNet guided by separate calls): in displaced steps
each branch must borrow its stale context from its *own* previous call, never from the other branch's
call of the same step. Property: the interleaved calls give exactly what one model per branch gives
when it is fed only that branch's calls (same config, same ranks)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from helpers import BLOCK as UNET_BLOCK
from helpers import TEXT_DIM, TEXT_LEN, tiny_model
from transformer_helpers import call_inputs, image_shape, tiny_transformer

import distrifusion
from distrifusion.measure.simulate import simulate_ranks

STEPS = 6
CONFIG = dict(mode="displaced", warmup_steps=1, split_cfg=False)


def _unet_calls(step: int) -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(1, 4, 4 * UNET_BLOCK, 3 * UNET_BLOCK, generator=g, dtype=torch.float64)
    t = torch.tensor(900 - 100 * step)
    return [(name, dict(sample=x, timestep=t, encoder_hidden_states=TEXT[name])) for name in ("positive", "negative")]


_g = torch.Generator().manual_seed(7)
TEXT = {
    name: torch.randn(1, TEXT_LEN, TEXT_DIM, generator=_g, dtype=torch.float64) for name in ("positive", "negative")
}  # noqa: E501


def _flux_calls(step: int) -> list[tuple[str, dict]]:
    rows, cols = 6, 4
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(1, *image_shape("flux", rows, cols), generator=g, dtype=torch.float64)
    t = torch.full((1,), 1.0 - step / STEPS, dtype=torch.float64)
    calls = []
    for name, seed in (("positive", 1), ("negative", 2)):
        # The pipeline divides the timestep anew for each call: equal values, different tensors.
        calls.append((name, dict(hidden_states=x, timestep=t / 1.0, **call_inputs("flux", 1, rows, cols, seed))))
    return calls


SD3_COND = call_inputs("sd3", 2, 3, 2)


def _sd3_calls(step: int) -> list[tuple[str, dict]]:
    g = torch.Generator().manual_seed(300 + step)
    x = torch.randn(2, *image_shape("sd3", 3, 2), generator=g, dtype=torch.float64)
    t = torch.full((2,), 1000.0 - 150 * step, dtype=torch.float64)
    calls = [("guided", dict(hidden_states=x, timestep=t, **SD3_COND))]
    if 1 <= step <= 3:  # skip-layer guidance on some steps only: the positive half, without layer 1
        positive = {k: v[1:] for k, v in SD3_COND.items()}
        calls.append(("skip", dict(hidden_states=x[1:], timestep=t[1:], skip_layers=[1], **positive)))
    return calls


def _interleaved_equals_one_model_per_branch(runtime, base, calls_of_step) -> dict:
    model = copy.deepcopy(base)
    distrifusion.parallelize(model, distrifusion.ParallelConfig(**CONFIG), runtime=runtime)
    record: list[tuple[str, dict, torch.Tensor]] = []
    with torch.no_grad():
        for step in range(STEPS):
            for name, inputs in calls_of_step(step):
                record.append((name, inputs, model(**inputs, return_dict=False)[0]))
    mixed_branches = len(model._distrifusion_state._branches)
    same = {}
    for branch in dict.fromkeys(name for name, _, _ in record):
        alone = copy.deepcopy(base)
        distrifusion.parallelize(alone, distrifusion.ParallelConfig(**CONFIG), runtime=runtime)
        with torch.no_grad():
            outs = [(alone(**inputs, return_dict=False)[0], out) for name, inputs, out in record if name == branch]
        same[branch] = all(torch.equal(a, b) for a, b in outs)
    return dict(same=same, branches=mixed_branches)


CASES = {
    "unet separate guidance calls": (lambda: tiny_model("sd15"), _unet_calls),
    "flux true cfg": (lambda: tiny_transformer("flux"), _flux_calls),
    "sd3 skip-layer guidance": (lambda: tiny_transformer("sd3"), _sd3_calls),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_branch_keeps_its_own_stale_context(case):
    make, calls = CASES[case]
    base = make()  # built before the rank threads: building modules races with another thread's parallelize
    results = simulate_ranks(2, lambda runtime: _interleaved_equals_one_model_per_branch(runtime, base, calls))
    for result in results:
        assert all(result["same"].values()), result
        assert result["branches"] == 2


def _same_conditioning_job(runtime, base) -> dict:
    """One branch whatever the tensors' identity: embeddings rebuilt every call (equal values) and a
    timestep repeated by a second-order scheduler (Heun) stay the one branch, counted as steps."""
    model = copy.deepcopy(base)
    reference = copy.deepcopy(model)
    for m in (model, reference):
        distrifusion.parallelize(m, distrifusion.ParallelConfig(**CONFIG), runtime=runtime)
    equal = True
    with torch.no_grad():
        for step, t in enumerate([900, 800, 800, 700, 700]):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(1, 4, 4 * UNET_BLOCK, 3 * UNET_BLOCK, generator=g, dtype=torch.float64)
            rebuilt = TEXT["positive"].clone()  # a new tensor every call
            a = model(x, torch.tensor(t), encoder_hidden_states=rebuilt).sample
            b = reference(x, torch.tensor(t), encoder_hidden_states=TEXT["positive"]).sample
            equal &= torch.equal(a, b)
    state = model._distrifusion_state
    return dict(equal=equal, branches=len(state._branches), step=state.step)


def test_rebuilt_embeddings_and_repeated_timesteps_stay_one_branch():
    base = tiny_model("sd15")  # built before the rank threads (see above)
    for result in simulate_ranks(2, partial(_same_conditioning_job, base=base)):
        assert result == dict(equal=True, branches=1, step=5)


def _many_prompts_job(runtime, base) -> dict:
    """A prompt edited between steps (a callback changing prompt_embeds) continues its branch; more
    conditionings within one step than MAX_BRANCHES share the branches (a taken-over one starts again)."""
    from distrifusion.engine.state import MAX_BRANCHES

    model = copy.deepcopy(base)
    distrifusion.parallelize(model, distrifusion.ParallelConfig(**CONFIG), runtime=runtime)
    state = model._distrifusion_state

    def x_and_text(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, 4 * UNET_BLOCK, 3 * UNET_BLOCK, generator=g, dtype=torch.float64)
        return x, torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g, dtype=torch.float64)

    with torch.no_grad():
        for step in range(4):
            x, text = x_and_text(step)
            model(x, torch.tensor(900 - step), encoder_hidden_states=text)
        edited = (len(state._branches), state.step)
        distrifusion.reset(model)
        for step in range(3):
            for call in range(MAX_BRANCHES + 2):
                x, text = x_and_text(10 * call + 1)
                model(x, torch.tensor(900 - step), encoder_hidden_states=text)
    crowded = len(state._branches)
    distrifusion.reset(model)
    return dict(edited=edited, crowded=crowded, after_reset=(state.branch, state.step), limit=MAX_BRANCHES)


def test_edited_prompts_continue_and_branches_are_bounded():
    for result in simulate_ranks(2, partial(_many_prompts_job, base=tiny_model("sd15"))):
        assert result["edited"] == (1, 4)  # one branch, four steps
        assert result["crowded"] == result["limit"] and result["after_reset"] == (0, 0)
