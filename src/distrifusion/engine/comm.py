"""Process groups and the communicator interface the patch-parallel layers talk through.

A `Communicator` is one axis of ranks that exchange equally shaped tensors with all-gather. Two
implementations: `DistCommunicator` over torch.distributed (gloo, nccl) and `SoloCommunicator`
for a group of one. Layers never call torch.distributed directly, so another implementation (a
loopback simulation of N ranks on one device) plugs in without touching them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

log = logging.getLogger("distrifusion")


class PendingGather(Protocol):
    def wait(self) -> torch.Tensor:
        """Block until the gather is complete; return a (group size, *payload shape) tensor."""
        ...


class Communicator(Protocol):
    rank: int
    size: int
    capturable: bool
    """Whether its collectives can be captured in a CUDA graph (nccl, loopback, a group of one)."""

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False) -> PendingGather:
        """Gather one equally shaped tensor from every member, stacked along a new first dim."""
        ...

    def all_gather_inplace(self, buffer: torch.Tensor, async_op: bool = False) -> PendingGather:
        """Fill the other members' rows of a contiguous (size, ...) buffer whose row `rank` holds ours."""
        ...


@dataclass
class _Done:
    out: torch.Tensor
    work: object | None = None

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.out


class SoloCommunicator:
    """A group of one: gathering returns the tensor itself."""

    rank = 0
    size = 1
    capturable = True

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False) -> PendingGather:
        return _Done(tensor.unsqueeze(0))

    def all_gather_inplace(self, buffer: torch.Tensor, async_op: bool = False) -> PendingGather:
        return _Done(buffer)


class DistCommunicator:
    """All-gather over a torch.distributed process group."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # NCCL collectives can be captured in CUDA graphs; gloo's synchronise with the host.
        self.capturable = dist.get_backend(group) == "nccl"

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False) -> PendingGather:
        return gather_through_inplace(self, tensor, async_op)

    def all_gather_inplace(self, buffer: torch.Tensor, async_op: bool = False) -> PendingGather:
        # Flat views: gloo checks sizes by concatenation along the first dim. Input inside the output
        # is NCCL's documented in-place all-gather (and works with gloo): no send buffer, no copy.
        flat = buffer.view(-1)
        work = _all_gather_single(flat, buffer[self.rank].view(-1), group=self.group, async_op=async_op)
        return _Done(buffer, work)


def gather_through_inplace(comm: Communicator, tensor: torch.Tensor, async_op: bool = False) -> PendingGather:
    """`all_gather` for a communicator whose primitive is `all_gather_inplace`: a fresh buffer with
    this member's row filled in."""
    out = tensor.new_empty(comm.size, *tensor.shape)
    out[comm.rank] = tensor
    return comm.all_gather_inplace(out, async_op)


# Renamed in recent torch; the old name still works but warns.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Runtime:
    """This process's place among the ranks: its device and its communicators.

    Ranks form a CFG axis (1 or 2 groups) times a patch axis. Both layouts are built up front,
    because creating a process group is itself a collective that every rank must join in the
    same order; which one a call uses depends on its batch.
    """

    rank: int
    world_size: int
    device: torch.device
    world: Communicator
    patch_groups: dict[int, Communicator]
    """Communicator of this rank's patch group, keyed by the number of CFG groups (1 or 2)."""

    def cfg_index(self, cfg_groups: int) -> int:
        """Which CFG group (batch half) this rank belongs to."""
        return self.rank // (self.world_size // cfg_groups)


_RUNTIMES: dict[int, Runtime] = {}


