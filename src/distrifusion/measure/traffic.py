"""Bytes on the wire, counted at the communicator: what each rank receives per synchronous and
displaced step, split into blocking and asynchronous collectives (with a timeline for the planner),
beside what Ulysses sequence parallelism would move for the same attention calls."""

from __future__ import annotations

import time

import torch

from ..engine.comm import Communicator, PendingGather
from ..engine.config import ParallelConfig
from ..parallel.parallelize import parallelize, remove
from .simulate import loopback_runtime
from .timing import sync_device
from .workload import build_model, model_inputs


class CountingCommunicator:
    """Counts the bytes this rank receives (from the group's other members) through `inner`: in all
    ("bytes"), and split by kind: blocking collectives ("blocking_bytes", "blocking_calls"), which
    the step waits for, and asynchronous ones ("async_bytes", "async_calls"), which run behind it.

    While `counter["recording"]` is set it also logs each collective, for the planner's
    timeline: (seconds since `counter["t0"]`, "block" or "send", bytes, id), and each asynchronous one's
    wait: (seconds, "wait", 0, id), in `counter["events"]`. Ids number a step's asynchronous collectives
    in issue order (whoever runs the steps sets `counter["next_id"] = 0` before each), so a wait in one
    step names the collective of the previous step with the same number."""

    def __init__(self, inner: Communicator, counter: dict, device: torch.device | None = None) -> None:
        self.inner, self.counter, self.device = inner, counter, device
        self.rank, self.size = inner.rank, inner.size
        self.capturable = inner.capturable

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False) -> PendingGather:
        return self._issue(lambda: self.inner.all_gather(tensor, async_op), tensor[None], async_op)

    def all_gather_inplace(self, buffer: torch.Tensor, async_op: bool = False) -> PendingGather:
        return self._issue(lambda: self.inner.all_gather_inplace(buffer, async_op), buffer, async_op)

    def _issue(self, gather, buffer: torch.Tensor, async_op: bool) -> PendingGather:
        nbytes = (self.size - 1) * buffer[0].numel() * buffer.element_size()
        kind = "async" if async_op else "blocking"
        for key, value in (("bytes", nbytes), (f"{kind}_bytes", nbytes), (f"{kind}_calls", 1)):
            self.counter[key] = self.counter.get(key, 0) + value
        ident = -1
        if async_op:
            ident = self.counter.get("next_id", 0)
            self.counter["next_id"] = ident + 1
        self.event("send" if async_op else "block", nbytes, ident)
        pending = gather()
        return _LoggedWait(pending, self, ident) if async_op else pending

    def event(self, kind: str, nbytes: int, ident: int) -> None:
        if self.counter.get("recording"):
            if self.device is not None:
                sync_device(self.device)
            self.counter["events"].append((time.perf_counter() - self.counter["t0"], kind, nbytes, ident))


class _LoggedWait:
    def __init__(self, pending: PendingGather, comm: CountingCommunicator, ident: int) -> None:
        self.pending, self.comm, self.ident = pending, comm, ident

    def wait(self) -> torch.Tensor:
        self.comm.event("wait", 0, self.ident)
        return self.pending.wait()


def counting_loopback_runtime(ranks: int, device: torch.device, counter: dict):
    """This process as the last rank of `ranks` (loopback), counting the bytes it receives."""
    runtime = loopback_runtime(ranks, device=device)
    runtime.world = CountingCommunicator(runtime.world, counter, device)
    runtime.patch_groups = {k: CountingCommunicator(c, counter, device) for k, c in runtime.patch_groups.items()}
    return runtime


def count_traffic(
    arch: str,
    sizes: list[int | tuple[int, int]],
    dtype: torch.dtype,
    ranks: list[int],
    mode: str = "displaced",
    text_tokens=None,
    compress: str | None = None,
    frames: int | None = None,
    video_split: str = "rows",
):
    """Bytes each rank receives per synchronous and per displaced step, for every size (square, or
    (height, width)) and N (and a video model's `frames`), and
    what Ulysses sequence parallelism would receive for the same attention calls.

    Traffic depends on shapes only, so the model runs on the meta device: no weights, no compute,
    any image size in seconds on any machine. Counted at the communicator, like `bench_step`.
    """
    device = torch.device("meta")
    model = build_model(arch, dtype, device)
    rows = []
    for size in sizes:
        height, width = (size, size) if isinstance(size, int) else size
        inputs = model_inputs(model, height, width, frames=frames)
        calls = attention_calls(model, inputs)
        for n in ranks:
            counter = {"bytes": 0}
            config = ParallelConfig(
                mode=mode,
                warmup_steps=0,
                split_cfg=True,
                cuda_graphs=False,
                text_tokens=text_tokens or "sharded",
                compress=compress,
                video_split=video_split,
            )
            parallelize(model, config, runtime=counting_loopback_runtime(n, device, counter))
            with torch.no_grad():
                traffic = first_steps_traffic(model, inputs, counter, mode)
            remove(model)
            groups = traffic["cfg_groups"]
            dtype_name = str(dtype).removeprefix("torch.")
            ulysses = ulysses_bytes(calls, n // groups, groups, torch.finfo(dtype).bits // 8)
            rows.append(
                dict(arch=arch, height=height, width=width, dtype=dtype_name, mode=mode, ranks=n, **traffic)
                | ({"frames": frames, "video_split": video_split} if frames else {})
                | dict(text_tokens=config.text_tokens, compress=compress, ulysses_step_bytes=ulysses)
            )
    return rows


def attention_calls(model, inputs: dict) -> list[tuple[int, int, int]]:
    """(batch, tokens, width) of every attention call of one step that mixes tokens across the image
    (self- and joint attention; cross-attention to text is local under any split)."""
    calls = []

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if text is not None and getattr(module, "is_cross_attention", False):
            return  # cross-attention: local
        tokens = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[2] * hidden.shape[3]
        calls.append((hidden.shape[0], tokens + (0 if text is None else text.shape[1]), module.inner_dim))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if hasattr(m, "processor")]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def ulysses_bytes(calls: list[tuple[int, int, int]], patch_ranks: int, cfg_groups: int, element: int) -> int:
    """Bytes one rank receives per step under Ulysses sequence parallelism over `patch_ranks`: each
    attention call all-to-alls its queries, keys, values and output; each of the four moves leaves a
    rank with (n-1)/n^2 of the call's (tokens x width) elements from the others."""
    n = patch_ranks
    if n == 1:
        return 0
    return sum(4 * (batch // cfg_groups) * tokens * width * (n - 1) // n**2 * element for batch, tokens, width in calls)


def first_steps_traffic(model, inputs: dict, counter: dict, mode: str) -> dict:
    """Bytes received in step 0 (synchronous) and step 1 of a freshly parallelised model, and its split.

    Both run eagerly (a graph is captured at a phase's second use) so the communicator sees them; with
    mode="sync" step 1 would be the synchronous graph's first replay, so the synchronous figure stands.
    """
    counter.clear()
    model(**inputs)
    sync = dict(counter)
    counter.clear()
    model(**inputs)
    step = dict(counter) if mode != "sync" else sync
    partition = model._distrifusion_state.partition
    return dict(
        cfg_groups=partition.cfg_groups,
        largest_strip_rows=max(partition.rows),
        sync_step_bytes=sync.get("bytes", 0),
        step_bytes=step.get("bytes", 0),
        # What a step waits for, and what runs behind it: the planner's link model needs both.
        **{f"step_{k}": step.get(k, 0) for k in ("blocking_bytes", "blocking_calls", "async_bytes", "async_calls")},
    )
