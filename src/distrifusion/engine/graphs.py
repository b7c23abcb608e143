"""CUDA graphs of a step function: one graph per input signature, captured lazily, replayed after.

At 1024² an SDXL step is launch-bound: replaying the step as one CUDA graph removes the
launches (and, with NCCL, captures the collectives too). A graph replays fixed kernels on
fixed memory, so the step function must be pure as far as Python goes: everything that
changes from call to call (the step counter, the choice of phase) happens outside it and is
part of the key, and every tensor it reads comes from its (static) inputs or from buffers that
outlive the graph (weights, the exchange buffers).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

log = logging.getLogger("distrifusion")

_WARMED = object()  # used once eagerly: captured at the next use
_EAGER = object()  # its capture failed on some rank: always eager
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every CudaGraphs of this process, for release_all_graphs


@dataclass
class _Captured:
    graph: Any
    """Something with `replay()`: a torch.cuda.CUDAGraph (or a test's stand-in)."""
    static: dict
    out: torch.Tensor
    meta: Any


def capture_cuda_graph(fn: Callable, static: dict, pool) -> tuple[Any, torch.Tensor, Any, Any]:
    """Capture `fn(static)` on the current CUDA device; return (graph, output, meta, memory pool).

    Capture records kernels without running them. "thread_local" keeps other threads' CUDA calls
    (the NCCL watchdog's and our `ReplayWatchdog`'s event queries) from invalidating the capture.
    """
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out, meta = fn(static)
    return graph, out, meta, graph.pool()


class CudaGraphs:
    """Runs `fn(inputs) -> (tensor, meta)` through CUDA graphs keyed by the caller's key plus the
    signature of `inputs` (shapes, dtypes, and the values of everything that is not a tensor).

    The first call with a key runs eagerly (it warms up kernels and allocates lazily created
    buffers); the second captures a graph and replays it; later ones only copy the inputs into
    the graph's static inputs and replay. The returned tensor is a copy: the next replay
    overwrites the graph's. All graphs of one object share one memory pool; they are replayed
    one at a time.

    Calls run eagerly, without a graph, when their inputs are not hashable, when autograd or
    autocast is on (a graph would bake in autocast's cached casts and record no backward), and
    for a key whose capture failed: `agree(ok)` tells every rank whether all ranks captured it
    (a collective, so that no rank replays collectives the others do not), and `abort()` undoes
    what the aborted capture did to the caller's Python state before the eager rerun.

    Whether to drop the graphs (weights replaced, `reset(drop_graphs=True)`) is each rank's own
    finding, but NCCL requires every rank of a communicator to launch its collectives alike, captured
    or not: a rank sets `stale`, and the graphs go on every rank at once at the next image's first
    call, where the ranks already agree on everything else (`parallelize`'s step-0 agreement).
    """

    def __init__(
        self,
        device: torch.device,
        capture: Callable = capture_cuda_graph,
        agree: Callable[[bool], bool] = bool,
        abort: Callable[[], None] = lambda: None,
        watchdog: ReplayWatchdog | None = None,
    ) -> None:
        self.device = device
        self.capture, self.agree, self.abort = capture, agree, abort
        self.watchdog = watchdog
        """Watches that replays finish (with collectives inside, a dead rank would hang them forever)."""
        self._graphs: dict[Any, Any] = {}
        self._pool = None
        self.stale = False
        """This rank found that its graphs no longer match the model; acted on where the ranks agree."""
        _LIVE.add(self)

    def __call__(self, key: Any, fn: Callable[[dict], tuple[torch.Tensor, Any]], inputs: dict):
        if torch.is_grad_enabled() or torch.is_autocast_enabled(self.device.type):
            return fn(inputs)
        try:
            key = (key, _signature(inputs))
            hash(key)
        except TypeError:
            return fn(inputs)
        entry = self._graphs.get(key)
        if entry is None or entry is _EAGER:
            result = fn(inputs)
            self._graphs.setdefault(key, _WARMED)  # only once it ran through
            return result
        if entry is _WARMED:
            static = _static_copy(inputs, self.device)
            try:
                graph, out, meta, pool = self.capture(fn, static, self._pool)
                error = None
            except Exception as e:  # noqa: BLE001 - reported below, then the step runs eagerly
                error = e
            if not self.agree(error is None):
                self._graphs[key] = _EAGER
                log.warning(
                    "distrifusion: capturing a step as a CUDA graph failed (%s); steps of this shape run eagerly. "
                    "ParallelConfig(cuda_graphs=False) or --no-cuda-graphs turns graphs off.",
                    f"{type(error).__name__}: {error}" if error else "on another rank",
                )
                self.abort()
                return fn(inputs)
            self._pool = pool
            entry = self._graphs[key] = _Captured(graph, static, out, meta)
        _copy_into(entry.static, inputs)
        entry.graph.replay()
        if self.watchdog is not None:
            self.watchdog.watch()
        return entry.out.clone(), entry.meta

    def __len__(self) -> int:
        """How many graphs are captured."""
        return sum(isinstance(e, _Captured) for e in self._graphs.values())

    def clear(self, keep: Callable[[Any], bool] = lambda key: False) -> None:
        """Drop every graph, or those whose caller's key `keep` rejects. A dropped graph is destroyed
        now (`CUDAGraph.reset`), not whenever the garbage collector finds it: NCCL (>= 2.26) will not
        destroy a communicator while a graph that holds its collectives is alive."""
        kept, dropped = {}, []
        for key, entry in self._graphs.items():
            if keep(key[0]):
                kept[key] = entry
            else:
                dropped.append(entry)
        self._graphs = kept
        for entry in dropped:
            if isinstance(entry, _Captured) and hasattr(entry.graph, "reset"):
                entry.graph.reset()
        if not self._graphs:
            self._pool = None


def release_all_graphs() -> int:
    """Destroy every CUDA graph of this process (every parallelised model's); returns how many.

    For the moment before `torch.distributed.destroy_process_group()`: NCCL >= 2.26 waits, in the
    communicator's destruction, until every graph holding its collectives is destroyed, and a model's
    graphs live in reference cycles (model -> wrapper -> state -> graphs) that only the garbage
    collector would end, in no particular order: the process would hang at exit. No collective."""
    count = 0
    for graphs in list(_LIVE):
        count += len(graphs)
        graphs.clear()
    return count


class ReplayWatchdog:
    """Ends the process when a replayed graph has not finished after `timeout_s`.

    Collectives captured in a graph are invisible to the process group's own timeout (its watchdog
    never sees them), so a rank that died would leave the others waiting forever. A background thread
    polls an event recorded after each replay, and past the deadline calls `on_timeout(message)`,
    which by default logs the message and exits with status 1: the launcher then reports the rank.

    The thread first makes `device` its current CUDA device (`bind`): a new thread's is GPU 0, and its
    first CUDA call (an event query) would create a context there, ~0.5 GiB of GPU 0 per rank.
    """

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        device: torch.device | None = None,
        make_event: Callable[[], Any] | None = None,
        on_timeout: Callable[[str], None] | None = None,
        poll_s: float = 0.05,
        bind: Callable[[], None] | None = None,
    ) -> None:
        self.timeout_s, self.rank, self.poll_s = timeout_s, rank, poll_s
        self.make_event = make_event or _recorded_cuda_event
        self.on_timeout = on_timeout or _exit_hung
        self.bind = bind or partial(_bind_device, device)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def watch(self) -> None:
        """Watch the work queued so far on the current stream (called right after a replay)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="distrifusion-replay-watchdog", daemon=True)
            self._thread.start()
        self._queue.put((self.make_event(), time.monotonic() + self.timeout_s))

    def _run(self) -> None:
        self.bind()
        while True:
            event, deadline = self._queue.get()
            while not event.query():
                if time.monotonic() > deadline:
                    self.on_timeout(
                        f"distrifusion: error on rank {self.rank}: a step replayed as a CUDA graph did not finish "
                        f"within timeout_s={self.timeout_s:g} s (did another rank die?); exiting so that no rank "
                        "waits forever"
                    )
                    return
                time.sleep(self.poll_s)


def _bind_device(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)


def _recorded_cuda_event():
    event = torch.cuda.Event()
    event.record()
    return event


def _exit_hung(message: str) -> None:
    log.error(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def _signature(value) -> Any:
    """A hashable description of everything a graph bakes in about `value`."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    hash(value)  # TypeError for values a key cannot hold
    return ("value", type(value).__name__, value)


def _static_copy(value, device: torch.device):
    """The graph's own copy of the inputs, on the graph's device (host tensors cannot be read by a
    replay without a synchronising copy)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {k: _static_copy(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_static_copy(v, device) for v in value)
    return value


def _copy_into(static, value) -> None:
    if isinstance(value, torch.Tensor):
        static.copy_(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _copy_into(static[k], v)
    elif isinstance(value, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)
