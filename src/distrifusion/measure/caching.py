"""Step caches by name, for the commands (`--cache fbcache:0.1`), and how many calls a cache let compute.

`parse_cache` is torch-free (the commands check their input before importing torch); `enable_cache` puts
diffusers' own hook on a model, before or after `parallelize` (the engine makes ranks agree on its decisions,
see `distrifusion.engine.caches`); `ComputedCalls` counts the calls in which the model's last transformer
block ran, which is what a block-skipping cache saves.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

CACHE_KINDS = {
    "fbcache": "first-block cache: skip the remaining blocks while the first block's residual changes by less "
    "than THRESHOLD (relative, e.g. 0.05-0.2)",
    "taylorseer": "TaylorSeer: attention outputs computed every INTERVAL calls, predicted in between (first 3 "
    "calls computed)",
    "pab": "pyramid attention broadcast: attention outputs computed every INTERVAL calls, reused in between",
}
"""The caches `--cache KIND:VALUE` names, and what VALUE is."""
TRANSFORMER_ONLY = ("fbcache", "taylorseer")
"""Caches that need a transformer's block list (diffusers finds none in a UNet)."""


@dataclass(frozen=True)
class CacheSpec:
    kind: str
    value: float

    def __str__(self) -> str:
        value = int(self.value) if self.kind != "fbcache" else self.value
        return f"{self.kind}:{value}"


def cache_help() -> str:
    return "; ".join(f"{kind}:{'THRESHOLD' if kind == 'fbcache' else 'INTERVAL'}" for kind in CACHE_KINDS)


def parse_cache(text: str) -> CacheSpec:
    """`KIND:VALUE` (see `CACHE_KINDS`) as a CacheSpec; a ValueError names what is wrong and what is accepted."""
    kind, _, value = text.partition(":")
    if kind not in CACHE_KINDS:
        raise ValueError(f"--cache {text!r}: unknown cache {kind!r}; use one of: {cache_help()}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"--cache {text!r}: {kind} needs a number after the colon ({cache_help()})") from None
    if kind == "fbcache":
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"--cache {text!r}: the threshold must be a positive number, e.g. fbcache:0.1")
    elif not (number.is_integer() and number >= 2):
        raise ValueError(f"--cache {text!r}: the interval must be a whole number of calls >= 2, e.g. {kind}:2")
    return CacheSpec(kind, number)


def cache_config(spec: CacheSpec, dtype=None):
    """The diffusers config of a cache spec (imports diffusers)."""
    import torch
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    if spec.kind == "fbcache":
        return FirstBlockCacheConfig(threshold=spec.value)
    if spec.kind == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=int(spec.value), disable_cache_before_step=3, taylor_factors_dtype=dtype or torch.float32
        )
    # Every call in range: the interval alone decides (no timestep the pipeline would have to report).
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(spec.value),
        spatial_attention_timestep_skip_range=(-1, 1),
        current_timestep_callback=lambda: 0,
    )


def enable_cache(model, spec: CacheSpec) -> None:
    """Put diffusers' hook for `spec` on the denoiser `model` (with `enable_cache` where the model has it, else
    diffusers' `apply_*`). A ValueError names a cache that does not apply to the model."""
    from diffusers.hooks import apply_first_block_cache, apply_pyramid_attention_broadcast, apply_taylorseer_cache
    from diffusers.hooks.hooks import HookRegistry

    if spec.kind in TRANSFORMER_ONLY and not _block_lists(model):
        raise ValueError(
            f"distrifusion: --cache {spec.kind} needs a transformer's list of blocks, which "
            f"{type(model).__name__} has not (diffusers applies it to transformers only); use --cache pab:N, "
            "or a transformer model (e.g. --model embedded-dit)"
        )
    if spec.kind == "fbcache" and getattr(_block_lists(model)[-1][-1], "context_pre_only", False):
        raise ValueError(
            f"distrifusion: --cache fbcache does not run on {type(model).__name__}: its last block returns no text "
            "stream (context_pre_only), which diffusers' first-block cache subtracts (diffusers 0.41-0.42, also in "
            "one process); use --cache pab:N or taylorseer:N"
        )
    config = cache_config(spec, next(model.parameters()).dtype)
    if hasattr(model, "enable_cache"):
        model.enable_cache(config)
        return
    apply = {"fbcache": apply_first_block_cache, "taylorseer": apply_taylorseer_cache}
    apply.get(spec.kind, apply_pyramid_attention_broadcast)(model, config)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()


def _block_lists(model) -> list:
    """The model's block lists as diffusers' caches find them (direct children under the usual names)."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    from torch import nn

    return [
        child
        for name, child in model.named_children()
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, nn.ModuleList) and len(child)
    ]


@contextlib.contextmanager
def cache_context(model, name: str, **where):
    """`model.cache_context(name, **where)` (what diffusers' pipelines enter around a denoiser call, for its cache
    hooks), also for a model without diffusers' CacheMixin (a UNet2DModel): its hooks get the context alike."""
    if hasattr(model, "cache_context"):
        with model.cache_context(name, **where):
            yield
        return
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext(name, **where))
    try:
        yield
    finally:
        _set_cache_context(model, None)


def reset_cache(model) -> None:
    """Start every cache hook of `model` afresh (a pipeline that does not do so itself, before each image)."""
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks()


class ComputedCalls:
    """Counts the model's calls and those in which its last transformer block (or, for a UNet, its last up
    block) ran its own computation: with a block-skipping cache, the calls it computed in full."""

    def __init__(self, model) -> None:
        lists = _block_lists(model) or [getattr(model, "up_blocks", [])]
        last = lists[-1][-1]
        # Called only when the block computes (a cache returns before it); a UNet block's lists are not called.
        inner = last.resnets[0] if hasattr(last, "resnets") else next(last.children())
        self.calls = self.computed = 0
        self._hooks = [
            model.register_forward_pre_hook(lambda *_: self._count("calls")),
            inner.register_forward_pre_hook(lambda *_: self._count("computed")),
        ]
        self._seen = False

    def _count(self, what: str) -> None:
        if what == "calls":
            self.calls += 1
            self._seen = False
        elif not self._seen:  # a block's first child runs once per call
            self.computed += 1
            self._seen = True

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
