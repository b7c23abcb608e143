"""The CUDA paths, as far as a CPU can see them (issue 20): every defect found by reading the code against
torch's and NCCL's rules has a test here that failed before its fix.

- GPU test helpers make their inputs where `parallelize` put the model (cuda:N on a GPU): run here on the
  meta device, which refuses CPU inputs the same way.
- Graphs are destroyed (`CUDAGraph.reset`) by `remove` and on the command line's way out, before the
  process group: NCCL >= 2.26 waits for them in the communicator's destruction.
- The replay watchdog makes its device current before touching an event (else a context on GPU 0).
- FreeU's Fourier basis is made on the device by an eager step, never inside a capture (a host copy
  there fails).
- Dropping graphs is agreed by every rank (NCCL: captured or not is a collective property); ranks that
  disagree on graphs at all are refused; NCCL_GRAPH_MIXING_SUPPORT=0 turns graphs off.
- `generate`'s phases are timed on the device's timeline; `bench --compile` picks graphs off.
- `plan` says its timeline model is eager and, on CUDA, predicts graphed steps too.

Graphs are played on CPU by the stand-in of tests/test_exchange_and_graphs.py; the tests marked
`real_cuda` run on a GPU only (benchmarks/device_check.sh runs them).
"""

import copy
import logging
import signal
import threading
import time
from functools import partial

import pytest
import torch
from helpers import BLOCK, denoise, tiny_model
from test_exchange_and_graphs import _stand_in_capture

import distrifusion
from distrifusion.engine.comm import Runtime
from distrifusion.engine.graphs import CudaGraphs, ReplayWatchdog
from distrifusion.measure.simulate import LoopbackCommunicator, loopback_runtime, simulate_ranks

TOL = 1e-9
WIDTH = 3 * BLOCK
CPU = torch.device("cpu")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


class _Graph:
    """A stand-in graph that records its destruction (`torch.cuda.CUDAGraph.reset`)."""

    def __init__(self, inner, destroyed: list) -> None:
        self.inner, self.destroyed = inner, destroyed

    def replay(self) -> None:
        assert self.inner is not None, "replayed after it was destroyed"
        self.inner.replay()

    def reset(self) -> None:
        self.destroyed.append(self)
        self.inner = None


def _recording(capture, destroyed: list, captured: list):
    def run(fn, static, pool):
        graph, out, meta, pool = capture(fn, static, pool)
        captured.append(_Graph(graph, destroyed))
        return captured[-1], out, meta, pool

    return run


# -- test helpers: inputs on the model's device --------------------------------------------------------


def test_gpu_test_helpers_make_inputs_on_the_models_device():
    """The helpers that tests/test_parity.py and tests/test_transformers.py run on a GPU (ranks on cuda:0)
    feed the model inputs on its device. The meta device plays the GPU: a CPU input refuses to mix with it,
    as it would with cuda:0 ("Expected all tensors to be on the same device")."""
    import test_parity
    from transformer_helpers import FAMILIES, tiny_transformer
    from transformer_helpers import denoise as denoise_transformer

    out = test_parity._simulation_case(loopback_runtime(4, rank=3, device="meta"))
    assert out.device.type == "meta"
    reference, parallel = test_parity._float32_case(loopback_runtime(4, rank=1, device="meta"))
    assert reference.device.type == parallel.device.type == "meta"
    for family in FAMILIES:
        model = tiny_transformer(family)
        config = distrifusion.ParallelConfig(warmup_steps=1)
        distrifusion.parallelize(model, config, runtime=loopback_runtime(2, rank=1, device="meta"))
        # A square grid: on the meta device a Flux token grid is read from the token count alone.
        assert denoise_transformer(model, family, 4, 4, steps=2).device.type == "meta"


# -- graphs destroyed before the process group ---------------------------------------------------------


def test_remove_destroys_every_graph():
    """`remove` destroys each captured graph at once (`CUDAGraph.reset`), not when the garbage collector
    gets to the model's reference cycles."""
    model = tiny_model("sd15")
    config = distrifusion.ParallelConfig(warmup_steps=1, split_cfg=False, cuda_graphs=False)
    distrifusion.parallelize(model, config, runtime=loopback_runtime(2, rank=1))
    state = model._distrifusion_state
    destroyed, captured = [], []
    state.graphs = CudaGraphs(CPU, capture=_recording(_stand_in_capture(state), destroyed, captured))
    denoise(model, "sd15", 5 * BLOCK, WIDTH, steps=4)
    assert len(captured) == 2  # the synchronous and the displaced step
    distrifusion.remove(model)
    assert destroyed == captured and len(state.graphs) == 0


