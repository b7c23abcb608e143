"""The hot path: preallocated exchange buffers, attention over them in place, cross-attention keys/values
computed once per image, and the CUDA-graph step path (driven on CPU by a stand-in for the graph).

Ranks are simulated with threads (tests/test_parity.py shows they match real processes bit for bit).
Float64 throughout, so the tolerance of the parity tests applies: 1e-9 of the output's scale.
"""

import copy
from functools import partial

import pytest
import torch
from helpers import BLOCK, denoise, model_inputs, tiny_model

import distrifusion
from distrifusion.engine.comm import Runtime, SoloCommunicator
from distrifusion.engine.exchange import Exchange
from distrifusion.engine.graphs import CudaGraphs
from distrifusion.measure.simulate import LoopbackCommunicator, simulate_ranks
from distrifusion.parallel.parallelize import _everywhere

TOL = 1e-9
WIDTH = 3 * BLOCK


def _on_ranks(world: int, kind: str, config: distrifusion.ParallelConfig, body):
    """`body(model, state)` on `world` simulated ranks, each with its own copy of one tiny model."""
    base = tiny_model(kind)

    def rank(runtime):
        model = copy.deepcopy(base)
        distrifusion.parallelize(model, config, runtime=runtime)
        return body(model, model._distrifusion_state)

    return simulate_ranks(world, rank)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode,warmup", [("sync", 0), ("displaced", 6)])
def test_even_strips_read_keys_and_values_in_place(world, mode, warmup):
    """Equal strips and one image per rank (CFG split): attention reads the gathered buffer itself."""
    height = 8 * BLOCK
    reference = denoise(tiny_model("sdxl"), "sdxl", height, WIDTH)
    config = distrifusion.ParallelConfig(mode=mode, warmup_steps=warmup)

    def body(model, state):
        out = denoise(model, "sdxl", height, WIDTH)
        assert state.partition.local_batch == 1 and len(set(state.partition.rows)) == 1  # the in-place case
        return out

    for out in _on_ranks(world, "sdxl", config, body):
        assert _close(out, reference)


def test_exchange_buffers_are_fixed_after_the_first_step():
    """No buffer is allocated after step 0: later steps and images reuse the same memory."""
    config = distrifusion.ParallelConfig(warmup_steps=1, split_cfg=False)

    def body(model, state):
        denoise(model, "sd15", 5 * BLOCK, WIDTH, steps=4)
        first = [b.data_ptr() for b in state.exchange.buffers]
        distrifusion.reset(model)
        denoise(model, "sd15", 5 * BLOCK, WIDTH, steps=4)
        return first, [b.data_ptr() for b in state.exchange.buffers], state.exchange.fixed

    for first, second, fixed in _on_ranks(2, "sd15", config, body):
        assert fixed and first == second and len(first) > 1


def test_a_failed_first_step_leaves_no_partial_layout():
    """An error halfway through step 0 (on every rank) must not leave half a layout behind."""
    config = distrifusion.ParallelConfig(mode="sync", split_cfg=False)
    reference = denoise(tiny_model("sd15"), "sd15", 5 * BLOCK, WIDTH, steps=3)

    def body(model, state):
        def fail(module, args):
            raise RuntimeError("injected")

        hook = model.mid_block.register_forward_pre_hook(fail)
        latent, kwargs = model_inputs(model, "sd15", 5 * BLOCK, WIDTH)
        with pytest.raises(RuntimeError, match="injected"), torch.no_grad():
            model(torch.cat([latent, latent]), 900, **kwargs)
        hook.remove()
        distrifusion.reset(model)
        return denoise(model, "sd15", 5 * BLOCK, WIDTH, steps=3)

    for out in _on_ranks(2, "sd15", config, body):
        assert _close(out, reference)


