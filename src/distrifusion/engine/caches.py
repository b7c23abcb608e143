"""diffusers' step caches on a parallelised model: every rank takes the decision one process would take.

A step cache skips work in some denoising calls: the remaining transformer blocks (first-block cache,
MagCache, SeaCache), attention outputs (pyramid attention broadcast, FasterCache, TaylorSeer). Each rank runs
the cache's hooks on its own strip. Where the decision depends on a fixed schedule (a call count, a
timestep range, MagCache's given ratios, TaylorSeer's interval) every rank takes it alike and nothing is
needed. Where it depends on the data, the statistic must be the one the hook would compute on the whole
image, or ranks decide differently (their collectives then mismatch: an error in gloo, a hang in NCCL; or
an image of strips computed at different steps):

- **first-block cache** (`FirstBlockCacheConfig`): the head block hook compares the mean absolute change of
  the first block's residual with the mean absolute previous residual, on the rank's strip
  (`FBCHeadBlockHook._should_compute_remaining_blocks`, a rank-local `.item()`). Fed here: that method is
  replaced on the hook instance by `WholeImageFirstBlock`, which sums |change|, |previous| and their count
  on the strip, all-gathers the three numbers over all ranks (the patch ranks, and the CFG groups, whose
  halves of the batch one process's statistic also spans), and compares the whole image's ratio, in the
  model's dtype as diffusers does, with the hook's threshold. diffusers' hook keeps its state and does
  everything else (the cached residuals are each rank's own strip's).
- **MagCache calibration** (`MagCacheConfig(calibrate=True)`): never skips, but the ratios it records (mean
  over tokens of |residual| / |previous residual|) would be one strip's; the tail hook's
  `_perform_calibration_step` is fed the whole image's mean the same way. MagCache with given `mag_ratios`
  decides from them alone.
- **SeaCache** (`SeaCacheConfig`): decides in its root hook from the model's *inputs* (its
  `raw_vision_callback`), and its root hook wraps the model's forward above the engine's split, so every
  rank computes the indicator from the same full latent: the same decision, as in one process, with no
  collective. Its block hooks apply each strip's own cached residual.

A hook of those kinds that cannot be fed so (a subclass that decides in its own way, a diffusers version
whose hooks are laid out otherwise) is refused by name on every rank before any collective
(`refuse_caches`). FasterCache's attention hooks compare the batch they see with the first call's: with the
CFG batch split over two rank groups each rank sees half of it, so FasterCache is refused with `split_cfg`.

The statistic's all-gather is one more blocking collective per cached call (after the first block): three
float64 numbers per rank. In a displaced step it is the one blocking collective besides the output gather.
It cannot ride an existing exchange: the decision is needed before the second block runs, and the only
exchanges between the first block's output and the second block are the second block's own, which in a
displaced step return the previous step's payloads by design. `cache_cost` counts its calls and bytes.

Under the displaced mode a skipped call exchanges nothing for the layers it skips: their exchange buffers
keep the context of the last call that computed them, so the next computed call reads context that is
older by the skipped calls (see README, "Step caches"). Warm-up calls are synchronous and may be cached as
in one process, so that displaced mode whose warm-up covers every step equals one process with the cache.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .hooks import hook_names

_FBC_HEAD = "fbc_leader_block_hook"
_FBC_BLOCK = "fbc_block_hook"
_MAG_BLOCK = "mag_cache_block_hook"
_MAG_HEAD = "mag_cache_leader_block_hook"
_SEA_ROOT = "sea_cache_root"
_SEA_HOOKS = ("sea_cache_root", "sea_cache_leader_block", "sea_cache_block", "sea_cache_post_norm")
_FASTER = ("faster_cache_denoiser", "faster_cache_block")
STATEFUL_CACHE_HOOKS = (
    _FBC_HEAD,
    _FBC_BLOCK,
    _MAG_HEAD,
    _MAG_BLOCK,
    *_SEA_HOOKS,
    *_FASTER,
    "pyramid_attention_broadcast",
    "taylorseer_cache",
)
"""diffusers' cache hooks (registry names, diffusers 0.41-0.42): hooks that keep Python state from call to call."""
_NAMES = {
    _FBC_HEAD: "first-block cache (FirstBlockCacheConfig)",
    _MAG_BLOCK: "MagCache calibration (MagCacheConfig(calibrate=True))",
    **dict.fromkeys(_SEA_HOOKS, "SeaCache (SeaCacheConfig)"),
    **dict.fromkeys(_FASTER, "FasterCache (FasterCacheConfig)"),
}