def init_runtime(timeout_s: float = 300.0) -> Runtime:
    """Build (once per process group) the runtime from torchrun's environment.

    Initialises the default process group if torchrun's variables say there are several ranks
    and none exists yet: nccl when CUDA is available, else gloo (or the backend named by the
    DISTRIFUSION_BACKEND environment variable). Without them, one process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized() and world_size > 1:
        # DISTRIFUSION_BACKEND=gloo lets several ranks share one GPU (nccl refuses that).
        backend = os.environ.get("DISTRIFUSION_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        store = _loopback_store(timedelta(seconds=timeout_s), world_size)
        ranks = dict(store=store, rank=int(os.environ["RANK"]), world_size=world_size) if store else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **ranks)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        solo = SoloCommunicator()
        return Runtime(0, 1, device, solo, {1: solo})

    key = id(dist.group.WORLD)
    if key not in _RUNTIMES:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        world = DistCommunicator(None)
        patch_groups: dict[int, Communicator] = {1: world}
        if world_size % 2 == 0:
            half = world_size // 2
            # new_group is collective: every rank creates both halves, in the same order. Without a timeout
            # of its own a group would wait torch's default (30 min for gloo), not timeout_s.
            timeout = timedelta(seconds=timeout_s)
            halves = [dist.new_group(list(range(g * half, (g + 1) * half)), timeout=timeout) for g in range(2)]
            mine = halves[rank // half]
            patch_groups[2] = DistCommunicator(mine) if half > 1 else SoloCommunicator()
        _RUNTIMES[key] = Runtime(rank, world_size, device, world, patch_groups)
        _sign_in(rank)
    return _RUNTIMES[key]


_SHARD_GROUPS: dict[tuple[int, str], dist.ProcessGroup] = {}


def shard_group(runtime: Runtime, scope: str, timeout_s: float = 300.0) -> dist.ProcessGroup:
    """The process group over which a model's weights are sharded (`ParallelConfig.shard_group`): all
    ranks ("world"), or this rank's CFG group ("cfg_group": half of an even world). A group of its own,
    so that the weight gathers (FSDP2's) and the exchange never queue behind each other's collectives.
    Made once per process; making groups is collective, so every rank calls this alike."""
    if not isinstance(runtime.world, DistCommunicator):
        raise ValueError(
            "distrifusion: shard_weights needs ranks joined by torch.distributed (torchrun or the launcher); "
            f"this runtime's ranks talk through {type(runtime.world).__name__}"
        )
    halves = scope == "cfg_group" and runtime.world_size % 2 == 0
    key = (id(dist.group.WORLD), "cfg_group" if halves else "world")
    if key not in _SHARD_GROUPS:
        timeout = timedelta(seconds=timeout_s)
        if halves:
            half = runtime.world_size // 2
            groups = [dist.new_group(list(range(g * half, (g + 1) * half)), timeout=timeout) for g in range(2)]
            _SHARD_GROUPS[key] = groups[runtime.rank // half]
        else:
            _SHARD_GROUPS[key] = dist.new_group(list(range(runtime.world_size)), timeout=timeout)
    return _SHARD_GROUPS[key]


def _loopback_store(timeout: timedelta, world_size: int) -> dist.TCPStore | None:
    """The rendezvous store of ranks that all run on this machine (`MASTER_ADDR` 127.0.0.1, as our
    launcher and server set it), listening on the loopback address only: torch's own listens on every
    interface, unauthenticated. None where torch's should be used (other addresses, torchrun's agent)."""
    if os.environ.get("MASTER_ADDR") != "127.0.0.1" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    port = int(os.environ["MASTER_PORT"])
    if os.environ["RANK"] != "0":
        return dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    listener = socket.create_server(("127.0.0.1", port))
    return dist.TCPStore("127.0.0.1", port, world_size, True, timeout, master_listen_fd=listener.detach())


# -- naming the ranks that stopped answering ---------------------------------------------------------
# A collective that times out says only that *some* rank is missing. After a failure each surviving
# rank answers a roll call in the rendezvous store (the default group's key-value store, reached over
# its own TCP connection, not through the broken collective) and names the ranks that do not answer.


def _roll_call_key(what: str, rank: int) -> str:
    # Keys of an earlier attempt of the same job (torchrun --max-restarts keeps the store) are not read.
    return f"distrifusion/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{what}/{rank}"


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (no group, or a backend without one): no roll call
        return None


def _where() -> str:
    """This rank's place, for messages: torchrun's node index, the host name, and the address it reaches
    the rendezvous from (two "hosts" that share a name, like network namespaces, differ in it)."""
    parts = [f"node {os.environ['GROUP_RANK']}"] if "GROUP_RANK" in os.environ else []
    parts.append(socket.gethostname())
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # connect() on UDP sends nothing
            probe.connect((os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500"))))
            parts.append(probe.getsockname()[0])
    except (KeyError, OSError, ValueError):
        pass
    return " ".join(parts)


def _sign_in(rank: int) -> None:
    store = _default_store()
    if store is not None:
        store.set(_roll_call_key("where", rank), _where())


def roll_call(window_s: float = 5.0) -> str | None:
    """After a failure: which ranks no longer answer? Marks this rank as alive in the store, waits up to
    `window_s` for every other rank to do the same (they fail at about the same moment: they wait on the
    same collective), and returns a sentence naming the ranks that did not answer, with their node, host
    and address; None when all answered, there is no group, or the store cannot be reached. Bounded: a
    store behind a cut link cannot hold the caller longer than `window_s` plus 2 s."""
    store = _default_store()
    if store is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    rank, world_size = dist.get_rank(), dist.get_world_size()
    found: list[str] = []

    def answered(r: int, what: str = "here") -> bool:
        return store.check([_roll_call_key(what, r)])

    def call() -> None:
        try:
            store.set(_roll_call_key("here", rank), "1")
            missing = [r for r in range(world_size) if r != rank]
            deadline = time.monotonic() + window_s
            while missing and time.monotonic() < deadline:
                time.sleep(0.1)
                missing = [r for r in missing if not answered(r)]
            for r in missing:
                where = store.get(_roll_call_key("where", r)).decode() if answered(r, "where") else ""
                found.append(f"rank {r}" + (f" ({where})" if where else ""))
            found.append("")  # done
        except Exception:  # noqa: BLE001 - the store is gone too: the caller says nothing rather than guess
            pass

    caller = threading.Thread(target=call, name="distrifusion-roll-call", daemon=True)
    caller.start()
    caller.join(window_s + 2.0)
    if not found or found[-1] != "":
        return None  # the store did not answer (cut off from it): nothing reliable to say
    silent = found[:-1]
    if not silent:
        return None
    return f"no answer within {window_s:g} s of the failure from {', '.join(silent)}: stopped, killed or cut off"
