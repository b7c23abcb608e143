"""Host-side timers for `distrifusion generate`'s report: seconds spent waiting in collectives, and
seconds per pipeline phase (text encoding, VAE decoding)."""

from __future__ import annotations

import time


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


def time_phase(obj, attr: str, times: dict, phase: str) -> None:
    """Add the seconds of every call of `obj.attr` to `times[phase]`."""
    original = getattr(obj, attr)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - start

    setattr(obj, attr, timed)