def _registry_hooks(module: nn.Module) -> dict:
    registry = module.__dict__.get("_diffusers_hook")
    return getattr(registry, "hooks", {}) if registry is not None else {}


class _Fed:
    """A hook method replaced on one hook instance by a whole-image version (marks the hook as agreeing)."""

    method = ""
    """The name of the hook's method this replaces."""

    def __init__(self, hook, state) -> None:
        self.hook = hook
        self.original = getattr(type(hook), self.method).__get__(hook)
        self._state = weakref.ref(state)
        self.calls = 0
        """Collectives this hook issued (each: 3 float64 numbers per rank, all-gathered over all ranks)."""
        self.displaced_calls = 0
        """Of those, how many ran in displaced steps (where they are the step's one extra blocking collective)."""
        self.bytes_received = 0
        """Bytes this rank received from the others in those collectives."""

    def whole(self, *values: torch.Tensor) -> torch.Tensor | None:
        """The sums of `values` (float64 scalars) over every rank that computes a part of this call, or None
        when this call is not split (one rank, or every rank computing it whole)."""
        state = self._state()
        if state is None or state.runtime.world_size == 1 or state.partition is None:
            return None
        world = state.runtime.world
        gathered = world.all_gather(torch.stack(values)).wait()
        self.calls += 1
        self.displaced_calls += not state.sync_step
        self.bytes_received += (world.size - 1) * len(values) * 8
        return gathered.sum(0)  # in rank order, the same on every rank


class WholeImageFirstBlock(_Fed):
    """`FBCHeadBlockHook._should_compute_remaining_blocks` from the whole image's residuals (module docstring)."""

    method = "_should_compute_remaining_blocks"

    def __init__(self, hook, state) -> None:
        super().__init__(hook, state)
        self.decisions: list[bool] = []
        """Per call that had a previous residual: whether the remaining blocks were computed."""

    @torch.compiler.disable
    def __call__(self, residual: torch.Tensor) -> bool:
        previous = self.hook.state_manager.get_state().head_block_residual
        if previous is None:  # diffusers' own first-call rule (no collective: every rank has none)
            return self.original(residual)
        sums = self.whole(
            (residual - previous).abs().sum(dtype=torch.float64),
            previous.abs().sum(dtype=torch.float64),
            torch.tensor(float(previous.numel()), dtype=torch.float64, device=previous.device),
        )
        if sums is None:
            decision = self.original(residual)
        else:
            change, size, count = sums.tolist()
            # As diffusers: both means in the residual's dtype, their ratio in it too.
            means = torch.tensor([change / count, size / count], dtype=residual.dtype)
            decision = (means[0] / means[1]).item() > self.hook.threshold
        self.decisions.append(decision)
        return decision


class WholeImageCalibration(_Fed):
    """`MagCacheBlockHook._perform_calibration_step` recording the whole image's ratio (module docstring)."""

    method = "_perform_calibration_step"

    @torch.compiler.disable
    def __call__(self, mag_state, residual: torch.Tensor) -> None:
        previous = mag_state.previous_residual
        if previous is None:
            return self.original(mag_state, residual)
        # diffusers: mean over tokens of norm(current) / (norm(previous) + 1e-8), norms over channels in float32.
        ratios = torch.linalg.norm(residual.float(), dim=-1) / (torch.linalg.norm(previous.float(), dim=-1) + 1e-8)
        sums = self.whole(
            ratios.sum(dtype=torch.float64),
            torch.tensor(float(ratios.numel()), dtype=torch.float64, device=ratios.device),
        )
        if sums is None:
            return self.original(mag_state, residual)
        mag_state.calibration_ratios.append(sums[0].item() / sums[1].item())
        return None


def _feedable(hook, name: str, model: nn.Module, module: nn.Module) -> type[_Fed] | bool | None:
    """How a cache hook is made to agree: a `_Fed` class to install, True (it agrees as it is), or None (it
    cannot be made to agree: refused). Only diffusers' own classes, whose decisions go through the methods fed
    here (a subclass may decide in its own way)."""
    if name == _FBC_HEAD:
        from diffusers.hooks.first_block_cache import FBCHeadBlockHook

        known = (
            type(hook) is FBCHeadBlockHook
            and callable(getattr(FBCHeadBlockHook, "_should_compute_remaining_blocks", None))
            and hasattr(hook, "threshold")
        )
        return WholeImageFirstBlock if known else None
    if name == _MAG_BLOCK:
        config = getattr(hook, "config", None)
        if not getattr(config, "calibrate", False):
            return True  # given ratios: a fixed schedule
        from diffusers.hooks.mag_cache import MagCacheBlockHook

        calibrates = callable(getattr(MagCacheBlockHook, "_perform_calibration_step", None))
        known = type(hook) is MagCacheBlockHook and calibrates
        return WholeImageCalibration if known else None
    if name == _SEA_ROOT:
        # Decides from the inputs of the call it wraps: the whole model's, above the split, identical on every
        # rank. Cosmos 3's variant decides inside its decoder stack instead (not a family the engine splits).
        from diffusers.hooks.sea_cache import SeaCacheRootHook

        return True if type(hook) is SeaCacheRootHook and module is model and not hook.use_stack_boundary else None
    if name in _SEA_HOOKS:
        return True  # decide from the root hook's gate (checked above)
    return True


