"""The engine among diffusers' model hooks (`diffusers.hooks`) and other wrappers of a module's forward.

diffusers' hooks (layerwise casting, group offloading, the caches, layer skipping) wrap a module's
`forward`: a `HookRegistry` on the module replaces it with a chain that runs each hook's pre- and
post-forward around the module's own computation. Three consequences for the engine:

- Its layers (halo convs, whole-image GroupNorm, FreeU's filter, the split model forward) are the
  module's own computation, so they go *beneath* the hooks (`set_inner_forward`), whichever came first:
  a hook that casts or onloads the weights has done so when the layer reads them.
- Where it computes with a module's weights itself instead of calling the module (attention's fused
  key/value projection), it does so only when nothing stands between the weights and their use: no
  hook (diffusers' or accelerate's) anywhere in the model, plain floating parameters (not a quantised
  tensor subclass, not float8 storage, not on the meta device) — `weights_direct`. Otherwise it calls
  the modules, as the model would.
- A cache hook that decides from the data a rank sees (whether to skip the remaining blocks, from this rank's
  strip) would decide differently on different ranks: their collectives would then not match (an error in
  gloo, a hang in NCCL), and an image would be silently wrong if they happened to. `distrifusion.engine.caches`
  feeds such hooks the whole image's statistic, and refuses by name those it cannot feed. Hooks on fixed
  schedules (a step count, a timestep range) take the same decision on every rank and are kept.
"""

from __future__ import annotations

import types

from torch import nn

from .shard import is_sharded_parameter

_CONTEXT_PARALLEL = ("cp_input---", "cp_output---")
"""diffusers' own context parallelism (`enable_parallelism`): the sequence split another way."""


def hook_names(module: nn.Module) -> tuple[str, ...]:
    """The names of the diffusers hooks registered on `module` (not its children), in registration order."""
    registry = module.__dict__.get("_diffusers_hook")
    return tuple(getattr(registry, "_hook_order", ()))


def refuse_hooks(model: nn.Module) -> None:
    """Raise a ValueError naming the first hook of `model` the engine cannot run under (module docstring):
    diffusers' context parallelism, accelerate's offloading hooks (caches: `distrifusion.engine.caches`).
    Cheap enough to run before each image (one pass over the modules)."""
    for name, module in model.named_modules():
        where = f"on {name!r}" if name else "on the model"
        if hasattr(module, "_hf_hook"):
            raise ValueError(
                f"distrifusion: an accelerate hook {where} (enable_model_cpu_offload, enable_sequential_cpu_offload "
                "or a device_map) moves weights around the engine's layers; not supported: give each rank the "
                "whole model on its device, use diffusers' group offloading (enable_group_offload), or spread a "
                "model too large for one device over the ranks with ParallelConfig(shard_weights=True)"
            )
        for hook in hook_names(module):
            if hook.startswith(_CONTEXT_PARALLEL):
                raise ValueError(
                    f"distrifusion: diffusers' context parallelism (hook {hook!r} {where}) splits the same tokens "
                    "another way; use it or distrifusion, not both"
                )


def plain_parameters(module: nn.Module) -> bool:
    """Whether the module's own parameters are ordinary tensors the engine may compute with as the module
    would: `nn.Parameter`s (not a quantised tensor subclass such as torchao's, bitsandbytes' or GGUF's), not
    on the meta device. Their dtype may be a storage dtype that a hook casts (see `weights_direct`). The
    engine's own FSDP2 shards count as plain: they are whole, plain tensors whenever the module runs."""
    return all(
        p is None or is_sharded_parameter(p) or (type(p) is nn.Parameter and not p.is_meta)
        for p in module._parameters.values()
    )


def weights_direct(model: nn.Module) -> bool:
    """Whether the engine may read the model's weights itself, bypassing the modules that hold them: no
    diffusers or accelerate hook on any module (one may cast weights from a storage dtype or onload them),
    and plain floating parameters of at least 16 bits everywhere (not quantised, not float8). Plain torch
    forward hooks (timers, progress) are taken to leave the weights alone."""
    for module in model.modules():
        if hook_names(module) or hasattr(module, "_hf_hook"):
            return False
        weights = [p for p in module._parameters.values() if p is not None]
        if not plain_parameters(module) or any(not p.is_floating_point() or p.element_size() < 2 for p in weights):
            return False
    return True


def _innermost(module: nn.Module):
    """The diffusers hook function reference that calls the module's own computation, or None (no hook)."""
    refs = getattr(module.__dict__.get("_diffusers_hook"), "_fn_refs", None)
    return refs[0] if refs else None


def inner_forward(module: nn.Module):
    """What computes the module's forward beneath its diffusers hooks, when it is not the class's own
    forward (e.g. an engine layer); else None."""
    ref = _innermost(module)
    if ref is None:
        return module.__dict__.get("forward")
    forward = ref.forward if ref.original_forward is None else ref.original_forward
    own = getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module
    return None if own else forward


def set_inner_forward(module: nn.Module, layer) -> None:
    """Make `layer` the module's own computation, beneath any diffusers hooks it has (None: the class's forward
    again). A hook registered later wraps it as it would the module's forward."""
    ref = _innermost(module)
    if ref is None:
        if layer is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = layer
        return
    forward = types.MethodType(type(module).forward, module) if layer is None else layer
    if ref.original_forward is None:
        ref.forward = forward
    else:
        ref.original_forward = forward