def test_exchange_swaps_rows_in_place():
    """Bucketed and lone slots: this rank's row is always the fresh payload, the others' rows are
    the previous step's; payloads of the wrong shape are refused; a layer unseen in step 0 gets its own slot."""
    exchange = Exchange(LoopbackCommunicator(3, rank=1), bucket_bytes=64)
    small = [torch.full((2, 3), float(k)) for k in range(3)]  # 48 bytes each: one per 64-byte bucket
    exchange.gather_now("a", small[0])
    exchange.gather_now("b", small[0] + 10)
    exchange.gather_now("kv", torch.zeros(4, 5), alone=True)
    exchange.flush()
    for step in (1, 2):
        a = exchange.swap("a", small[step])
        assert torch.equal(a[1], small[step]) and torch.equal(a[0], small[step - 1]) and torch.equal(a[2], a[0])
        kv = exchange.swap("kv", torch.full((4, 5), float(step)))
        assert kv.is_contiguous() and torch.equal(kv[0], torch.full((4, 5), step - 1.0))
        b = exchange.swap("b", small[step] + 10)
        assert torch.equal(b[0], small[step - 1] + 10)
        exchange.flush()
    with pytest.raises(RuntimeError, match="shape"):
        exchange.swap("a", torch.zeros(3, 2))
    # A layer call unseen in the first step (a step cache skipped it there on every rank): a buffer of its own,
    # filled by a blocking exchange when it first runs (no previous context to read), displaced after that.
    late = exchange.swap("new layer", small[0])
    assert "new layer" in exchange.slots and torch.equal(late[1], small[0]) and torch.equal(late[0], small[0])
    exchange.flush()
    late = exchange.swap("new layer", small[1])
    assert torch.equal(late[1], small[1]) and torch.equal(late[0], small[0])


def test_cross_attention_keys_values_once_per_image():
    """Cached while the text embedding is the same unmodified tensor; recomputed when it changes
    (here in place), with the results of a run that recomputes them at every call."""
    config = distrifusion.ParallelConfig(warmup_steps=1, split_cfg=False)
    latent, kwargs = model_inputs(tiny_model("sd15"), "sd15", 5 * BLOCK, WIDTH)
    sample, text = torch.cat([latent, latent]), kwargs["encoder_hidden_states"]
    calls = ((900, 1.0), (880, 1.0), (860, 0.5))  # the third is a displaced step

    def cached(model, state):
        mine = text.clone()
        with torch.no_grad():
            model(sample, 900, encoder_hidden_states=mine)
            first = {name: entry[1] for name, entry in state.cross_kv.items()}
            model(sample, 880, encoder_hidden_states=mine)
            reused = all(state.cross_kv[name][1] is kv for name, kv in first.items())
            mine.mul_(0.5)  # in place: the version counter says the keys/values are stale
            out = model(sample, 860, encoder_hidden_states=mine).sample
            recomputed = all(state.cross_kv[name][1] is not kv for name, kv in first.items())
        return len(first), reused, recomputed, out

    def fresh_tensors(model, state):  # a new tensor at every call: nothing is reused
        with torch.no_grad():
            for t, scale in calls:
                out = model(sample, t, encoder_hidden_states=text * scale).sample
        return out

    expected = _on_ranks(2, "sd15", config, fresh_tensors)
    for (count, reused, recomputed, out), ref in zip(_on_ranks(2, "sd15", config, cached), expected):
        assert count == sum(getattr(m, "is_cross_attention", False) for m in tiny_model("sd15").modules()) > 0
        assert reused and recomputed
        assert torch.equal(out, ref)


def _solo() -> Runtime:
    solo = SoloCommunicator()
    return Runtime(0, 1, torch.device("cpu"), solo, {1: solo})


def _stand_in_capture(state):
    """Plays torch.cuda.graph on CPU. Capture records without running, so the exchange buffers are
    restored after the recording run; replay re-runs the function on the same static inputs into the
    same output. The function must leave the step counter alone (a real replay runs no Python)."""

    class Replay:
        def __init__(self, fn, static, out):
            self.fn, self.static, self.out = fn, static, out

        def replay(self):
            step = state.step
            state._calls.clear()  # the per-step layer-call counts, as at the recording run
            out, _ = self.fn(self.static)
            assert state.step == step, "the graphed function changed Python state"
            self.out.copy_(out)

    def capture(fn, static, pool):
        buffers = [b.clone() for b in state.exchange.buffers] if state.exchange else []
        out, meta = fn(static)
        for saved, buffer in zip(buffers, state.exchange.buffers if state.exchange else []):
            buffer.copy_(saved)
        return Replay(fn, static, out), out, meta, pool

    return capture


