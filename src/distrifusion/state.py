"""Per-model state: the split of the current call, the step counter and the exchanged context.

One `ParallelState` lives on each parallelised model. Layers hold a reference to it and ask it
two things: how the current tensor is split among the ranks (`sizes`) and what the other ranks
contributed (`exchange`). Everything that changes from step to step lives here, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .comm import Communicator, PendingGather
from .config import ParallelConfig


@dataclass(frozen=True)
class Plan:
    """How one model call's latent batch and rows are divided among the ranks."""

    batch: int
    height: int
    width: int
    cfg_groups: int
    """1, or 2 when the batch is split in halves over two rank groups."""
    cfg_index: int
    patch_rank: int
    rows: tuple[int, ...]
    """Latent rows of every patch rank's strip, top to bottom."""

    @property
    def patch_size(self) -> int:
        return len(self.rows)

    @property
    def row_start(self) -> int:
        return sum(self.rows[: self.patch_rank])

    @property
    def local_batch(self) -> int:
        return self.batch // self.cfg_groups


def split_rows(height: int, block: int, parts: int) -> tuple[int, ...]:
    """Split `height` rows into `parts` strips of whole blocks, differing by at most one block."""
    blocks = height // block
    base, extra = divmod(blocks, parts)
    return tuple((base + (i < extra)) * block for i in range(parts))


@dataclass
class _Bucket:
    pending: PendingGather
    gathered: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        if self.gathered is None:
            self.gathered = self.pending.wait()
        return self.gathered


@dataclass
class Exchange:
    """The context each layer shares with the other ranks of its patch group.

    Synchronous steps gather fresh payloads at once. Displaced steps post payloads into buckets
    that are all-gathered asynchronously once they reach `bucket_bytes`, and read them in the
    next step, waiting on a bucket only right before its first use.
    """

    comm: Communicator
    bucket_bytes: int
    _latest: dict[str, torch.Tensor | tuple[_Bucket, int, int, torch.Size]] = field(default_factory=dict)
    _open: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    _open_bytes: int = 0

    def gather_now(self, key: str, payload: torch.Tensor) -> torch.Tensor:
        """Blocking all-gather; the result also serves as the previous step's context next step."""
        gathered = self.comm.all_gather(payload).wait()
        self._latest[key] = gathered
        return gathered

    def previous(self, key: str) -> torch.Tensor:
        """All ranks' payloads for `key` from the step before, shape (ranks, *payload shape)."""
        entry = self._latest.get(key)
        if entry is None:
            raise RuntimeError(f"distrifusion: no context from the previous step for layer {key!r}")
        if isinstance(entry, torch.Tensor):
            return entry
        bucket, offset, numel, shape = entry
        flat = bucket.result()
        return flat[:, offset : offset + numel].unflatten(1, shape)

    def post(self, key: str, payload: torch.Tensor) -> None:
        """Queue this rank's fresh payload; it is sent asynchronously with its bucket."""
        self._open.append((key, payload))
        self._open_bytes += payload.numel() * payload.element_size()
        if self._open_bytes >= self.bucket_bytes:
            self.flush()

    def flush(self) -> None:
        """Send the open bucket (called when it is full and at the end of every step)."""
        if not self._open:
            return
        # Buckets are flat buffers of one dtype: mixed payloads (fp16 activations, fp32 statistics) go per dtype.
        dtypes = dict.fromkeys(p.dtype for _, p in self._open)
        groups = [[(k, p) for k, p in self._open if p.dtype == d] for d in dtypes]
        self._open, self._open_bytes = [], 0
        for group in groups:
            flat = torch.cat([p.reshape(-1) for _, p in group])
            bucket = _Bucket(self.comm.all_gather(flat, async_op=True))
            offset = 0
            for key, payload in group:
                self._latest[key] = (bucket, offset, payload.numel(), payload.shape)
                offset += payload.numel()

    def clear(self) -> None:
        """Drop all context; in-flight gathers are waited for so no buffer is freed under them."""
        for entry in self._latest.values():
            if not isinstance(entry, torch.Tensor):
                entry[0].result()
        self._latest.clear()
        self._open, self._open_bytes = [], 0


class ParallelState:
    """Everything the patch-parallel layers of one model share: config, split, step, context."""

    def __init__(self, config: ParallelConfig, block: int, runtime) -> None:
        self.config = config
        self.block = block
        """Latent rows per block: the model's total downsampling factor."""
        self.runtime = runtime
        self.plan: Plan | None = None
        self.step = 0
        self.exchange: Exchange | None = None
        self._calls: dict[str, int] = {}

    # -- step bookkeeping ------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new image: step 0 (synchronous), no stale context."""
        if self.exchange is not None:
            self.exchange.clear()
        self.step = 0
        self._calls.clear()

    def begin_step(self, plan: Plan) -> None:
        if plan != self.plan:
            self.reset()
            self.plan = plan
            comm = self.runtime.patch_groups[plan.cfg_groups]
            self.exchange = Exchange(comm, int(self.config.comm_bucket_mb * 2**20))
        self._calls.clear()

    def end_step(self) -> None:
        if self.exchange is not None:
            self.exchange.flush()
        self.step += 1

    # -- what layers ask -------------------------------------------------------------------
    @property
    def split(self) -> bool:
        """Whether the current call divides rows among several ranks."""
        return self.plan is not None and self.plan.patch_size > 1

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
        plan = self.plan
        mine = plan.rows[plan.patch_rank]
        if any(local * r % mine for r in plan.rows):
            raise RuntimeError(f"distrifusion: a layer saw {local} rows or tokens, not a share of {mine} rows")
        return [local * r // mine for r in plan.rows]

    def key(self, name: str) -> str:
        """A per-step unique key for a layer call (a module may run more than once per step)."""
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        return name if count == 0 else f"{name}#{count}"

    def context(self, name: str, payload: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """All patch ranks' payloads for this layer call, shape (ranks, *payload shape).

        In a synchronous step (or with `fresh`) they are this step's, gathered now. In a
        displaced step they are the previous step's, and this rank's fresh payload is posted
        for the next step without waiting.
        """
        key = self.key(name)
        if fresh or self.sync_step:
            return self.exchange.gather_now(key, payload)
        stale = self.exchange.previous(key)
        self.exchange.post(key, payload)
        return stale
