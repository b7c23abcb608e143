"""The link-aware plan (distrifusion.measure.planner): its link fit, its step model, the rows it measures, and
ParallelConfig(mode="auto") running exactly the choice it reports, alike on every rank."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import BLOCK, denoise, tiny_model
from test_cli import run_cli

import distrifusion
from distrifusion.engine.config import COMPRESS_MODES
from distrifusion.measure.planner import Choice, Link, _link_figures, choices, choose, plan, simulate_step
from distrifusion.measure.simulate import simulate_ranks
from distrifusion.measure.workload import model_inputs


def test_link_figures_from_the_probe():
    latency, bandwidth = 2e-4, 3e9
    points = [(x, latency + x / bandwidth) for x in (4e3, 6.4e4, 1e6, 8e6)]
    a, b = _link_figures(points)
    assert a == pytest.approx(latency, rel=1e-6) and 1 / b == pytest.approx(bandwidth, rel=1e-6)
    # A token bucket lets the small probes through at once: the bandwidth still comes from the large ones.
    bucket = [(4e3, 1e-4), (6.4e4, 1e-4), (1e6, 1e6 / 1e7), (8e6, 8e6 / 1e7)]
    a, b = _link_figures(bucket)
    assert 1 / b == pytest.approx(1e7) and a == 0.0
    # Noise that would give a negative latency or a zero slope is clipped, never a negative or infinite figure.
    a, b = _link_figures([(1e3, 5e-3), (1e6, 1e-3)])
    assert a >= 0 and b > 0


LINK = Link(latency_s=0.0, bytes_per_s=1e9)  # 1 ms per MB


def test_blocking_exchange_adds_its_link_time():
    events = [(0.02, "block", 5e6, -1), (0.05, "block", 1e6, -1)]
    assert simulate_step(events, 0.1, LINK) == pytest.approx(0.1 + 0.005 + 0.001)
    # Ranks that arrive 2 ms apart on average: each blocking collective waits that long first.
    skewed = Link(latency_s=0.0, bytes_per_s=1e9, skew_s=0.002)
    assert simulate_step(events, 0.1, skewed) == pytest.approx(0.1 + 0.005 + 0.001 + 2 * 0.002)


def test_a_bucket_sent_at_the_end_and_read_at_the_start_hides_behind_nothing():
    events = [(0.0, "wait", 0, 0), (0.1, "send", 30e6, 0)]  # read first thing, written last thing
    assert simulate_step(events, 0.1, LINK) == pytest.approx(0.1 + 0.030, rel=1e-6)


def test_a_bucket_sent_early_hides_behind_the_rest_of_the_step():
    events = [(0.08, "wait", 0, 0), (0.02, "send", 50e6, 0)]  # written after 20 ms, read after 80 ms
    # The link has the 80 ms left of its step and 80 ms of the next: 50 ms of transfer hide entirely ...
    assert simulate_step(sorted(events), 0.1, LINK) == pytest.approx(0.1)
    # ... 250 ms do not: the step stretches until the previous step's bucket arrives.
    slow = Link(latency_s=0.0, bytes_per_s=2e8)
    assert simulate_step(sorted(events), 0.1, slow) == pytest.approx(0.25, rel=1e-6)


def test_blocking_collectives_queue_behind_buckets_in_flight():
    # The output gather at the end waits for the bucket sent 10 ms before it (one link, one at a time).
    events = [(0.05, "wait", 0, 0), (0.09, "send", 20e6, 0), (0.1, "block", 1e6, -1)]
    assert simulate_step(events, 0.1, LINK) == pytest.approx(0.1 + 0.010 + 0.001, rel=1e-6)  # 10 ms still to go


def test_choices_cover_modes_compressions_and_fewer_ranks():
    rows = choices(8)
    names = {(c.ranks, c.name) for c in rows}
    assert (8, "sync") in names and (8, "displaced") in names
    assert all((8, f"displaced + {c}") in names for c in COMPRESS_MODES)
    assert {(4, "displaced"), (2, "displaced"), (1, "sync")} <= names


def test_auto_prefers_the_more_faithful_choice_unless_clearly_slower():
    def rows(**predicted):
        return [dict(ranks=2, choice=name.replace("_", " + ").replace("ri", "residual-i"), predicted_s=t)
                for name, t in predicted.items()]  # fmt: skip

    assert choose(rows(sync=1.05, displaced=1.0, displaced_int8=0.98), 2)["choice"] == "sync"  # exact, 7% slower
    assert choose(rows(sync=2.0, displaced=1.0, displaced_int8=0.95), 2)["choice"] == "displaced"
    assert choose(rows(sync=2.0, displaced=1.5, displaced_rint2=1.0), 2)["choice"] == "displaced + residual-int2"
    # Plain int2 (8 dB worse) is never run by auto, however fast; nor a choice on fewer ranks.
    best = choose(
        rows(sync=2.0, displaced=1.5, displaced_int2=0.5) + [dict(ranks=1, choice="sync", predicted_s=0.1)], 2
    )
    assert best["choice"] == "displaced"


def _plan_job(runtime):
    model = tiny_model("sd15", dtype=torch.float32)
    # 64 x 32 latents, no CFG batch (2 ranks share the rows): payloads large enough to be compressed.
    inputs = model_inputs(model, 8 * 16 * BLOCK, 8 * 8 * BLOCK, batch=1)
    candidates = [Choice(2, "sync"), Choice(2, "displaced"), Choice(2, "displaced", "int8"), Choice(1, "sync")]
    return plan(model, inputs, runtime, candidates, repeats=1)


def test_plan_counts_each_choices_bytes_and_ranks_agree():
    found = simulate_ranks(2, _plan_job)
    assert [r["choice"] for r in found[0]["rows"]] == [r["choice"] for r in found[1]["rows"]]
    assert found[0]["best"]["choice"] == found[1]["best"]["choice"] and found[0]["best"]["ranks"] == 2
    rows = {(r["ranks"], r["choice"]): r for r in found[0]["rows"]}
    sync, displaced, int8 = rows[2, "sync"], rows[2, "displaced"], rows[2, "displaced + int8"]
    assert sync["step_async_bytes"] == 0 and sync["step_blocking_bytes"] > 0  # sync waits for all it exchanges
    assert displaced["step_async_bytes"] > displaced["step_blocking_bytes"]  # the stale exchange runs behind
    # int8 in place of float32: a quarter of the bytes of the large payloads (a float32 scale per 256 values
    # more); the small ones of this tiny model (under 4096 values: statistics, thin strips) stay exact.
    assert displaced["step_async_bytes"] / 4 < int8["step_async_bytes"] < displaced["step_async_bytes"] / 2
    assert rows[1, "sync"]["step_bytes"] == 0
    assert all(r["predicted_s"] >= r["share_step_s"] for r in found[0]["rows"])


def test_ranks_plan_from_the_same_predictions(monkeypatch):
    # Each rank replays its own timeline, so its own predictions differ; here they rank the choices in
    # opposite orders. Had a rank sorted or chosen from its own, the ranks would then measure or run
    # different choices (found over two hosts: one rank's int8 gather met the other's int4).
    import threading

    def rank_dependent(row, link):
        order = ["sync", "displaced", "displaced + int8"].index(row["choice"]) if row["ranks"] == 2 else 0
        return 1.0 + 0.5 * (order if threading.current_thread().name == "rank0" else 2 - order)

    monkeypatch.setattr("distrifusion.measure.planner.predict", rank_dependent)
    found = simulate_ranks(2, _plan_job)
    assert [r["choice"] for r in found[0]["rows"]] == [r["choice"] for r in found[1]["rows"]]
    assert [r["predicted_s"] for r in found[0]["rows"]] == [r["predicted_s"] for r in found[1]["rows"]]
    assert found[0]["best"]["choice"] == found[1]["best"]["choice"] == "displaced"
    # The slowest rank's figure (alone, rank 0 would choose sync, rank 1 int8).
    assert {r["choice"]: r["predicted_s"] for r in found[0]["rows"] if r["ranks"] == 2} == pytest.approx(
        {"sync": 2.0, "displaced": 1.5, "displaced + int8": 2.0}
    )


def _auto_job(runtime):
    model = tiny_model("sd15")
    reference = copy.deepcopy(model)
    size = (8 * 4 * BLOCK, 8 * 3 * BLOCK)
    config = distrifusion.ParallelConfig(mode="auto", auto_size=size, warmup_steps=1, split_cfg=False)
    distrifusion.parallelize(model, config, runtime=runtime)
    state = model._distrifusion_state
    chosen = state.config
    image = denoise(model, "sd15", 4 * BLOCK, 3 * BLOCK, steps=4)
    # The same choice, given explicitly: the very same image.
    explicit = distrifusion.ParallelConfig(mode=chosen.mode, compress=chosen.compress, warmup_steps=1, split_cfg=False)
    distrifusion.parallelize(reference, explicit, runtime=runtime)
    again = denoise(reference, "sd15", 4 * BLOCK, 3 * BLOCK, steps=4)
    return dict(
        mode=chosen.mode,
        compress=chosen.compress,
        best=state.auto_plan["best"]["choice"],
        same=bool(torch.equal(image, again)),
    )


def test_auto_runs_the_choice_it_reports_alike_on_every_rank():
    results = simulate_ranks(2, _auto_job)
    assert results[0] == results[1]
    result = results[0]
    assert result["mode"] in ("sync", "displaced") and result["same"]
    assert result["best"] == result["mode"] + (f" + {result['compress']}" if result["compress"] else "")


def test_auto_size_is_validated():
    for bad in ((512,), 512, (True, True), {64: 0, 32: 1}, (512, 0)):
        with pytest.raises(ValueError, match="auto_size"):
            distrifusion.ParallelConfig(mode="auto", auto_size=bad)
    with pytest.raises(ValueError, match="mode"):
        distrifusion.ParallelConfig(mode="fastest")


def test_plan_command_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", "--nproc", "2", "--model", "embedded", "--height", "32", "--width", "32", "--repeats", "1"]
    proc, _ = run_cli(*args, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "link:" in proc.stdout and "auto: " in proc.stdout
    record = json.loads(out.read_text())
    assert len(record["rows"]) == len(choices(2)) and record["best"]["ranks"] == 2
    assert all(r["predicted_s"] > 0 for r in record["rows"])


def test_generate_mode_auto_plans_and_reports_its_choice(tmp_path):
    out = tmp_path / "auto.png"
    args = ["--nproc", "2", "--height", "32", "--width", "32", "--steps", "3", "--mode", "auto", "--out", str(out)]
    proc, _ = run_cli("generate", *args)
    assert proc.returncode == 0, proc.stderr
    chosen = re.search(r"mode auto: (\S+(?: \+ \S+)?) \(predicted", proc.stderr)
    assert chosen, proc.stderr
    assert f"3 steps, {chosen[1]} (auto), 2 ranks" in proc.stdout and out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "embedded", "--arch", "sd15"], "give one"),
        (["--arch", "sd_vae"], "denoisers"),
        (["--arch", "sd15", "--height", "100"], "100"),
        (["--repeats", "0"], "--repeats"),
        (["--arch", "bogus"], "use one of sd15"),
        (["--arch", "sd15", "--height", "0"], "--height"),
        (["--arch", "sd15", "--width", "0"], "--width"),
    ],
)
def test_plan_command_refuses_bad_input(args, message):
    proc, _ = run_cli("plan", "--nproc", "2", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _recording_plan(monkeypatch, shapes: list, real: bool):
    """Make "auto" record the latent it plans with; with `real` it then plans, else it picks sync at once."""
    import distrifusion.measure.planner as planner

    original = planner.plan

    def recording(model, inputs, runtime, candidates=None, **kwargs):
        sample = inputs.get("hidden_states", inputs.get("sample"))
        shapes.append(tuple(sample.shape))
        if real:
            return original(model, inputs, runtime, candidates, **kwargs)
        best = dict(ranks=runtime.world_size, choice="sync", mode="sync", compress=None, predicted_s=1.0)
        return dict(link=dict(latency_s=0.0, bytes_per_s=1.0), rows=[best], best=best)

    monkeypatch.setattr(planner, "plan", recording)


def test_auto_plans_a_bare_flux_transformer_at_the_family_size(monkeypatch):
    # Flux's config has no sample_size (reading it failed with "'FrozenDict' object has no attribute"): a bare
    # Flux transformer plans at FluxPipeline's default, 1024 x 1024 px = 64 x 64 tokens.
    from transformer_helpers import tiny_transformer

    shapes = []
    _recording_plan(monkeypatch, shapes, real=False)

    models = [tiny_transformer("flux") for _ in range(2)]  # built before the rank threads

    def rank(runtime):
        model = models[runtime.rank]
        distrifusion.parallelize(model, distrifusion.ParallelConfig(mode="auto"), runtime=runtime)
        return model._distrifusion_state.config.mode

    assert simulate_ranks(2, rank) == ["sync", "sync"]
    assert shapes == [(1, 64 * 64, 16)] * 2


def test_auto_plans_a_flux_pipeline_at_its_default_size(monkeypatch):
    # The pipeline's own default: default_sample_size latent cells of its VAE's factor (here 12 x 2 px,
    # made small for the test: 24 px, 6 x 6 tokens of 4 px), planned for real, then an image.
    from transformer_helpers import flux_prompt, tiny_flux_pipeline

    shapes = []
    _recording_plan(monkeypatch, shapes, real=True)

    pipes = [tiny_flux_pipeline() for _ in range(2)]  # built before the rank threads (global RNG, module hooks)

    def rank(runtime):
        pipe = pipes[runtime.rank]
        pipe.default_sample_size = 12
        distrifusion.parallelize(pipe, distrifusion.ParallelConfig(mode="auto", warmup_steps=1), runtime=runtime)
        image = pipe(
            num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0), **flux_prompt()
        )
        state = pipe.transformer._distrifusion_state
        return state.config.mode, state.auto_plan["best"]["choice"], image.images

    results = simulate_ranks(2, rank)
    assert shapes == [(1, 36, 16)] * 2
    assert results[0][:2] == results[1][:2] and torch.equal(results[0][2], results[1][2])
    assert results[0][2].shape == (1, 3, 24, 24) and torch.isfinite(results[0][2]).all()


def test_auto_without_a_size_to_plan_at_asks_for_auto_size(monkeypatch):
    # A family whose config has no sample_size and whose adapter names no default size (Flux's, taken away).
    from transformer_helpers import tiny_transformer

    from distrifusion.measure.planner import default_size
    from distrifusion.models.flux import FluxAdapter

    monkeypatch.setattr(FluxAdapter, "default_size", None)
    model = tiny_transformer("flux")
    with pytest.raises(ValueError, match=r"FluxTransformer2DModel has no sample_size; give ParallelConfig\(auto_size="):
        default_size(model, model, None)
