"""Timers and memory gauges: the median of timed calls (synchronised on CUDA), peak memory, and the
host-side timers of `distrifusion generate`'s report (seconds waiting in collectives, per pipeline phase)."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from pathlib import Path

import torch


class TimedCommunicator:
    """Counts the seconds this rank spends in (or waiting for) its collectives: the exchange's cost
    that the computation did not hide. Host-side timing: meaningful where collectives block the host
    (gloo on CPU), not for NCCL's asynchronous stream waits."""

    def __init__(self, inner, clock: list[float]) -> None:
        self.inner, self.clock = inner, clock
        self.rank, self.size = inner.rank, inner.size
        self.capturable = getattr(inner, "capturable", False)

    def _timed(self, fn, tensor, async_op):
        start = time.perf_counter()
        pending = fn(tensor, async_op)
        self.clock[0] += time.perf_counter() - start
        return TimedWait(pending, self.clock)

    def all_gather(self, tensor, async_op: bool = False):
        return self._timed(self.inner.all_gather, tensor, async_op)

    def all_gather_inplace(self, buffer, async_op: bool = False):
        return self._timed(self.inner.all_gather_inplace, buffer, async_op)


class TimedWait:
    def __init__(self, pending, clock: list[float]) -> None:
        self.pending, self.clock = pending, clock

    def wait(self):
        start = time.perf_counter()
        out = self.pending.wait()
        self.clock[0] += time.perf_counter() - start
        return out


def time_phase(obj, attr: str, times: dict, phase: str, device: torch.device | None = None) -> None:
    """Add the seconds of every call of `obj.attr` to `times[phase]`. With a CUDA `device` the device is
    synchronised before and after each call, so that the phase holds its own GPU work, not the work queued
    before it nor only the launch of its own (a text encoder or a VAE decode runs once per image: two
    synchronisations cost nothing measurable)."""
    original = getattr(obj, attr)

    def timed(*args, **kwargs):
        if device is not None:
            sync_device(device)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if device is not None:
                sync_device(device)
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - start

    setattr(obj, attr, timed)


class DeviceSpan:
    """The seconds from the start of the first of a series of calls to the end of the last, on the
    device's own timeline: on CUDA two events recorded in the current stream (`start` at the first call,
    `stop` after every call: the last one counts), read once at the end, so no call waits for the device;
    elsewhere the host clock. However many calls a step makes (a pipeline may call its denoiser twice per
    step), the span ends where the last call's work ends."""

    def __init__(self, device: torch.device, mark=None) -> None:
        self.cuda = device.type == "cuda"
        self.mark = mark or (_cuda_mark if self.cuda else time.perf_counter)
        self.first = self.last = None
        self.calls = 0

    def start(self) -> None:
        """Marks the start (the first time only)."""
        if self.first is None:
            self.first = self.mark()

    def stop(self) -> None:
        """Marks the end of a call: the latest mark is the span's end."""
        self.last = self.mark()
        self.calls += 1

    def seconds(self) -> float | None:
        """The span, None before a call ended (on CUDA, waits for the last call's work)."""
        if self.first is None or self.last is None:
            return None
        if self.cuda:
            self.last.synchronize()
            return self.first.elapsed_time(self.last) / 1e3
        return self.last - self.first


def _cuda_mark():
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        sync_device(device)
        start = time.perf_counter()
        fn()
        sync_device(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_cached_memory(device: torch.device) -> None:
    """Hand freed graph pools and cached blocks back between measurements (3840² needs the room)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement (CUDA allocator; on Linux also this process's VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the resident-set high-water mark (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # the high-water mark of this process image (ru_maxrss would carry the launcher's over exec)
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: the CUDA allocator's, or this process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def return_freed_memory() -> None:
    """Make glibc map every allocation over 128 KiB on its own and unmap it when freed, so that this
    process's resident set (what VmHWM measures on a CPU) follows the tensors alive, measurement
    after measurement, instead of keeping the previous one's freed memory."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
