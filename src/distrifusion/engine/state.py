"""Per-model state: the split of the current call, the step counter and the exchanged context.

One `ParallelState` lives on each parallelised model. Layers hold a reference to it and ask it
two things: how the current tensor is split among the ranks (`sizes`) and what the other ranks
contributed (`exchange`). Everything that changes from step to step lives here, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .compress import make_codec
from .config import ParallelConfig
from .exchange import Exchange, tensor_version

KEPT_SIZES = 4
"""With CUDA graphs: image sizes whose exchange buffers and graphs are kept (least recently used go)."""
MAX_BRANCHES = 4
"""Guidance branches (see `ParallelState.enter_branch`) that keep their own context; beyond, the least
recently used one is taken over (its next call is synchronous)."""
_BRANCH_FIELDS = ("step", "partition", "exchange", "_exchanges", "_calls", "cross_kv", "_time")


def identity(value) -> object:
    """A hashable stand-in for a call's inputs that changes when a tensor is replaced or modified in
    place, without reading its values (no device synchronisation)."""
    if isinstance(value, torch.Tensor):
        return (value.data_ptr(), tuple(value.shape), value.dtype, tensor_version(value))
    if isinstance(value, dict):
        return tuple((k, identity(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    if isinstance(value, (list, tuple)):
        return tuple(identity(v) for v in value)
    try:
        hash(value)
        return value
    except TypeError:
        return id(value)


def same_values(a, b) -> bool:
    """Whether two calls' inputs hold equal values (tensors compared element by element)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    return a == b


def first_time(t) -> float | None:
    """A call's timestep as one number: the number, or the first entry of a tensor of it per batch entry
    (calls of one step may have different batches: SD3's skip-layer call takes only the positive half).
    None when the call has none. Reads a device tensor's value (one small copy to the host)."""
    if t is None:
        return None
    t = torch.as_tensor(t)
    return float(t.reshape(-1)[0]) if t.numel() and t.device.type != "meta" else None


def _same_time(a, b) -> bool:
    """Whether two calls' timesteps are the same moment (see `first_time`)."""
    if a is None or b is None:
        return a is b
    return first_time(a) == first_time(b)


@dataclass
class _Branch:
    """One guidance branch of the current image: what tells its calls apart, and (while another branch
    runs) its step bookkeeping and context."""

    key: object = None
    """`identity` of its conditioning in this image (None: not yet seen in this image)."""
    conditioning: object = None
    saved: dict | None = None
    """Its `_BRANCH_FIELDS` while it is not the current branch (None: it has none yet)."""
    last_used: int = 0


@dataclass(frozen=True)
class Partition:
    """How one model call's latent batch and rows are divided among the ranks."""

    batch: int
    height: int
    width: int
    cfg_groups: int
    """1, or 2 when the batch is split in halves over two rank groups."""
    cfg_index: int
    patch_rank: int
    rows: tuple[int, ...]
    """Rows (latent rows, or token rows of a transformer) of every patch rank's strip, top to bottom."""
    text: tuple[int, ...] = ()
    """Text tokens every patch rank computes, for models whose image and text tokens attend jointly:
    all of them on each rank, or a shard each (`ParallelConfig.text_tokens`)."""
    sharded_text: bool = False
    block: int = 1
    """Rows every strip is a multiple of (a UNet's downsampling, a transformer's patch size)."""
    text_mask: bool = False
    """Whether the text tokens carry a mask (Qwen-Image's `encoder_hidden_states_mask`: padded prompts of
    a batch): with sharded text every rank's share of it is exchanged beside its share of the keys."""
    extra: tuple[int, ...] = ()
    """Reference-image tokens every patch rank computes after its strip's tokens, in the image stream
    (Flux.1 Kontext, Qwen-Image-Edit, Flux.2 with reference images): tokens that condition the image
    but are not rows of it. All of them on each rank, or a share each, as the text (`sharded_text`)."""

    @property
    def patch_size(self) -> int:
        return len(self.rows)

    @property
    def row_start(self) -> int:
        return sum(self.rows[: self.patch_rank])

    @property
    def local_batch(self) -> int:
        return self.batch // self.cfg_groups

    @property
    def reference_shares(self) -> tuple[int, ...]:
        """Every patch rank's share of the reference tokens' output rows (each rank gathers its share)."""
        if not self.extra:
            return (0,) * self.patch_size
        return self.extra if self.sharded_text else split_rows(self.extra[0], 1, self.patch_size)


def split_rows(height: int, block: int, parts: int) -> tuple[int, ...]:
    """Split `height` rows into `parts` strips of whole blocks, differing by at most one block."""
    blocks = height // block
    base, extra = divmod(blocks, parts)
    return tuple((base + (i < extra)) * block for i in range(parts))