def bind_caches(model: nn.Module, state) -> None:
    """Make the model's data-dependent cache hooks decide from the whole image (module docstring); idempotent.
    Hooks that cannot be fed are left alone, for `refuse_caches` to refuse."""
    for module in model.modules():
        hooks = _registry_hooks(module)
        for name in hook_names(module):
            hook = hooks.get(name)
            if hook is None or isinstance(getattr(hook, "_distrifusion_fed", None), _Fed):
                continue
            fed = _feedable(hook, name, model, module)
            if isinstance(fed, type):
                hook._distrifusion_fed = fed(hook, state)
                setattr(hook, fed.method, hook._distrifusion_fed)


def unbind_caches(model: nn.Module) -> None:
    """Give the cache hooks their own methods back (`remove`)."""
    for module in model.modules():
        for hook in _registry_hooks(module).values():
            fed = hook.__dict__.pop("_distrifusion_fed", None)
            if isinstance(fed, _Fed):
                hook.__dict__.pop(fed.method, None)


def refuse_caches(model: nn.Module, split_cfg: bool = False) -> None:
    """Raise a ValueError naming the first cache hook of `model` that ranks could not agree on: a data-dependent
    one that cannot be fed the whole image's statistic (see `bind_caches`), or FasterCache when the CFG batch may
    be split over two rank groups (`split_cfg`)."""
    for path, module in model.named_modules():
        where = f"on {path!r}" if path else "on the model"
        hooks = _registry_hooks(module)
        for name in hook_names(module):
            hook = hooks.get(name)
            if name in _FASTER and split_cfg:
                raise ValueError(
                    f"distrifusion: diffusers' FasterCache (hook {name!r} {where}) tells the CFG halves apart by the "
                    "batch each attention sees, which the CFG split halves on every rank; use "
                    "ParallelConfig(split_cfg=False) (--no-split-cfg) with it, or another cache"
                )
            if name in _NAMES and hook is not None and _feedable(hook, name, model, module) is None:
                raise ValueError(
                    f"distrifusion: diffusers' {_NAMES[name]} (hook {name!r} {where}, {type(hook).__name__}) decides "
                    "from the values each rank sees, and distrifusion cannot feed this hook the whole image's "
                    "statistic (it knows diffusers' own hooks of versions 0.41-0.42), so ranks that see different "
                    "strips would decide differently; not supported on a parallelised model: model.disable_cache(), "
                    "or use diffusers' own hook class"
                )


def stateful_caches(model: nn.Module) -> bool:
    """Whether any module of `model` has a diffusers cache hook: one that keeps Python state from call to call and
    decides in Python, which a replayed CUDA graph would not run."""
    return any(name in STATEFUL_CACHE_HOOKS for module in model.modules() for name in hook_names(module))


def cache_cost(model: nn.Module) -> dict:
    """The agreement collectives of the model's fed cache hooks on this rank so far: {"calls", "displaced_calls",
    "bytes_received"} (see `_Fed`)."""
    total = dict(calls=0, displaced_calls=0, bytes_received=0)
    for module in model.modules():
        for hook in _registry_hooks(module).values():
            fed = hook.__dict__.get("_distrifusion_fed")
            if isinstance(fed, _Fed):
                for key in total:
                    total[key] += getattr(fed, key)
    return total


def cache_decisions(model: nn.Module) -> list[bool]:
    """Every first-block-cache decision taken from the whole image on this rank so far, in order (True: the
    remaining blocks were computed)."""
    decisions: list[bool] = []
    for module in model.modules():
        for hook in _registry_hooks(module).values():
            fed = hook.__dict__.get("_distrifusion_fed")
            if isinstance(fed, WholeImageFirstBlock):
                decisions += fed.decisions
    return decisions
