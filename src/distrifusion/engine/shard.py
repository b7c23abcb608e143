"""Weights sharded across ranks with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Patch parallelism runs the same blocks in the same order on every rank, each on its own strip, so one
gather of a block's weights serves every strip. Each rank keeps 1/N of every block; FSDP2 gathers a
block whole just before it runs (the next block's gather is issued as the current one starts, so that
it runs behind the current block's computation) and frees it when the block returns. The gathered
weights are the original bits, so a sharded model computes exactly what the unsharded one does.

What is sharded as one unit (`shard_units`) is chosen from parameter counts alone, for any model: a
module holding more than `UNIT_FRACTION` of the weights per rank is split into its children (attention
modules never: the engine's processors read their projections together), small modules stay with their
parent. The model itself keeps the few weights no unit holds (embeddings, final norms), whole.

This module knows no model family; `parallelize` decides when to shard (`ParallelConfig.shard_weights`).
"""

from __future__ import annotations

import importlib
import logging
import zlib
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("distrifusion")

UNIT_FRACTION = 0.1
"""A module holding more than this fraction of a rank's share of the weights (the model's weights over
the shard ranks) is split into its children: the largest gathered unit, counted three times (FSDP2 in a
forward holds the running unit's parameters, its all-gather buffer and the next unit's), then stays
within 30% of the share."""

SMALL_UNIT = 1 / 8
"""Children smaller than this fraction of the unit limit stay with their parent (one gather fewer)."""