def test_the_command_lines_exit_destroys_every_graph_before_the_group(monkeypatch, tmp_path):
    """`distrifusion generate` (here one process with graphs played on CPU) destroys every graph before it
    destroys the process group: the group's NCCL communicators would wait for them forever."""
    import torch.distributed as dist

    from distrifusion.app import cli
    from distrifusion.parallel import parallelize as engine

    destroyed, captured, at_destroy = [], [], []

    def solo_capture(fn, static, pool):
        out, meta = fn(static)

        class Replay:
            def replay(self):
                out.copy_(fn(static)[0])

        return Replay(), out, meta, pool

    def graphs(device, **kwargs):
        return CudaGraphs(device, capture=_recording(solo_capture, destroyed, captured), **kwargs)

    monkeypatch.setattr(engine, "use_cuda_graphs", lambda config, runtime, sharded=False: True)
    monkeypatch.setattr(engine, "CudaGraphs", graphs)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # a group to close, of one rank
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: at_destroy.append(len(destroyed)))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main's SIGTERM handler: not in pytest
    own = logging.getLogger("distrifusion")
    saved = own.propagate, list(own.handlers), own.level
    try:
        argv = ["generate", "-v", "--height", "32", "--width", "32", "--steps", "3", "--out", str(tmp_path / "g.png")]
        assert cli.main(argv) == 0
    finally:
        own.propagate, own.handlers[:] = saved[0], saved[1]
        own.setLevel(saved[2])
    assert len(captured) == 1 and at_destroy == [1], (len(captured), at_destroy)


# -- the replay watchdog's device ----------------------------------------------------------------------


def test_replay_watchdog_makes_its_device_current_before_any_event(monkeypatch):
    """Its thread's first CUDA call would otherwise create a context on GPU 0 (every rank's ~0.5 GiB there):
    it binds its device first, then queries events."""
    calls = []
    queried = threading.Event()

    class Event:
        def query(self):
            calls.append(("query", threading.current_thread().name))
            queried.set()
            return True

    bind = lambda: calls.append(("bind", threading.current_thread().name))  # noqa: E731
    watchdog = ReplayWatchdog(5.0, rank=1, make_event=Event, poll_s=0.01, bind=bind)
    watchdog.watch()
    assert queried.wait(5)
    assert calls[:2] == [("bind", "distrifusion-replay-watchdog"), ("query", "distrifusion-replay-watchdog")]
    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    ReplayWatchdog(5.0, rank=3, device=torch.device("cuda", 3)).bind()  # the default: the rank's device
    ReplayWatchdog(5.0, rank=0, device=CPU).bind()
    assert bound == [torch.device("cuda", 3)]


# -- FreeU under capture -------------------------------------------------------------------------------


def test_freeu_basis_is_made_on_the_device_before_the_capture(monkeypatch):
    """FreeU's Fourier basis comes from the eager warm-up step, made on the model's device and kept:
    nothing of it is made inside the captured step (a copy from host memory fails during a capture, and
    every FreeU step fell back to eager). Graphed steps equal eager ones."""
    from distrifusion.engine import layers

    capturing = threading.local()
    made_in_capture = []
    make = layers._fourier_basis

    def counted(*args, **kwargs):
        if getattr(capturing, "on", False):
            made_in_capture.append(threading.current_thread().name)
        return make(*args, **kwargs)

    monkeypatch.setattr(layers, "_fourier_basis", counted)
    monkeypatch.setattr(layers, "_capturing", lambda device: getattr(capturing, "on", False))
    base = tiny_model("sd15")
    base.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)

    def rank(runtime, graphed):
        model = copy.deepcopy(base)
        config = distrifusion.ParallelConfig(warmup_steps=1, split_cfg=False, cuda_graphs=False)
        distrifusion.parallelize(model, config, runtime=runtime)
        state = model._distrifusion_state
        capture = _stand_in_capture(state)

        def flagged(fn, static, pool):
            capturing.on = True
            try:
                return capture(fn, static, pool)
            finally:
                capturing.on = False

        if graphed:
            state.graphs = CudaGraphs(CPU, capture=flagged)
        return denoise(model, "sd15", 8 * BLOCK, WIDTH, steps=4), len(state.graphs or ())

    eager = simulate_ranks(2, partial(rank, graphed=False))
    for (out, captured), (reference, _) in zip(simulate_ranks(2, partial(rank, graphed=True)), eager):
        assert captured == 2 and _close(out, reference)
    assert made_in_capture == []


