"""`distrifusion plan` and `ParallelConfig(mode="auto")`: the fastest way to run N ranks on these links,
predicted from measurements of this machine, this model and this size.

Three measurements, no assumed figures:
1. the link: blocking all-gathers of 4 KiB to 8 MiB per rank among the ranks: the bandwidth from the
   two largest (their difference: the marginal cost of a byte), the latency from the smallest; and how
   long ranks wait for each other at a collective after a few milliseconds of computation (skew);
2. each choice's share of a step: this rank's strip with loopback collectives (so its compute, and a
   compressed choice's encoding and decoding), timed on every rank at once, so that ranks which share a
   machine's cores or memory are timed as they will run;
3. each choice's exchange, recorded in one such step as a timeline: when each collective is issued,
   how many bytes it moves, whether the step waits for it at once (blocking) or later (displaced mode's
   buckets: sent when their last layer has written, waited for where the next step's first layer
   reads them).

The predicted step replays that timeline against the link (`simulate_step`): one collective at a time
on the link, in issue order; the step stalls where it waits for a collective that has not arrived. So
a bucket sent mid-step hides behind the rest of that step and the next step's layers before its use,
and a bucket sent at the end and read at the start of the next step hides behind nothing. Fewer ranks
are predicted the same way (their share and timeline measured, this link assumed); "auto" chooses
among the modes and compressions of all the ranks (fewer ranks need another launch, so the table only
shows them): the most faithful choice predicted within 10% of the fastest (`choose`).

The timeline model is that of eager steps, and steps are planned and measured eagerly (no CUDA graphs).
A step replayed as a CUDA graph may leave nothing in flight, so each of its exchanges is settled at the
end of its own step: it hides behind the rest of that step only, not behind the next step's layers before
its use. On CUDA the plan also gives that prediction (`predicted_graphs_s`: the same eager work, every
collective of a step arrived before the next begins); the graph's shorter work (no launch gaps) is not
measured, and "auto" chooses from the eager predictions.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass

import torch

from ..engine.comm import Communicator, Runtime
from ..engine.config import COMPRESS_MODES, ParallelConfig
from .timing import free_cached_memory, sync_device, time_calls
from .traffic import counting_loopback_runtime, first_steps_traffic
from .workload import model_inputs, pixels_per_cell

log = logging.getLogger("distrifusion")

PROBE_BYTES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20)
"""Per-rank payloads of the link probe: the small ones give the latency, the large ones the bandwidth."""


@dataclass
class Link:
    """One rank's view of an all-gather among the ranks: seconds per collective and bytes it receives
    per second."""

    latency_s: float
    bytes_per_s: float
    skew_s: float = 0.0
    """How long a rank that reaches a collective after some computation waits, on average, for the last
    one to arrive (their computations do not take exactly as long): paid at every blocking collective."""

    def seconds(self, nbytes: float, calls: int) -> float:
        return calls * self.latency_s + nbytes / self.bytes_per_s


def measure_link(comm: Communicator, device: torch.device, sizes=PROBE_BYTES, repeats: int = 5) -> Link:
    """Time blocking all-gathers of `sizes` bytes per rank among `comm`'s members and fit a latency and a
    bandwidth (`_link_figures`, from the medians). Every rank returns the same, slowest, estimate."""
    if comm.size == 1:
        return Link(0.0, float("inf"))
    points = []
    for size in sizes:
        buffer = torch.zeros(comm.size, size, dtype=torch.uint8, device=device)
        times = []
        for i in range(repeats + 1):  # the first one sets the connection up: untimed
            seconds = _timed_all_gather(comm, buffer, device)
            if i:
                times.append(seconds)
        points.append(((comm.size - 1) * size, statistics.median(times)))
    latency, seconds_per_byte = _link_figures(points)
    skew = _measure_skew(comm, device, latency)
    latency, seconds_per_byte, skew = _slowest(comm, device, latency, seconds_per_byte, skew)
    return Link(latency, 1.0 / seconds_per_byte, skew)


def _timed_all_gather(comm: Communicator, buffer: torch.Tensor, device: torch.device) -> float:
    """Seconds of one blocking in-place all-gather of `buffer`, the device synchronised on both sides."""
    sync_device(device)
    start = time.perf_counter()
    comm.all_gather_inplace(buffer).wait()
    sync_device(device)
    return time.perf_counter() - start


def _measure_skew(comm: Communicator, device: torch.device, latency: float, rounds: int = 40) -> float:
    """`Link.skew_s`: rounds of a few milliseconds of computation, each followed by a small blocking
    all-gather; the mean time in the all-gather beyond its latency is the wait for the others."""
    x = torch.randn(192, 192, device=device)
    buffer = torch.zeros(comm.size, 1024, dtype=torch.uint8, device=device)
    waits = []
    for i in range(rounds + 5):
        for _ in range(8):
            x = torch.tanh(x @ x * 0.01)
        seconds = _timed_all_gather(comm, buffer, device)
        if i >= 5:  # the first rounds start together from the probe above
            waits.append(seconds)
    return max(statistics.fmean(waits) - latency, 0.0)


def _link_figures(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds per collective, seconds per byte) from (bytes, seconds) probe points sorted by size: the
    marginal cost of a byte between the two largest, the rest of the smallest one's time as latency. A
    straight-line fit through all points would be bent by rate limiters that let small messages through
    at once (token buckets) and by the small ones' noise. Both kept positive."""
    (x1, t1), (x2, t2) = points[-2], points[-1]
    per_byte = max((t2 - t1) / (x2 - x1), 1e-15) if x2 > x1 else max(t2 / x2, 1e-15)
    x0, t0 = points[0]
    return max(t0 - x0 * per_byte, 0.0), per_byte


