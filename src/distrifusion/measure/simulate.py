"""Several ranks in one process, for measuring and for quality studies without N devices.

- `simulate_ranks(n, fn)` runs `fn(runtime)` on n threads, each a rank whose collectives go
  through shared memory (`ThreadCommunicator`). The layers, buffers, exchanges and their order
  are exactly those of real processes; asynchronous gathers simply complete at once, which gives
  the same values because a displaced step only reads what was posted the step before.
- `loopback_runtime(n)` makes this process play one rank of n (`LoopbackCommunicator`): same
  shapes, same buffers and kernels, but every gather fills the other ranks' slots with copies of
  this rank's payload. Its numbers are meaningless; its step time is one rank's share.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from ..engine.comm import Communicator, PendingGather, Runtime, _Done, gather_through_inplace

T = TypeVar("T")


class LoopbackCommunicator:
    """Plays a group of `size` whose other members send copies of this rank's payload."""

    capturable = True  # local copies only: a CUDA graph can hold them

    def __init__(self, size: int, rank: int = 0) -> None:
        self.size, self.rank = size, rank

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False) -> PendingGather:
        return _Done(tensor.unsqueeze(0).expand(self.size, *tensor.shape).clone())

    def all_gather_inplace(self, buffer: torch.Tensor, async_op: bool = False) -> PendingGather:
        for r in range(self.size):
            if r != self.rank:
                buffer[r].copy_(buffer[self.rank])
        return _Done(buffer)


def loopback_runtime(world_size: int, rank: int = 0, device: torch.device | str = "cpu") -> Runtime:
    """A runtime in which this process is rank `rank` of `world_size` with loopback collectives."""
    world = LoopbackCommunicator(world_size, rank)
    groups: dict[int, Communicator] = {1: world}
    if world_size % 2 == 0:
        groups[2] = LoopbackCommunicator(world_size // 2, rank % (world_size // 2))
    return Runtime(rank, world_size, torch.device(device), world, groups)


class _ThreadGroup:
    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list[torch.Tensor | None] = [None] * size


class ThreadCommunicator:
    """All-gather among threads: write own slot, wait for all, read all, wait again."""

    capturable = False

    def __init__(self, group: _ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False) -> PendingGather:
        return gather_through_inplace(self, tensor, async_op)

    def all_gather_inplace(self, buffer: torch.Tensor, async_op: bool = False) -> PendingGather:
        group = self.group
        group.slots[self.rank] = buffer[self.rank]
        group.barrier.wait()
        for r, row in enumerate(group.slots):
            if r != self.rank:
                buffer[r].copy_(row)
        group.barrier.wait()  # nobody overwrites a slot before every member has read it
        return _Done(buffer)


def simulate_ranks(world_size: int, fn: Callable[[Runtime], T], device: torch.device | str = "cpu") -> list[T]:
    """Run `fn(runtime)` once per simulated rank, on `world_size` threads; return their results.

    `fn` must build or copy its own model (one per rank, as real ranks have) and parallelise it
    with `parallelize(model, config, runtime=runtime)`. If any rank raises, the others are
    released and the first exception is raised here.
    """
    world = _ThreadGroup(world_size)
    groups = [world]
    halves = []
    if world_size % 2 == 0:
        halves = [_ThreadGroup(world_size // 2) for _ in range(2)]
        groups += halves
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        comm = ThreadCommunicator(world, rank)
        patch = {1: comm}
        if halves:
            half = world_size // 2
            patch[2] = ThreadCommunicator(halves[rank // half], rank % half)
        try:
            results[rank] = fn(Runtime(rank, world_size, torch.device(device), comm, patch))
        except threading.BrokenBarrierError:
            pass  # another rank failed first
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
            for group in groups:
                group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), name=f"rank{r}") for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
