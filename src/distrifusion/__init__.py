"""distrifusion: DistriFusion (displaced patch parallelism) for diffusers models on several GPUs."""

import importlib
import sys
import types

from .config import ParallelConfig

__all__ = ["ParallelConfig", "parallelize", "remove", "reset"]
__version__ = "0.1.0"
_TORCH_API = ("parallelize", "remove", "reset")


class _Package(types.ModuleType):
    """`parallelize`, `remove` and `reset` import torch when first used, so that `import distrifusion`
    (and the command line's --help) stays quick. The names mean what they always did: the functions."""

    def __getattr__(self, name: str):
        if name in _TORCH_API:
            return getattr(importlib.import_module(".parallelize", __name__), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule binds it to the package: `distrifusion.parallelize` stays the function.
        if name == "parallelize" and isinstance(value, types.ModuleType):
            value = value.parallelize
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted({*super().__dir__(), *_TORCH_API})


sys.modules[__name__].__class__ = _Package