def _fsdp():
    """FSDP2's `fully_shard` in this torch, or a ValueError saying what is missing."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError as missing:
            raise ValueError(
                f"distrifusion: shard_weights needs PyTorch's FSDP2 (fully_shard), which torch {torch.__version__} "
                "does not have; use torch >= 2.6 or shard_weights=False"
            ) from missing
    return fully_shard


_SHARDED_ATTR = "_distrifusion_sharded"


def is_sharded_parameter(param) -> bool:
    """Whether `param` is one of the engine's FSDP2 shards (a DTensor that FSDP2 swaps for the whole
    parameter while its unit runs), as opposed to a DTensor or tensor subclass the user brought."""
    return bool(getattr(param, _SHARDED_ATTR, False))


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return isinstance(tensor, DTensor)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _atomic(module: nn.Module) -> bool:
    """Modules sharded whole or not at all: attention modules (the engine's processors read their
    key and value projections together, e.g. fused into one matmul)."""
    return hasattr(module, "processor")


def shard_units(model: nn.Module, parts: int) -> list[tuple[str, nn.Module]]:
    """The modules of `model` that are sharded each as one unit over `parts` ranks, children before
    their parents (the order `fully_shard` must be applied in), with their names.

    A module holding more than `UNIT_FRACTION` of the weights per rank is split: its children become
    units (recursively), and it becomes a unit for what remains directly in it. A child smaller than
    `SMALL_UNIT` of that limit stays with its parent. Modules that share a parameter with another unit
    (tied weights) are given to their parents, so that each parameter belongs to one unit."""
    total = _numel(model)
    limit = max(total * UNIT_FRACTION / max(parts, 1), 1.0)
    chosen: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if id(child) in seen:  # registered twice (e.g. a shared embedding): one unit
                continue
            seen.add(id(child))
            n = _numel(child)
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # no forward of its own: its members are
                visit(f"{prefix}{name}.", child)
            elif n > limit and not _atomic(child) and next(child.children(), None) is not None:
                visit(f"{prefix}{name}.", child)
                chosen.append((prefix + name, child))
            elif n >= limit * SMALL_UNIT:
                chosen.append((prefix + name, child))

    visit("", model)
    while True:  # a parameter owned by two units (tied weights): both go to their parents
        clash = _tied_units(model, [m for _, m in chosen])
        if not clash:
            return chosen
        chosen = [(n, m) for n, m in chosen if id(m) not in clash]


def _tied_units(model: nn.Module, units: list[nn.Module]) -> set[int]:
    """Ids of the units that own a parameter some other unit (or the model) owns too."""
    unit_ids = {id(u) for u in units}
    owners: dict[int, set[int]] = {}

    def walk(module: nn.Module, owner: int, visited: set[int]) -> None:
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(owner)
        for child in module.children():
            if id(child) in visited:
                continue
            visited.add(id(child))
            walk(child, id(child) if id(child) in unit_ids else owner, visited)

    walk(model, id(model), set())
    return {o for found in owners.values() if len(found) > 1 for o in found if o in unit_ids}


def check_shardable(model: nn.Module, what: str = "model") -> None:
    """Refuse, with one line naming the parameter and the fix, weights FSDP2 cannot shard: weights
    already sharded (DTensors), on the meta device, of a tensor subclass (quantized weights), or not
    contiguous. The same on every rank, before any collective."""
    for name, p in model.named_parameters():
        problem = None
        if _is_dtensor(p):
            problem = "is already sharded (a DTensor: FSDP or tensor parallelism applied before parallelize)"
        elif p.device.type == "meta":
            problem = "is on the meta device (load the weights first)"
        elif type(p.data) is not torch.Tensor:
            problem = f"is a {type(p.data).__name__} (quantized or wrapped weights cannot be sharded yet)"
        elif not p.is_contiguous():
            problem = "is not contiguous (FSDP2 shards contiguous tensors only; call .contiguous() on it)"
        if problem:
            raise ValueError(f"distrifusion: cannot shard {what} weights: parameter {name!r} {problem}")


class Sharding:
    """One model's weights sharded over a process group; `gather_whole` gives them back.

    Construction is collective over `group` (FSDP2 gathers nothing then, but the group must exist on
    every member). The first call of the model records the order in which the units run; from then on
    each unit prefetches the next one's gather as it starts (asynchronously: it runs behind the current
    unit's computation, on CPU/gloo as on CUDA/nccl)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup, device: torch.device) -> None:
        from torch.distributed.device_mesh import DeviceMesh

        fully_shard = _fsdp()
        self.model, self.group, self.device = model, group, device
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        mesh = DeviceMesh.from_group(group, device.type)
        self.units = [m for _, m in shard_units(model, group.size())]
        for unit in self.units:
            _freeze_if_mixed(unit)
            scalars = {p for p in unit.parameters() if p.dim() == 0}  # FSDP2 shards along dim 0: kept whole
            _keeping_class(fully_shard, unit, mesh=mesh, reshard_after_forward=True, ignored_params=scalars or None)
        # The model as FSDP2's root (one state for all units), holding no sharded weight of its own: the
        # weights outside every unit stay whole, so no gather runs before the engine validates a call.
        whole = {p for p in model.parameters() if not _is_dtensor(p)}
        for p in model.parameters():
            if _is_dtensor(p):
                setattr(p, _SHARDED_ATTR, True)  # the engine's layers may take these (whole when they run)
        _keeping_class(fully_shard, model, mesh=mesh, reshard_after_forward=True, ignored_params=whole)
        _move_whole(model, device)
        self.states = {id(m): _state(m) for m in [*self.units, model]}
        for state in self.states.values():
            for param_group in state._fsdp_param_groups:
                param_group.unshard_async_op = True  # the prefetched gather runs behind the current unit
        self.order: list[nn.Module] = []
        self._recording = [u.register_forward_pre_hook(partial(self._ran, u)) for u in self.units]
        self._recording.append(model.register_forward_pre_hook(lambda *_: self.order.clear()))
        self._recording.append(model.register_forward_hook(lambda *_: self._chain()))

    @property
    def gathered_bytes(self) -> int:
        """Bytes of the largest unit: what one gather brings in."""
        return max((_bytes(u) for u in self.units), default=0)

    def _ran(self, unit: nn.Module, *_) -> None:
        self.order.append(unit)

    def _chain(self) -> None:
        """After the first complete call: each unit prefetches the one that ran after it. Every member
        must chain alike (a prefetch is a collective): their orders are compared first."""
        for handle in self._recording:
            handle.remove()
        self._recording = []
        index = {id(u): i for i, u in enumerate(self.units)}
        signature = torch.tensor([float(zlib.crc32(repr([index[id(u)] for u in self.order]).encode()))])
        signatures = [torch.zeros_like(signature) for _ in range(self.group.size())]
        dist.all_gather(signatures, signature, group=self.group)
        if len({s.item() for s in signatures}) > 1:
            log.warning("distrifusion: the ranks ran the sharded blocks in different orders; no prefetching")
            return
        for unit, following in zip(self.order, self.order[1:]):
            if following is not unit:  # what FSDPModule.set_modules_to_forward_prefetch sets
                self.states[id(unit)]._states_to_forward_prefetch = [self.states[id(following)]]

    def recover(self) -> None:
        """After a call that raised midway: every unit sharded again, no gather left pending."""
        root = self.states[id(self.model)]
        if root._is_root and hasattr(root, "_reset_iter_state"):  # FSDPModule.reset_iter_state (torch >= 2.13)
            root._reset_iter_state()
        for state in self.states.values():
            for param_group in state._fsdp_param_groups:
                param_group.reshard()

    def gather_whole(self) -> None:
        """Give the model back whole: every weight a plain tensor again (gathered over the group: every
        member must call this), FSDP2's hooks, states and classes gone, the gradient flags restored."""
        self.recover()
        whole: dict[tuple[int, str], torch.Tensor] = {}
        for module in self.model.modules():
            for name, p in module._parameters.items():
                if p is not None and _is_dtensor(p):
                    whole[id(module), name] = p.full_tensor()  # same order on every member: a collective each
        for module in [*self.units, self.model]:
            _strip_fsdp(module)
        for module in self.model.modules():
            for name in list(module._parameters):
                if (id(module), name) in whole:
                    module._parameters[name] = nn.Parameter(whole[id(module), name], requires_grad=False)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad.get(name, False))
        for handle in self._recording:
            handle.remove()
        self._recording = []