@pytest.mark.parametrize("kind", ["sdxl", "unet2d"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_graph_path_matches_eager(kind, world):
    """Steps replayed through `CudaGraphs` (one graph per size and phase, captured at the second use)
    give the eager results: two images, a change of size and back, sync and displaced phases."""
    heights = (5 * BLOCK, 8 * BLOCK, 5 * BLOCK)

    def run(model, state, graphed):
        if graphed:
            state.graphs = CudaGraphs(torch.device("cpu"), capture=_stand_in_capture(state))
        outs = []
        for height in heights:
            distrifusion.reset(model)
            outs.append(denoise(model, kind, height, WIDTH, steps=4))
        return outs, (len(state.graphs) if graphed else 0)

    config = distrifusion.ParallelConfig(warmup_steps=1, cuda_graphs=False)
    eager = _on_ranks(world, kind, config, lambda m, s: run(m, s, False))
    graphed = _on_ranks(world, kind, config, lambda m, s: run(m, s, True))
    for (expected, _), (outs, captured) in zip(eager, graphed):
        for out, ref in zip(outs, expected):
            assert _close(out, ref)
        # One process: one graph per size. Several: sync and displaced per size (4 steps, warm-up 1).
        assert captured == (2 if world == 1 else 4)


def test_graph_path_takes_number_timesteps():
    """A Python number timestep becomes a tensor input, so one graph serves every timestep."""

    def body(model, state):
        state.graphs = CudaGraphs(torch.device("cpu"), capture=_stand_in_capture(state))
        latent, kwargs = model_inputs(model, "sd15", 5 * BLOCK, WIDTH)
        with torch.no_grad():
            outs = [model(torch.cat([latent, latent]), t, **kwargs).sample for t in (900, 700, 500)]
        return outs, len(state.graphs)

    config = distrifusion.ParallelConfig(mode="sync", cuda_graphs=False)
    reference = tiny_model("sd15")
    latent, kwargs = model_inputs(reference, "sd15", 5 * BLOCK, WIDTH)
    with torch.no_grad():
        expected = [reference(torch.cat([latent, latent]), t, **kwargs).sample for t in (900, 700, 500)]
    for outs, captured in _on_ranks(2, "sd15", config, body):
        assert captured == 1
        for out, ref in zip(outs, expected):
            assert _close(out, ref)


def test_cuda_graphs_off_on_cpu_and_refused_when_forced():
    model = tiny_model("sd15")
    distrifusion.parallelize(model, distrifusion.ParallelConfig(), runtime=_solo())
    assert model._distrifusion_state.graphs is None  # auto: CUDA only
    distrifusion.remove(model)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        distrifusion.parallelize(model, distrifusion.ParallelConfig(cuda_graphs=True), runtime=_solo())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("world", [1, 4])
def test_real_cuda_graphs_match_eager(world):
    """On a GPU: steps captured by torch.cuda.graph equal eager steps. Several ranks are played by
    one process with loopback collectives (every rank's work, same kernels and buffers); those
    numbers are not a real split, but graph and eager must agree on them exactly all the same."""
    from distrifusion.measure.simulate import loopback_runtime

    results = {}
    for graphs in (False, True):
        model = tiny_model("sdxl")
        runtime = loopback_runtime(world, rank=world - 1, device="cuda")
        distrifusion.parallelize(
            model, distrifusion.ParallelConfig(warmup_steps=1, cuda_graphs=graphs), runtime=runtime
        )
        outs = []
        for height in (5 * BLOCK, 8 * BLOCK, 5 * BLOCK):
            distrifusion.reset(model)
            outs.append(denoise(model, "sdxl", height, WIDTH, steps=4))
        results[graphs] = outs, len(model._distrifusion_state.graphs or ())
    (eager, _), (graphed, captured) = results[False], results[True]
    assert captured == (2 if world == 1 else 4)
    for out, ref in zip(graphed, eager):
        assert _close(out, ref)


def test_a_failed_capture_falls_back_to_eager_on_every_rank(caplog):
    """A capture that fails on one rank makes every rank run that step shape eagerly (none may replay
    collectives the others do not), with a warning that names the switch; results stay exact."""
    config = distrifusion.ParallelConfig(warmup_steps=1, cuda_graphs=False)
    reference = denoise(tiny_model("sd15"), "sd15", 5 * BLOCK, WIDTH, steps=4)

    def body(model, state):
        capture = _stand_in_capture(state)

        def fails_on_rank_1(fn, static, pool):
            captured = capture(fn, static, pool)  # the stand-in runs the collectives a real capture records
            if state.runtime.rank == 1:
                raise torch.cuda.OutOfMemoryError("out of memory at capture")
            return captured

        state.graphs = CudaGraphs(
            torch.device("cpu"),
            capture=fails_on_rank_1,
            agree=partial(_everywhere, state.runtime),
            abort=state.abort_step,
        )
        out = denoise(model, "sd15", 5 * BLOCK, WIDTH, steps=4)
        return out, len(state.graphs)

    with caplog.at_level("WARNING", logger="distrifusion"):
        results = _on_ranks(2, "sd15", config, body)
    for out, captured in results:
        assert captured == 0 and _close(out, reference)
    assert "cuda_graphs=False" in caplog.text and "out of memory at capture" in caplog.text


def test_cuda_graphs_keys_copies_and_eager_fallbacks():
    """A graph per key and input signature (shapes, dtypes, non-tensor values), captured at the second
    use; the result is a copy of the graph's output; unhashable inputs always run eagerly."""
    captured = []

    def capture(fn, static, pool):
        out, meta = fn(static)
        captured.append(out)

        class Replay:
            def replay(self):
                out.copy_(fn(static)[0])

        return Replay(), out, meta, pool

    graphs = CudaGraphs(torch.device("cpu"), capture=capture)
    step = lambda inputs: (inputs["x"] * inputs["k"], "meta")  # noqa: E731
    graphs("p", step, {"x": torch.ones(2), "k": 3})
    graphs("p", step, {"x": torch.ones(2), "k": 3})
    assert len(graphs) == 0  # autograd on: always eager (a graph records no backward)
    torch.set_grad_enabled(False)
    results = [graphs("p", step, {"x": torch.full((2,), v), "k": 3}) for v in (1.0, 2.0, 4.0)]
    assert [r[0].tolist() for r in results] == [[3, 3], [6, 6], [12, 12]] and results[2][1] == "meta"
    assert len(graphs) == 1 and results[2][0].data_ptr() != captured[0].data_ptr()
    assert graphs("p", step, {"x": torch.ones(2), "k": 5})[0].tolist() == [5, 5]  # another value: another key
    assert graphs("p", step, {"x": torch.ones(3), "k": 3})[0].tolist() == [3, 3, 3]  # another shape
    for _ in range(3):
        graphs("p", step, {"x": torch.ones(2), "k": 3, "unhashable": {1}})
    assert len(graphs) == 1
    graphs.clear()
    assert len(graphs) == 0
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("graphed", [False, True])
def test_buffers_kept_for_recent_sizes_only(graphed):
    """Eager steps keep the current size's buffers; with graphs the KEPT_SIZES most recent sizes keep
    theirs and their graphs, and going back to an evicted size recaptures it."""
    from distrifusion.engine.state import KEPT_SIZES

    config = distrifusion.ParallelConfig(mode="sync", split_cfg=False, cuda_graphs=False)
    heights = [(4 + k) * BLOCK for k in range(KEPT_SIZES + 1)] + [4 * BLOCK]

    def body(model, state):
        if graphed:
            state.graphs = CudaGraphs(torch.device("cpu"), capture=_stand_in_capture(state))
        kept = []
        for height in heights:
            distrifusion.reset(model)
            denoise(model, "sd15", height, WIDTH, steps=2)
            kept.append((len(state._exchanges), len(state.graphs) if graphed else 0))
        return kept

    for kept in _on_ranks(2, "sd15", config, body):
        if graphed:
            assert kept[KEPT_SIZES - 1] == (KEPT_SIZES, KEPT_SIZES) and kept[-1] == (KEPT_SIZES, KEPT_SIZES)
        else:
            assert all(k == (1, 0) for k in kept)


def test_replay_watchdog_ends_a_hung_rank():
    """A replay that never finishes (a dead peer inside a captured collective) ends the process with a
    message naming the rank and the timeout, instead of waiting forever; finished replays do not."""
    import threading

    from distrifusion.engine.graphs import ReplayWatchdog

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    fired = threading.Event()
    messages = []
    events = iter([Event(True), Event(False)])

    def on_timeout(message):
        messages.append(message)
        fired.set()

    watchdog = ReplayWatchdog(0.2, rank=3, make_event=lambda: next(events), on_timeout=on_timeout, poll_s=0.01)
    watchdog.watch()  # finishes at once
    watchdog.watch()  # never finishes
    assert fired.wait(5)
    assert len(messages) == 1 and "rank 3" in messages[0] and "timeout_s=0.2" in messages[0]


class _Recording:
    """Wraps a communicator and records every collective's kind, shape and dtype."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log
        self.rank, self.size, self.capturable = inner.rank, inner.size, inner.capturable

    def all_gather(self, tensor, async_op=False):
        self.log.append(("all_gather", self.size, tuple(tensor.shape), tensor.dtype))
        return self.inner.all_gather(tensor, async_op)

    def all_gather_inplace(self, buffer, async_op=False):
        self.log.append(("all_gather_inplace", self.size, tuple(buffer.shape), buffer.dtype))
        return self.inner.all_gather_inplace(buffer, async_op)


def _recorded_steps(runtime):
    """Three calls (step 0 synchronous, then displaced) of a tiny SDXL-like model; the collectives."""
    log = []
    runtime.world = _Recording(runtime.world, log)
    runtime.patch_groups = {k: _Recording(c, log) for k, c in runtime.patch_groups.items()}
    model = tiny_model("sdxl")
    distrifusion.parallelize(model, distrifusion.ParallelConfig(warmup_steps=0), runtime=runtime)
    latent, kwargs = model_inputs(model, "sdxl", 5 * BLOCK, WIDTH)
    with torch.no_grad():
        for t in (900, 880, 860):
            model(torch.cat([latent, latent]), t, **kwargs)
    return log


def _recorded_rank_job():
    from distrifusion.engine.comm import init_runtime

    return _recorded_steps(init_runtime())


def test_loopback_rank_issues_the_collectives_of_a_real_rank():
    """A loopback rank (what `bench --simulate` times) issues exactly the collectives of the same rank
    among real processes: same order, kinds, group sizes, shapes and dtypes (uneven strips, CFG split)."""
    from helpers import run_ranks

    from distrifusion.measure.simulate import loopback_runtime

    real = run_ranks(4, _recorded_rank_job)
    for rank in (0, 3):  # the largest strip and the smallest
        simulated = _recorded_steps(loopback_runtime(4, rank=rank))
        assert len(simulated) > 10 and simulated == real[rank]


def test_graphs_are_recaptured_after_model_changes():
    """With graphs, a change that a graph would bake in (a LoRA loaded, adapters rescaled, FreeU's
    factors) drops the graphs before the next image: the images match one process with the same
    changes, and an image after no change captures nothing new."""
    from peft import LoraConfig

    def add_lora(model):
        config = LoraConfig(r=2, lora_alpha=2, target_modules=["conv1", "conv2", "to_k"])
        model.add_adapter(config)
        gen = torch.Generator().manual_seed(5)  # ranks are threads here: no global seed
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3

    changes = [
        lambda model: None,
        lambda model: None,  # the synchronous step's graph is captured at its second use...
        lambda model: None,  # ...and then nothing changes: no new graph
        add_lora,
        lambda model: model.set_adapters(["default"], weights=[0.5]),
        lambda model: model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
        lambda model: model.enable_freeu(s1=0.8, s2=0.3, b1=1.1, b2=1.3),
    ]
    height = 5 * BLOCK

    def images(model, state=None):
        outs, new_captures = [], []
        if state is not None:
            capture = _stand_in_capture(state)
            counted = []
            state.graphs = CudaGraphs(torch.device("cpu"), capture=lambda *a: counted.append(1) or capture(*a))
        for change in changes:
            change(model)
            before = len(counted) if state is not None else 0
            if state is not None:
                distrifusion.reset(model)
            outs.append(denoise(model, "sd15", height, WIDTH, steps=3))
            new_captures.append(len(counted) - before if state is not None else 0)
        return outs, new_captures

    expected, _ = images(tiny_model("sd15"))
    config = distrifusion.ParallelConfig(warmup_steps=1, cuda_graphs=False)
    for outs, new_captures in _on_ranks(2, "sd15", config, images):
        for i, (out, ref) in enumerate(zip(outs, expected)):
            assert _close(out, ref), f"image {i}"
        assert new_captures[2] == 0 and all(n > 0 for n in new_captures[3:]), new_captures


def _inference_mode_job(runtime, base, compress, first_inference: bool):
    model = copy.deepcopy(base)
    config = distrifusion.ParallelConfig(mode="displaced", warmup_steps=1, split_cfg=False, compress=compress)
    distrifusion.parallelize(model, config, runtime=runtime)
    images = []
    for inference in (first_inference, not first_inference):
        with torch.inference_mode(inference):
            images.append(denoise(model, "sd15", 8 * BLOCK, 4 * BLOCK, steps=3))
        distrifusion.reset(model)
    return images


@pytest.mark.parametrize("compress", [None, "residual-int8"])
@pytest.mark.parametrize("first_inference", [True, False])
def test_images_under_and_outside_inference_mode_share_the_buffers(compress, first_inference):
    """Buffers kept across images (exchange, codes, fused K/V weights) are made as normal tensors even
    when the first image ran under torch.inference_mode: a later image outside it writes into them."""
    from functools import partial

    from distrifusion.measure.simulate import simulate_ranks

    job = partial(_inference_mode_job, base=tiny_model("sd15"), compress=compress, first_inference=first_inference)
    for first, second in simulate_ranks(2, job):
        assert torch.equal(first, second)
