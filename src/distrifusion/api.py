"""The public functions: `parallelize` (with `mode="auto"` planned by the planner), `remove`, `reset`.

The engine's own `parallelize` (in `distrifusion.parallel`) knows nothing of the tools; this module,
above both, hands it the planner's `resolve_auto`.
"""

from __future__ import annotations

from .engine.comm import Runtime
from .engine.config import ParallelConfig
from .measure.planner import resolve_auto
from .parallel.parallelize import parallelize as _parallelize
from .parallel.parallelize import remove, reset

__all__ = ["parallelize", "remove", "reset"]


def parallelize(pipe_or_model, config: ParallelConfig | None = None, *, runtime: Runtime | None = None):
    return _parallelize(pipe_or_model, config, runtime=runtime, resolve_auto=resolve_auto)


parallelize.__doc__ = _parallelize.__doc__