# -- graphs agreed by every rank -----------------------------------------------------------------------


def test_dropping_graphs_is_agreed_by_every_rank():
    """One rank's weights replaced (same values, new memory): that rank alone would recapture and launch
    its collectives eagerly while the others replay theirs, which NCCL forbids. The drop is agreed at the
    next image's first call: every rank recaptures the same graphs, and the images stay the same."""
    base = tiny_model("sd15")

    def rank(runtime):
        model = copy.deepcopy(base)
        config = distrifusion.ParallelConfig(warmup_steps=1, split_cfg=False, cuda_graphs=False)
        distrifusion.parallelize(model, config, runtime=runtime)
        state = model._distrifusion_state
        captured = []
        capture = _stand_in_capture(state)
        state.graphs = CudaGraphs(CPU, capture=lambda *a: captured.append(1) or capture(*a))
        per_image, outs = [], []
        for image in range(3):
            if image == 1 and runtime.rank == 1:
                weight = next(model.parameters())
                weight.data = weight.data.clone()  # only this rank finds its graphs stale
            before = len(captured)
            distrifusion.reset(model)
            outs.append(denoise(model, "sd15", 5 * BLOCK, WIDTH, steps=4))
            per_image.append(len(captured) - before)
        return per_image, outs

    results = simulate_ranks(2, rank)
    # Synchronous and displaced graphs captured in the first image, again in the second on both ranks
    # (before: rank 1 alone), replayed in the third.
    assert [r[0] for r in results] == [[2, 2, 0], [2, 2, 0]]
    for _, outs in results:
        assert all(_close(out, outs[0]) for out in outs[1:])
    assert torch.equal(results[0][1][0], results[1][1][0])


def test_ranks_that_disagree_on_graphs_are_refused():
    """A rank with graphs and one without would launch the same collectives captured and eagerly: refused
    at the first call, on every rank, before any collective of the layers."""
    base = tiny_model("sd15")

    def rank(runtime):
        model = copy.deepcopy(base)
        config = distrifusion.ParallelConfig(split_cfg=False, cuda_graphs=False)
        distrifusion.parallelize(model, config, runtime=runtime)
        state = model._distrifusion_state
        if runtime.rank == 0:
            state.graphs = CudaGraphs(CPU, capture=_stand_in_capture(state))
        with pytest.raises(ValueError, match="some ranks run steps as CUDA graphs and others eagerly"):
            denoise(model, "sd15", 5 * BLOCK, WIDTH, steps=1)
        return True

    assert simulate_ranks(2, rank) == [True, True]


def test_graphs_need_nccls_graph_mixing(monkeypatch):
    """Eager collectives run between replays on the same communicators (the step-0 agreement, eager
    steps): NCCL supports that only with graph mixing on. NCCL_GRAPH_MIXING_SUPPORT=0 turns graphs off
    (refused if asked for); one rank has no communicator to mix."""
    from distrifusion.parallel.parallelize import use_cuda_graphs

    cuda = torch.device("cuda", 0)  # only its type is read: nothing runs on it
    world = LoopbackCommunicator(2)
    two = Runtime(0, 2, cuda, world, {1: world, 2: LoopbackCommunicator(1)})
    one = loopback_runtime(1, device=cuda)
    auto, forced = distrifusion.ParallelConfig(), distrifusion.ParallelConfig(cuda_graphs=True)
    assert use_cuda_graphs(auto, two) and use_cuda_graphs(forced, two)
    monkeypatch.setenv("NCCL_GRAPH_MIXING_SUPPORT", "0")
    assert not use_cuda_graphs(auto, two) and use_cuda_graphs(auto, one)
    with pytest.raises(ValueError, match="NCCL_GRAPH_MIXING_SUPPORT=0"):
        use_cuda_graphs(forced, two)


# -- generate's phases, bench --compile, plan's timeline model -----------------------------------------


