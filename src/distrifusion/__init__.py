"""distrifusion: DistriFusion (displaced patch parallelism) for diffusers models on several GPUs."""

from .config import ParallelConfig
from .parallelize import parallelize, remove, reset

__all__ = ["ParallelConfig", "parallelize", "remove", "reset"]
__version__ = "0.1.0"