class ParallelState:
    """Everything the patch-parallel layers of one model share: config, split, step, context.

    Exchange buffers are kept per split (`Partition`): eager steps keep only the current size's; with
    CUDA graphs, which read them, the `KEPT_SIZES` most recently used sizes keep theirs and their
    graphs. A model whose every call is synchronous and called once per image (a VAE) keeps none
    (`keep_buffers=False`): each exchange is a plain blocking all-gather whose result lives only as
    long as the layer needs it, so nothing of the size of the whole image stays on a rank.

    The methods that issue or wait for collectives, or keep count of steps and layer calls, are
    `torch.compiler.disable`d: in a compiled model they run as plain Python between its graphs
    (a graph break at every exchange), and no graph reads or writes an exchange buffer in place.
    """

    def __init__(self, config: ParallelConfig, runtime, keep_buffers: bool = True) -> None:
        self.config = config
        self.runtime = runtime
        self.keep_buffers = keep_buffers
        self.partition: Partition | None = None
        self.step = 0
        self.exchange: Exchange | None = None
        self.graphs = None
        """The model's `CudaGraphs` when steps run as CUDA graphs, else None."""
        self.ownership = None
        """The model's `Ownership`: whether its layers are still the engine's (see `ownership`)."""
        self.graph_weights: tuple | None = None
        """(address, version) of every weight when the graphs were last checked (see `reset`)."""
        self.cross_kv: dict[str, tuple] = {}
        """Cross-attention keys/values per layer, computed once per image (see PatchAttnProcessor)."""
        self.direct_weights = True
        """Whether layers may compute with the model's weights themselves (`distrifusion.engine.hooks.weights_direct`),
        as the fused key/value projection does; else they call the modules."""
        self.fused_kv: dict[str, list] = {}
        """Per attention: [to_k, to_v, their weights side by side, biases, version] (see PatchAttnProcessor)."""
        self.sharding = None
        """The model's `Sharding` when its weights are sharded over the ranks (`ParallelConfig.shard_weights`):
        a weight is then whole only while its block runs, so layers keep no copy of one."""
        self.auto_plan: dict | None = None
        """With ParallelConfig(mode="auto"): the plan it chose from (`distrifusion.measure.planner.plan`)."""
        self._exchanges: dict[Partition, Exchange] = {}
        self._calls: dict[str, int] = {}
        self.branch = 0
        """The current call's guidance branch (see `enter_branch`); the fields above are its own."""
        self._branches = [_Branch()]
        self._branch_calls = 0
        self._this_step: list[int] = []  # branches called in the current step, in order
        self._last_step: list[int] = []
        self._last_timestep: object = None
        self._time: tuple[float, int, bool] | None = None
        """The current branch's last timestep in this image, how many calls in a row had it, and whether the
        first of them opened the image (see `begins_image`)."""
        self._image_calls = 0  # calls of any branch since the image began

    # -- step bookkeeping ------------------------------------------------------------------
    @torch.compiler.disable
    def reset(self) -> None:
        """Start a new image: step 0 (synchronous) in every branch; the context buffers are kept for reuse."""
        for index in range(len(self._branches)):
            self._switch(index)
            self._reset_branch()
            self._branches[index].key = self._branches[index].conditioning = None
        self._switch(0)
        self._this_step, self._last_step, self._last_timestep = [], [], None
        self._image_calls = 0

    def _reset_branch(self) -> None:
        if self.exchange is not None and self.exchange.fixed:
            self.exchange.settle()
        elif self.exchange is not None:  # a first step that did not finish: its partial layout is no use
            self._exchanges.pop(self.partition, None)
            self.exchange = self.partition = None
        self.step = 0
        self._calls.clear()
        self.cross_kv.clear()
        self._time = None

    # -- where an image begins ---------------------------------------------------------------
    # A pipeline that was given to `parallelize` restarts the count at each call. Any other caller
    # of the denoiser does not: a pipeline made from the parallelised one's components (`from_pipe`,
    # `Cls(**pipe.components)`, AutoPipeline), a bare-model loop. So the call sequence itself tells
    # where a new image begins, per guidance branch: within an image a branch's timesteps never rise,
    # and an image starts above where the previous one ended (img2img starts mid-schedule, still above
    # the last image's near-zero end). The rule, for a call of a branch whose previous call in this
    # image had timestep p:
    # - t > p: a new image (the schedule starts again);
    # - t < p: the same image, next step;
    # - t == p: the same image only for the second call in a row at p, and only if p did not open the
    #   image: second-order schedulers (Heun, DPM-SDE, FlowMatchHeun) call twice at each timestep but
    #   the first. A one-step image (turbo/LCM at 1 step) repeats the previous image's only timestep:
    #   that opened its image, so it is a new one; so is a third call at one timestep.
    # A new image that starts no higher than the previous one ended (a hand-off's second half run as
    # another image, a schedule that rises within an image such as an inversion) is not seen by the
    # rule: the first is continued, the second restarts at each rise (synchronous, exact, slower).
    # `distrifusion.reset` before an image is always right.
    def begins_image(self, t: float | None) -> bool:
        """Whether this call of the current branch, at timestep `t` (`first_time`), begins a new image
        (the rule above)."""
        if t is None or self._time is None:
            return False
        last, calls, opened = self._time
        return t > last or (t == last and (calls > 1 or opened))

    def note_time(self, t: float | None) -> None:
        """Remember this call's timestep `t` for the current branch (after `begins_image`)."""
        if t is not None:
            same = self._time is not None and self._time[0] == t
            self._time = (t, self._time[1] + 1, self._time[2]) if same else (t, 1, self._image_calls == 0)
        self._image_calls += 1

    @torch.no_grad()
    def refresh_fused_kv(self) -> None:
        """Re-read the fused key/value weights (`distrifusion.reset`, before each image): weights changed
        through `.data` (peft's fuse_lora merges so) keep their address and version. In place: a CUDA
        graph reads these tensors. A pair whose weights can no longer be read directly (quantised, cast to a
        storage dtype or moved by a hook since) is dropped: its attention calls the modules."""
        for name, (k, v, weight, bias, _) in list(self.fused_kv.items()):
            if not all(
                type(w) is nn.Parameter and (w.dtype, w.device) == (weight.dtype, weight.device)
                for w in (k.weight, v.weight)
            ):
                del self.fused_kv[name]
                continue
            torch.cat([k.weight, v.weight], out=weight)
            if bias is not None:
                torch.cat([k.bias, v.bias], out=bias)

    def release(self) -> None:
        """Drop every buffer and graph (for `remove`)."""
        self.reset()
        self.fused_kv.clear()
        for index in range(len(self._branches)):
            self._switch(index)
            self._exchanges.clear()
            self.exchange = self.partition = None
        self._switch(0)
        self._branches = self._branches[:1]
        if self.graphs is not None:
            self.graphs.clear()

    # -- guidance branches -----------------------------------------------------------------
    # A pipeline may call the denoiser more than once per denoising step with other conditioning:
    # Flux's true CFG (a second call with the negative prompt), SD3's skip-layer guidance (a third call
    # without some layers), guidance by separate calls. Each such branch needs its *own* stale context:
    # the other branch's activations of this step are not this branch's of the previous one. Branches
    # are told apart by the adapter's `conditioning_args`: by identity (no device synchronisation); when
    # the identity is new, by value (embeddings rebuilt every step are the same branch); when the values
    # are new too, by place: another call of the same step (same timestep) is another branch, the first
    # call of a step with an edited prompt continues the branch that came first in the previous step.
    @torch.compiler.disable
    def enter_branch(self, key: object, conditioning: object, timestep: object) -> None:
        """Make the branch of this call the current one (a new branch's first call is synchronous)."""
        branches = self._branches
        found = next((i for i, b in enumerate(branches) if b.key is not None and b.key == key), None)
        if found is None:
            seen = [i for i, b in enumerate(branches) if b.key is not None]
            found = next((i for i in seen if same_values(branches[i].conditioning, conditioning)), None)
        if found is None:
            found = self._placed_branch(timestep)
        if found in self._this_step:  # a branch runs once per step: this call begins the next step
            self._last_step, self._this_step = self._this_step, []
        self._this_step.append(found)
        self._switch(found)
        self._branch_calls += 1
        branches[found].key, branches[found].conditioning = key, conditioning
        branches[found].last_used = self._branch_calls
        self._last_timestep = timestep

    def _placed_branch(self, timestep: object) -> int:
        """The branch of a call whose conditioning this image has not seen: by its place in the step."""
        same_step = bool(self._this_step) and _same_time(self._last_timestep, timestep)
        previous, used = (self._last_step, self._this_step) if same_step else (self._this_step, [])
        place = len(used)
        if place < len(previous) and previous[place] not in used:
            return previous[place]
        branches = self._branches
        unused = next((i for i, b in enumerate(branches) if b.key is None and i not in used), None)
        if unused is not None:
            return unused
        if len(branches) < MAX_BRANCHES:
            branches.append(_Branch())
            return len(branches) - 1
        # Taken over: its context belongs to another conditioning, so it starts again (synchronously).
        free = [i for i in range(len(branches)) if i not in used] or list(range(len(branches)))
        index = min(free, key=lambda i: branches[i].last_used)
        self._switch(index)
        self._reset_branch()
        return index

    def _switch(self, index: int) -> None:
        if index == self.branch:
            return
        self._branches[self.branch].saved = {name: getattr(self, name) for name in _BRANCH_FIELDS}
        saved = self._branches[index].saved
        if saved is None:  # a new branch: nothing laid out yet
            saved = dict(step=0, partition=None, exchange=None, _exchanges={}, _calls={}, cross_kv={}, _time=None)
        for name in _BRANCH_FIELDS:
            setattr(self, name, saved[name])
        self._branches[index].saved = None
        self.branch = index

    def abort_step(self) -> None:
        """Undo the bookkeeping of a step whose CUDA-graph capture failed, before it reruns eagerly."""
        self._calls.clear()
        if self.exchange is not None:
            self.exchange.forget_in_flight()

    @torch.compiler.disable
    def begin_step(self, partition: Partition) -> None:
        if not self.keep_buffers:
            self.partition, self._calls = partition, {}
            return
        if partition != self.partition:
            self._reset_branch()
            self.partition = partition
            exchange = self._exchanges.pop(partition, None)
            if exchange is None:
                comm = self.runtime.patch_groups[partition.cfg_groups]
                bucket = int(self.config.comm_bucket_mb * 2**20)
                exchange = Exchange(comm, bucket, make_codec(self.config.compress))
            self._exchanges[partition] = self.exchange = exchange  # (re)inserted last: the most recently used
            # Eager steps need only this size's buffers; graphs read theirs, so a few sizes stay, with their graphs.
            while len(self._exchanges) > (1 if self.graphs is None else KEPT_SIZES):
                oldest = next(iter(self._exchanges))
                del self._exchanges[oldest]
                if self.graphs is not None:
                    self.graphs.clear(keep=lambda key, oldest=oldest: not (isinstance(key, tuple) and oldest in key))
        self._calls.clear()

    @torch.compiler.disable
    def end_step(self) -> None:
        """Send this step's remaining context. Part of the step's work (a CUDA graph captures it);
        the step counter is advanced by the caller, outside any graph."""
        if self.exchange is not None:
            self.exchange.flush()

    # -- what layers ask -------------------------------------------------------------------
    @property
    def split(self) -> bool:
        """Whether the current call divides rows among several ranks."""
        return self.partition is not None and self.partition.patch_size > 1

    @property
    def naive(self) -> bool:
        return self.config.mode == "naive"

    @property
    def sync_step(self) -> bool:
        return self.config.is_sync_step(self.step)

    def sizes(self, local: int) -> list[int]:
        """Every patch rank's extent of a dimension that is `local` long on this rank.

        Rows (and tokens, which are rows times width) scale with the latent strip heights,
        because every strip is a whole number of the model's blocks.
        """
        partition = self.partition
        mine = partition.rows[partition.patch_rank]
        if any(local * r % mine for r in partition.rows):
            raise RuntimeError(f"distrifusion: a layer saw {local} rows or tokens, not a share of {mine} rows")
        return [local * r // mine for r in partition.rows]

    def key(self, name: str, peek: bool = False) -> str:
        """A per-step unique key for a layer call (a module may run more than once per step)."""
        count = self._calls.get(name, 0)
        if not peek:
            self._calls[name] = count + 1
        return name if count == 0 else f"{name}#{count}"

    def own_row(self, name: str) -> torch.Tensor | None:
        """Where this rank's payload for the layer's next `context` call lives (None if not yet laid out)."""
        if self.exchange is None:
            return None
        return self.exchange.own_row(self.key(name, peek=True))

    @torch.compiler.disable
    def context(self, name: str, payload: torch.Tensor, *, alone: bool = False, fresh: bool = False) -> torch.Tensor:
        """All patch ranks' payloads for this layer call, shape (ranks, *payload shape).

        This rank's row is `payload`. The other rows are this step's in a synchronous step (or
        with `fresh`: a blocking exchange), else the previous step's, and `payload` goes out to
        the others for the next step without waiting. The result is a view of the exchange
        buffer, valid until this layer's next call. `alone` gives the payload its own buffer,
        so that the result is one contiguous tensor.
        """
        key = self.key(name)
        if not self.keep_buffers:
            return self.runtime.patch_groups[self.partition.cfg_groups].all_gather(payload).wait()
        if fresh or self.sync_step:
            return self.exchange.gather_now(key, payload, alone or fresh)
        return self.exchange.swap(key, payload)

    @torch.compiler.disable
    def context_and_own_previous(self, name: str, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `context` in a displaced step, plus this rank's payload from the previous step."""
        return self.exchange.swap(self.key(name), payload, keep_own=True)
