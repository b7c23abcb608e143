"""distrifusion: DistriFusion (displaced patch parallelism) for diffusers models on several GPUs.

The package in layers, each importing only the ones below it (docs/ARCHITECTURE.md; checked by
import-linter in CI): `engine` (the primitives), `models` (one adapter per family), `parallel`
(`parallelize`: a single-device model in, a patch-parallel one out), `measure` (traffic, timing,
simulated ranks, quality, the planner), `api` (the public functions), `app` (command line, server).
"""

import importlib

from .engine.config import ParallelConfig

__all__ = ["ParallelConfig", "parallelize", "remove", "reset"]
__version__ = "0.1.0"
_TORCH_API = ("parallelize", "remove", "reset")


def __getattr__(name: str):
    # `parallelize`, `remove` and `reset` import torch when first used, so that `import distrifusion`
    # (and the command line's --help) stays quick.
    if name in _TORCH_API:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_TORCH_API})