def test_phases_are_timed_on_the_devices_timeline(monkeypatch):
    """A phase (text encoding, VAE decode) is synchronised before and after on CUDA; the denoising span runs
    from the first call's start to the last call's end on the device, however many calls a step makes
    (before: a synchronisation after call number `steps`, the middle of a two-calls-per-step run)."""
    from distrifusion.measure import timing

    synced = []
    monkeypatch.setattr(timing, "sync_device", lambda device: synced.append(device.type))

    class Encoder:
        def encode(self):
            synced.append("work")
            return 1

    cuda = torch.device("cuda", 0)
    times: dict = {}
    encoder = Encoder()
    timing.time_phase(encoder, "encode", times, "text encoding", cuda)
    assert encoder.encode() == 1 and synced == ["cuda", "work", "cuda"] and times["text encoding"] >= 0

    class Event:  # the device's timeline: a counter of work done when recorded
        clock = [0.0]

        def __init__(self):
            self.at = None

        def record(self):
            self.at = Event.clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    def mark():
        event = Event()
        event.record()
        return event

    span = timing.DeviceSpan(cuda, mark=mark)
    steps = 4
    for _ in range(steps):
        for _ in range(2):  # two denoiser calls per step (true CFG)
            span.start()
            Event.clock[0] += 1.0  # one second of device work per call
            span.stop()
    assert span.calls == 2 * steps and span.seconds() == pytest.approx(2.0 * steps)
    assert timing.DeviceSpan(CPU).seconds() is None


def test_bench_compile_runs_without_distrifusions_graphs():
    """`bench --compile` on CUDA failed unless --graphs off was given (a compiled model refuses our graphs):
    auto now means off, on is refused with the reason."""
    from distrifusion.app import cli, cli_checks
    from distrifusion.measure.bench import graphs_with_compile

    args = cli.build_parser().parse_args(["bench", "--compile"])
    cli_checks.check(args)
    assert args.graphs == ["off"]
    args = cli.build_parser().parse_args(["bench", "--compile", "--graphs", "on"])
    with pytest.raises(cli_checks.UsageError, match="--graphs off"):
        cli_checks.check(args)
    assert graphs_with_compile(None, True) is False and graphs_with_compile(None, False) is None
    assert graphs_with_compile(False, "aot_eager") is False
    with pytest.raises(ValueError, match="cannot also run as distrifusion's CUDA graphs"):
        graphs_with_compile(True, True)


def test_plan_marks_its_timeline_eager_and_predicts_graphed_steps():
    """A bucket sent early in a step and read late in the next hides behind most of two steps when eager; a
    graph settles it at the end of its own step, so only the rest of that step hides it."""
    from distrifusion.measure.planner import Link, format_plan, simulate_step

    link = Link(latency_s=0.0, bytes_per_s=1.0)  # one byte per second: a 1-byte send takes 1 s
    events = [(0.1, "send", 1.0, "b"), (0.9, "wait", 0.0, "b")]
    assert simulate_step(events, 1.0, link) == pytest.approx(1.0)  # arrives at 1.1, read at 1.9
    assert simulate_step(events, 1.0, link, graphed=True) == pytest.approx(1.1)  # waited for at 1.0
    row = dict(ranks=2, choice="displaced", share_step_s=1.0, step_bytes=1, step_async_bytes=1, predicted_s=1.0)
    found = dict(link=dict(latency_s=0.0, bytes_per_s=1.0), rows=[row], best=row)
    assert "timeline model: eager steps" in format_plan(found)
    graphed = format_plan(dict(found, graphs=True, rows=[dict(row, predicted_graphs_s=1.1)]))
    assert "settled at the end of its own step" in graphed and "1100.0ms" in graphed


# -- on a GPU ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_real_cuda_graphs_capture_freeu_steps(caplog):
    """On a GPU: FreeU steps are captured (no fallback warning), equal eager ones, and are destroyed
    by `remove`."""
    results = {}
    for graphs in (False, True):
        model = tiny_model("sd15")
        model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        config = distrifusion.ParallelConfig(warmup_steps=1, split_cfg=False, cuda_graphs=graphs)
        distrifusion.parallelize(model, config, runtime=loopback_runtime(4, rank=2, device="cuda"))
        with caplog.at_level("WARNING", logger="distrifusion"):
            out = denoise(model, "sd15", 8 * BLOCK, WIDTH, steps=4)
        state = model._distrifusion_state
        results[graphs] = out, len(state.graphs or ())
        distrifusion.remove(model)
        assert len(state.graphs or ()) == 0
    assert "capturing a step as a CUDA graph failed" not in caplog.text
    assert results[True][1] == 2 and _close(results[True][0], results[False][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_real_cuda_replay_watchdog_watches_replays():
    """On a GPU: the watchdog's thread binds the rank's device and follows real events without firing."""
    fired = []
    watchdog = ReplayWatchdog(30.0, rank=0, device=torch.device("cuda", 0), on_timeout=fired.append, poll_s=0.001)
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(3):
        x = x @ x.T / 1024
        watchdog.watch()
    torch.cuda.synchronize()
    time.sleep(0.1)  # the thread's last poll sees the last event done
    assert not fired and watchdog._thread.is_alive() and watchdog._queue.empty()