@dataclass(frozen=True)
class Choice:
    """One way to run: how many ranks, which mode, which compression."""

    ranks: int
    mode: str
    compress: str | None = None

    @property
    def name(self) -> str:
        return self.mode + (f" + {self.compress}" if self.compress else "")


def choices(ranks: int, compressions=COMPRESS_MODES) -> list[Choice]:
    """All ranks: sync, displaced, displaced with each compression. Then each smaller power-of-two share
    of the ranks (down to one, which needs no link), displaced."""
    rows = [Choice(ranks, "sync"), Choice(ranks, "displaced")]
    rows += [Choice(ranks, "displaced", c) for c in compressions]
    fewer = ranks // 2
    while fewer >= 1:
        rows.append(Choice(fewer, "displaced" if fewer > 1 else "sync"))
        fewer //= 2
    return rows


_COUNTS = ("step_blocking_bytes", "step_blocking_calls", "step_async_bytes", "step_async_calls")


def simulate_step(events: list, work: float, link: Link, steps: int = 40, graphed: bool = False) -> float:
    """A steady-state step's seconds: the recorded `events` (module docstring) replayed against `link`.

    Runs `steps` consecutive steps in time: the link moves one collective at a time, in issue order; a
    step stalls at a blocking collective until the others have arrived (`Link.skew_s`) and it has moved,
    and at a wait until that collective of the
    previous step has arrived, and everything after a stall happens later (the sends too). `graphed`: a
    step as a CUDA graph, which settles its sends at its own end (it may leave nothing in flight), so
    that step ends when the last of them has arrived. Returns the mean of the last quarter of the steps
    (a link-bound exchange can settle into alternating lengths)."""
    free, arrived, start, lengths = 0.0, {}, 0.0, []
    for _ in range(steps):
        shift, sent = 0.0, {}
        for t, kind, nbytes, ident in events:
            now = start + t + shift
            if kind == "block":  # starts when the last rank is there and the link is free
                free = max(now + link.skew_s, free) + link.seconds(nbytes, 1)
                shift += free - now
            elif kind == "wait" and arrived.get(ident, now) > now:
                shift += arrived[ident] - now
            elif kind == "send":
                free = sent[ident] = max(now, free) + link.seconds(nbytes, 1)
        if graphed and sent:
            shift = max(shift, max(sent.values()) - start - work)
        arrived = sent
        lengths.append(work + shift)
        start += work + shift
    last = lengths[-max(1, steps // 4) :]
    return sum(last) / len(last)


def predict(row: dict, link: Link, graphed: bool = False) -> float:
    """A step's seconds from its measured work and recorded exchange (`simulate_step`)."""
    return simulate_step(row.get("timeline", []), row["share_step_s"], link, graphed=graphed)


def _slowest(comm: Communicator, device: torch.device, *values: float) -> list[float]:
    """Each of `values`, the largest over `comm`'s members: the slowest rank sets the step, and every rank
    must plan from the same figures (a rank that sorted or chose from its own would run other collectives)."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    return comm.all_gather(mine).wait().amax(0).tolist()


def share_profile(
    model, inputs: dict, choice: Choice, device: torch.device, repeats: int = 3, split_cfg: bool | str = True
) -> dict:
    """One rank's share of `choice` on this device (loopback collectives): its work per step (median of
    `repeats` steady-state steps), its bytes per step (received; blocking and asynchronous) and the
    timeline of one step's exchange. `model` must not be parallelised (it is, then removed again)."""
    from ..parallel.parallelize import parallelize, remove

    if choice.ranks == 1:  # the whole step on one device: nothing to exchange
        work = time_calls(lambda: model(**inputs), device, repeats)
        return dict(
            share_step_s=work, cfg_groups=1, step_bytes=0, sync_step_bytes=0, timeline=[], **dict.fromkeys(_COUNTS, 0)
        )
    log: dict = {}
    runtime = counting_loopback_runtime(choice.ranks, device, log)
    config = ParallelConfig(
        mode=choice.mode, compress=choice.compress, warmup_steps=0, split_cfg=split_cfg, cuda_graphs=False
    )
    parallelize(model, config, runtime=runtime)

    def step() -> None:
        log["next_id"] = 0
        model(**inputs)

    try:
        row = first_steps_traffic(model, inputs, log, choice.mode)  # step 0 (synchronous), then one more
        work = time_calls(step, device, repeats, warmup=1)
        log.update(recording=True, events=[], t0=time.perf_counter())
        sync_device(device)
        step()
        sync_device(device)
        recorded = time.perf_counter() - log["t0"]
        log["recording"] = False
    finally:
        remove(model)
    # The recorded step ran with a synchronisation at every event: its times, scaled to the median step.
    scale = work / recorded if recorded > 0 else 1.0
    timeline = [(t * scale, kind, nbytes, ident) for t, kind, nbytes, ident in log["events"]]
    return dict(row, share_step_s=work, timeline=timeline)


def profile(
    model, inputs: dict, runtime: Runtime, candidates: list[Choice], repeats: int = 3, split_cfg: bool | str = True
) -> list[dict]:
    """Measure each candidate's share (`share_profile`) on every rank at once; one row per candidate, with
    the slowest rank's work. `model` must not be parallelised (each candidate is, then removed)."""
    rows = []
    for choice in candidates:
        with torch.no_grad():
            row = share_profile(model, inputs, choice, runtime.device, repeats, split_cfg)
        (row["share_step_s"],) = _slowest(runtime.world, runtime.device, row["share_step_s"])
        rows.append(dict(row, ranks=choice.ranks, choice=choice.name, mode=choice.mode, compress=choice.compress))
        free_cached_memory(runtime.device)
    return rows


def plan(
    model,
    inputs: dict,
    runtime: Runtime,
    candidates: list[Choice] | None = None,
    repeats: int = 3,
    split_cfg: bool | str = True,
) -> dict:
    """The link, and each candidate's measured work, counted bytes and predicted step, fastest first;
    `best`: what "auto" runs (`choose`). `split_cfg` as
    ParallelConfig's: with it, a CFG batch on 2 ranks is two halves, each whole (nothing to exchange)."""
    candidates = candidates or choices(runtime.world_size)
    link = measure_link(runtime.world, runtime.device)
    rows = profile(model, inputs, runtime, candidates, repeats, split_cfg)
    # Each rank replays its own exchange (strips differ: so do timelines): the slowest prediction counts.
    predictions = _slowest(runtime.world, runtime.device, *(predict(row, link) for row in rows))
    for row, predicted in zip(rows, predictions):
        row["predicted_s"] = predicted
    graphs = runtime.device.type == "cuda"  # where steps would run as CUDA graphs: their exchange settles early
    if graphs:
        graphed = _slowest(runtime.world, runtime.device, *(predict(row, link, graphed=True) for row in rows))
        for row, predicted in zip(rows, graphed):
            row["predicted_graphs_s"] = predicted
    rows.sort(key=lambda r: r["predicted_s"])
    best = choose(rows, runtime.world_size)
    return dict(link=dataclasses.asdict(link), rows=rows, best=best, timeline="eager", graphs=graphs)


FIDELITY = (
    "sync",
    "displaced",
    "displaced + int8",
    "displaced + residual-int8",
    "displaced + fp8",
    "displaced + residual-fp8",
    "displaced + residual-int4",
    "displaced + residual-int2",
)
"""What "auto" may run, the most faithful first (QUALITY.md, embedded UNet and DiT, N = 2/4/8: sync is
exact; the others within 1 dB of uncompressed displaced). Plain int4 and int2 are left out: the residual
codes send as few bytes and lose less (plain int2 loses 8 dB on the UNet, 20 on the DiT)."""

AUTO_TOLERANCE = 0.10
""""auto" takes the most faithful choice predicted within this fraction of the fastest: an exact image, or
less compression, is worth a step that is a few percent slower (and the measurements' noise is of that
order on shared CPUs)."""


def choose(rows: list[dict], ranks: int) -> dict:
    """The row "auto" runs: among the choices that use all `ranks` and that it may run (`FIDELITY`), the
    most faithful one predicted within `AUTO_TOLERANCE` of the fastest."""
    eligible = [r for r in rows if r["ranks"] == ranks and r["choice"] in FIDELITY]
    fastest = min(r["predicted_s"] for r in eligible)
    close = [r for r in eligible if r["predicted_s"] <= fastest * (1 + AUTO_TOLERANCE)]
    return min(close, key=lambda r: FIDELITY.index(r["choice"]))


def resolve_auto(pipe_or_model, model, config: ParallelConfig, runtime: Runtime) -> tuple[ParallelConfig, dict]:
    """`ParallelConfig(mode="auto")` and `shard_weights="auto"` made concrete for `model` (the denoiser of
    `pipe_or_model`). Sharding first (`resolve_sharding`: only when the model does not fit unsharded).
    Then the mode: plan at `config.auto_size` (pixels; None: the model's own sample size, in the
    pipeline's pixels per latent cell) and return the config with the best choice's mode and
    compression, and the plan. A sharded model cannot have its share profiled on one device (it does
    not fit): it runs displaced, uncompressed. Rank 0 logs the choices. `distrifusion.parallelize` calls
    it (the engine's `parallelize` never imports the planner)."""
    memory = {}
    if config.shard_weights == "auto":
        config, memory = resolve_sharding(pipe_or_model, model, config, runtime)
    if config.mode != "auto":
        return config, memory
    if config.shard_weights is True and runtime.world_size > 1:
        if runtime.rank == 0:
            log.info("distrifusion: mode auto: sharded weights, so no step can be profiled whole: displaced")
        return dataclasses.replace(config, mode="displaced"), memory
    pipe_or_model.to(runtime.device)
    found = _resolve_mode(pipe_or_model, model, config, runtime)
    return found[0], {**found[1], **memory}


def resolve_sharding(pipe_or_model, model, config: ParallelConfig, runtime: Runtime) -> tuple[ParallelConfig, dict]:
    """`shard_weights="auto"` made concrete: shard only when one rank's peak memory unsharded (the memory
    plan of the loaded pipeline's shapes, `distrifusion.measure.memory`, at `config.auto_size` or the
    pipeline's default size) does not fit the smallest rank's device; every rank decides alike. Rank 0
    logs why. Returns the config and {"memory": the plan's row, capacity, decision}."""
    from .memory import GB, fits_capacity, live_parts, local_capacity, memory_plan

    if runtime.world_size == 1:
        return dataclasses.replace(config, shard_weights=False), {}
    scale = None if model is pipe_or_model else pixels_per_latent(pipe_or_model)
    parts = live_parts(pipe_or_model, model, config.auto_size or default_size(pipe_or_model, model, scale))
    height, width = config.auto_size or parts.pipeline.size
    found = memory_plan(parts, height, width, parts.pipeline.frames, [runtime.world_size], config.mode, cards_gb=())
    row = next(r for r in found["rows"] if not r["sharded"] and r["text_encoders"] == "replicated")
    need, neg_capacity = _slowest(
        runtime.world, runtime.device, float(row["peak"]), -float(local_capacity(runtime.device))
    )
    capacity = -neg_capacity
    shard = not fits_capacity(need, capacity)
    if runtime.rank == 0:
        log.info(
            "distrifusion: shard_weights auto: %s needs %.1f GB per rank unsharded (plan at %dx%d), the smallest "
            "device has %.1f GB: %s",
            type(model).__name__,
            need / GB,
            height,
            width,
            capacity / GB,
            "sharding the weights" if shard else "it fits, not sharding",
        )
    decision = dict(peak_unsharded=need, capacity=capacity, sharded=shard, height=height, width=width)
    return dataclasses.replace(config, shard_weights=shard), {"memory": decision}


def _resolve_mode(pipe_or_model, model, config: ParallelConfig, runtime: Runtime) -> tuple[ParallelConfig, dict]:
    scale = None if model is pipe_or_model else pixels_per_latent(pipe_or_model)
    if runtime.world_size == 1:
        return dataclasses.replace(config, mode="sync"), {}
    height, width = config.auto_size or default_size(pipe_or_model, model, scale)
    inputs = model_inputs(model, height, width, scale=scale)
    # Only what "auto" may run: all the ranks, the choices in FIDELITY (the rest would only cost time).
    candidates = [c for c in choices(runtime.world_size) if c.ranks == runtime.world_size and c.name in FIDELITY]
    found = plan(model, inputs, runtime, candidates, split_cfg=config.split_cfg)
    best = found["best"]
    if runtime.rank == 0:
        log.info(describe_choice(found))
    return dataclasses.replace(config, mode=best["mode"], compress=best["compress"]), found


def describe_choice(found: dict) -> str:
    """One line: what "auto" chose, and what it predicted for the others that use all the ranks."""
    if not found:
        return "distrifusion: mode auto: one rank, nothing to exchange (sync)"
    best, link = found["best"], found["link"]
    others = [r for r in found["rows"] if r["ranks"] == best["ranks"] and r is not best][:3]
    alternatives = ", ".join(f"{r['choice']} {r['predicted_s'] * 1e3:.1f}" for r in others)
    return (
        f"distrifusion: mode auto: {best['choice']} (predicted {best['predicted_s'] * 1e3:.1f} ms/step; "
        f"{alternatives}; "
        f"link {link['latency_s'] * 1e3:.2f} ms + {link['bytes_per_s'] / 1e9:.2f} GB/s)"
    )


def pixels_per_latent(pipe) -> int:
    """A pipeline's pixels per latent cell: its VAE's factor; without a VAE it works on pixels (the
    texture models)."""
    return getattr(pipe, "vae_scale_factor", 8) if getattr(pipe, "vae", None) else 1


def default_size(pipe_or_model, model, scale: int | None) -> tuple[int, int]:
    """The (height, width) in pixels that "auto" plans at without `auto_size`: what the pipeline makes by
    default (its `default_sample_size`, else its denoiser's `sample_size`, in latent cells of `scale`
    pixels); for a bare model its config's `sample_size` (latent cells of 8 pixels; 1 for a pixel-space
    UNet2DModel), else what the family's pipelines make (`ModelAdapter.default_size`). A ValueError asking
    for `auto_size` when none of them says."""
    from ..models import find_denoiser

    cells = getattr(pipe_or_model, "default_sample_size", None) if model is not pipe_or_model else None
    cells = cells or getattr(model.config, "sample_size", None)
    if cells is None:
        size = find_denoiser(model)[1].default_size
        if size is None:
            raise ValueError(
                f"distrifusion: ParallelConfig(mode='auto') needs a size to plan at and {type(model).__name__} "
                "has no sample_size; give ParallelConfig(auto_size=(height, width)) in pixels"
            )
        return size
    rows, cols = (cells, cells) if isinstance(cells, int) else tuple(cells)
    scale = scale or pixels_per_cell(model)
    return rows * scale, cols * scale


def measure(model, inputs: dict, runtime: Runtime, choice: Choice, repeats: int = 3, **config) -> float:
    """The real step time of a choice that uses all the ranks (the slowest rank's median displaced or
    sync step, after a synchronous first step): what a prediction is checked against."""
    from ..parallel.parallelize import parallelize, remove

    cfg = ParallelConfig(mode=choice.mode, compress=choice.compress, warmup_steps=0, cuda_graphs=False, **config)
    parallelize(model, cfg, runtime=runtime)
    state = model._distrifusion_state
    try:
        with torch.no_grad():
            model(**inputs)  # step 0: synchronous, fills the stale context
            seconds = time_calls(lambda: model(**inputs), runtime.device, repeats, warmup=1)
        state.reset()
    finally:
        remove(model)
    return _slowest(runtime.world, runtime.device, seconds)[0]


def format_plan(found: dict, measured: dict | None = None) -> str:
    """The plan as a table: one line per choice, fastest first, and the link it assumed."""
    link = found["link"]
    graphs = found.get("graphs", False)
    lines = [
        f"link: {link['latency_s'] * 1e3:.3f} ms per collective, "
        f"{link['bytes_per_s'] / 1e9:.3f} GB/s received per rank, "
        f"{link.get('skew_s', 0.0) * 1e3:.3f} ms waiting for the others at a blocking collective",
        "timeline model: eager steps (work timed without CUDA graphs; an exchange hides behind the rest of its "
        "step and the next step's layers before its use)"
        + (
            "; 'graphs': the same work as CUDA graphs would run it, every exchange settled at the end of its own "
            "step (their shorter launch gaps not measured)"
            if graphs
            else ""
        ),
        f"{'ranks':>5}  {'choice':<26}{'work/step':>11}{'MB/step':>10}{'behind':>8}{'predicted':>11}"
        + (f"{'graphs':>10}" if graphs else "")
        + (f"{'measured':>10}{'error':>8}" if measured else ""),
    ]
    for row in found["rows"]:
        mb = row["step_bytes"] / 1e6
        hidden = row["step_async_bytes"] / row["step_bytes"] if row["step_bytes"] else 0.0
        line = (
            f"{row['ranks']:>5}  {row['choice']:<26}{row['share_step_s'] * 1e3:>9.1f}ms{mb:>10.2f}{hidden:>8.0%}"
            f"{row['predicted_s'] * 1e3:>9.1f}ms"
        )
        if graphs:
            line += f"{row['predicted_graphs_s'] * 1e3:>8.1f}ms"
        key = (row["ranks"], row["choice"])
        if measured and key in measured:
            real = measured[key]
            line += f"{real * 1e3:>8.1f}ms{(row['predicted_s'] - real) / real:>+8.0%}"
        lines.append(line)
    best = found["best"]
    lines.append(f"auto: {best['choice']} on {best['ranks']} ranks (predicted {best['predicted_s'] * 1e3:.1f} ms/step)")
    return "\n".join(lines)
