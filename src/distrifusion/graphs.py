"""CUDA graphs of a step function: one graph per input signature, captured lazily, replayed after.

At 1024² an SDXL step is launch-bound: replaying the step as one CUDA graph removes the
launches (and, with NCCL, captures the collectives too). A graph replays fixed kernels on
fixed memory, so the step function must be pure as far as Python goes: everything that
changes from call to call (the step counter, the choice of phase) happens outside it and is
part of the key, and every tensor it reads comes from its (static) inputs or from buffers that
outlive the graph (weights, the exchange buffers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_WARMED = object()


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
    (the NCCL watchdog's event queries) from invalidating the capture.
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
    the graph's static inputs and replay. Inputs whose non-tensor values are not hashable run
    eagerly every time. The returned tensor is a copy: the next replay overwrites the graph's.
    All graphs of one object share one memory pool; they must be replayed one at a time.
    """

    def __init__(self, device: torch.device, capture: Callable = capture_cuda_graph) -> None:
        self.device = device
        self.capture = capture
        self._graphs: dict[Any, Any] = {}
        self._pool = None

    def __call__(self, key: Any, fn: Callable[[dict], tuple[torch.Tensor, Any]], inputs: dict):
        try:
            key = (key, _signature(inputs))
            hash(key)
        except TypeError:
            return fn(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            self._graphs[key] = _WARMED
            return fn(inputs)
        if entry is _WARMED:
            static = _static_copy(inputs, self.device)
            try:
                graph, out, meta, self._pool = self.capture(fn, static, self._pool)
            except Exception as e:  # name the way out; the original error follows
                raise RuntimeError(
                    f"distrifusion: capturing a step as a CUDA graph failed ({type(e).__name__}: {e}); "
                    "run without graphs: ParallelConfig(cuda_graphs=False), or --no-cuda-graphs"
                ) from e
            entry = self._graphs[key] = _Captured(graph, static, out, meta)
        _copy_into(entry.static, inputs)
        entry.graph.replay()
        return entry.out.clone(), entry.meta

    def __len__(self) -> int:
        """How many graphs are captured."""
        return sum(isinstance(e, _Captured) for e in self._graphs.values())

    def clear(self) -> None:
        """Drop every graph (e.g. after the model's weights were replaced)."""
        self._graphs.clear()
        self._pool = None


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