def _freeze_if_mixed(unit: nn.Module) -> None:
    """FSDP2 requires one dtype among a unit's trainable weights (for its gradients); a unit mixing
    dtypes (float32 norms kept beside bfloat16 linears) has its own weights made untrainable, as
    inference needs no gradient. Elsewhere the flags stay: they choose torch's matmul path (whether a
    batched product is folded into one), so changing them could change the last bits of the result."""
    own = [p for p in _own_parameters(unit) if p.requires_grad]
    if len({p.dtype for p in own}) > 1:
        for p in own:
            p.requires_grad_(False)


def _own_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The weights a unit shards: its own and its descendants', but not those of units nested in it."""
    found, stack = [], [unit]
    while stack:
        module = stack.pop()
        found.extend(p for p in module.parameters(recurse=False))
        stack.extend(c for c in module.children() if _state(c) is None)
    return found


def _bytes(module: nn.Module) -> int:
    """Bytes of a module's weights, whole (a sharded weight counts its global shape)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _move_whole(model: nn.Module, device: torch.device) -> None:
    """Move the weights no unit shards, and every buffer, to `device` (FSDP2 moves only what it shards)."""
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and not _is_dtensor(p) and p.device != device:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)


def _keeping_class(fully_shard, module: nn.Module, **kwargs) -> None:
    """`fully_shard(module)`, the module's own class put back after it. FSDP2 slips a class of its own
    (FSDP<name>) under the module for its convenience methods; but transformers finds what to record
    (the hidden states a pipeline asks for) by the class's name, and diffusers and the engine's checks
    read class names. FSDP2 itself works through the hooks and the state it registers, which the class
    does not hold; this module reaches the state directly (`_state`)."""
    cls = type(module)
    fully_shard(module, **kwargs)
    module.__class__ = cls


def _state(module: nn.Module):
    """FSDP2's state of a module given to `fully_shard` (None for any other)."""
    from torch.distributed._composable_state import _get_module_state

    return _get_module_state(module)


def _strip_fsdp(module: nn.Module) -> None:
    """Undo `fully_shard` on one module (its parameters aside): its hooks and its state. FSDP2 has no
    public inverse; these are the pieces `fully_shard` adds in torch 2.4 to 2.13."""
    from torch.distributed._composable_state import _module_state_mapping

    # The module, not the `contract` function its package exports under the same name.
    contract = importlib.import_module("torch.distributed._composable.contract")
    state = _state(module)
    for handle in {state._pre_forward_hook_handle, state._post_forward_hook_handle}:
        handle.remove()
    for param_group in state._fsdp_param_groups:
        for hooks in ("_module_to_pre_save_state_dict_hook_handle", "_module_to_pre_load_state_dict_hook_handle"):
            for handle in getattr(param_group, hooks, {}).values():
                handle.remove()
    for managed in module.modules():
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            managed.__dict__.pop(attr, None)
    _module_state_mapping.pop(module, None)
    module.__dict__.pop(contract.STATE_KEY, None)
    module.__dict__.pop(contract.REGISTRY_KEY, None)
