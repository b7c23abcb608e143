"""The exchange buffers: where the ranks of a patch group swap their layers' context.

`Exchange` lays out one slot per layer call in the first (synchronous) step of a split, then keeps
the same buffers for every later step, image and CUDA graph; `ParallelState` owns one per split and
guidance branch. Compressed displaced gathers (see `distrifusion.engine.compress`) live here too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .comm import Communicator, PendingGather
from .compress import MIN_ELEMENTS, BlockCodec


@contextlib.contextmanager
def normal_tensors():
    """New tensors made in here are normal ones even under torch.inference_mode (buffers kept across
    images must take in-place writes in whatever mode a later image runs); grad mode unchanged
    (leaving inference mode would turn it on)."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def tensor_version(t: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None for inference-mode tensors, which keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclass(frozen=True)
class _Slot:
    buffer: int
    """Index of the exchange buffer that holds this payload."""
    offset: int
    numel: int
    shape: torch.Size
    dtype: torch.dtype


class Exchange:
    """Preallocated buffers in which the ranks of a patch group swap their layers' context.

    Every layer call of a step owns a slot: a (ranks, *payload) view of a buffer of shape
    (ranks, n). This rank writes its payload into its row; an in-place all-gather fills the
    other rows. Small payloads (conv halos, GroupNorm statistics) share buckets of about
    `bucket_bytes`, gathered as one collective; payloads read in place (attention keys/values)
    or gathered at once in every step have a buffer each.

    The layout is learnt in the first (always synchronous) step of a split and is fixed after
    it, so the same buffers serve every later step, image and CUDA graph. In displaced steps a
    bucket's gather starts once its last payload is written and the layer that wrote it has
    read its context, and is waited for right before the bucket's first use in the next step.

    A layer call that did not run in the first step (a step cache skipped it there, on every rank
    alike) gets a buffer of its own, uncompressed, when it first runs, through a blocking exchange
    (also in a displaced step: there is no previous context to read). A layer that a step skips
    sends nothing: its slot keeps the context of the last step that ran it.
    """

    def __init__(self, comm: Communicator, bucket_bytes: int, codec: BlockCodec | None = None) -> None:
        self.comm, self.bucket_bytes, self.codec = comm, bucket_bytes, codec
        self._wire: dict[int, torch.Tensor] = {}
        """Per compressed buffer: the (ranks, bytes) uint8 buffer its displaced gathers send."""
        self._sent: dict[int, torch.Tensor] = {}
        """Per compressed buffer (residual codecs): this rank's row as the other ranks hold it."""
        self.slots: dict[str, _Slot] = {}
        self.buffers: list[torch.Tensor | None] = []
        self.fixed = False
        """True once the first step has laid out every slot and allocated every buffer."""
        self._last_key: list[str] = []  # per buffer: the payload whose writing completes it
        self._filled: list[int] = []  # per buffer: elements laid out so far
        self._open: dict[torch.dtype, int] = {}  # per dtype: the bucket being laid out
        self._staged: dict[str, torch.Tensor] = {}  # first-step gathers of bucketed payloads
        self._device: torch.device | None = None
        self._written: set[int] = set()
        self._ready: list[int] = []
        self._pending: dict[int, PendingGather] = {}

    def view(self, key: str) -> torch.Tensor:
        """All ranks' payloads of one slot, shape (ranks, *payload shape); a view of its buffer."""
        slot = self.slots[key]
        buffer = self._wait(slot.buffer)
        return buffer[:, slot.offset : slot.offset + slot.numel].unflatten(1, slot.shape)

    def own_row(self, key: str) -> torch.Tensor | None:
        """This rank's row of a laid-out slot, to compute a payload straight into; else None."""
        slot = self.slots.get(key)
        if slot is None or self.buffers[slot.buffer] is None:
            return None
        return self.view(key)[self.comm.rank]

    def gather_now(self, key: str, payload: torch.Tensor, alone: bool = False) -> torch.Tensor:
        """Blocking exchange: every rank's fresh payload; also kept as the next step's context."""
        self._send_ready()
        slot = self._place(key, payload, alone)
        buffer = self.buffers[slot.buffer]
        sent = self._sent.get(slot.buffer)
        if sent is not None:  # the others get this payload exactly
            sent[slot.offset : slot.offset + slot.numel].copy_(payload.flatten())
        if buffer is not None and (alone or slot.numel == buffer.shape[1]):
            view = self.view(key)
            _write(view[self.comm.rank], payload)
            self.comm.all_gather_inplace(buffer).wait()
            return view
        gathered = self.comm.all_gather(payload).wait()
        if buffer is None:
            self._staged[key] = gathered
            return gathered
        view = self.view(key)
        view.copy_(gathered)
        return view

    def swap(self, key: str, payload: torch.Tensor, keep_own: bool = False):
        """Displaced exchange: write this rank's fresh payload, return the slot with the other rows
        as the previous step left them (and, with `keep_own`, a copy of this rank's old row)."""
        self._send_ready()
        slot = self.slots.get(key)
        if not self.fixed:
            raise _unknown_layer(key)
        if slot is None:  # first run of a layer skipped so far (class docstring): exchanged now, nothing older
            view = self.gather_now(key, payload, alone=True)
            return (view, view[self.comm.rank].clone()) if keep_own else view
        self._check(key, slot, payload)
        view = self.view(key)
        old_own = view[self.comm.rank].clone() if keep_own else None
        _write(view[self.comm.rank], payload)
        self._written.add(slot.buffer)
        if key == self._last_key[slot.buffer]:
            # Sent at the next exchange call, after this layer's kernels that read the slot are queued.
            self._written.discard(slot.buffer)
            self._ready.append(slot.buffer)
        return (view, old_own) if keep_own else view

    def flush(self) -> None:
        """End of a step: fix the layout after the first step, send every written bucket."""
        if not self.fixed:
            self._allocate()
        self._ready.extend(sorted(self._written))
        self._written.clear()
        self._send_ready()

    def settle(self) -> None:
        """Send what is written and wait for every gather in flight."""
        self.flush()
        for index in list(self._pending):
            self._wait(index)

    def forget_in_flight(self) -> None:
        """After a CUDA-graph capture that failed: its collectives were recorded, never run."""
        self._pending.clear()
        self._ready.clear()
        self._written.clear()

    # -- internals ----------------------------------------------------------------------------
    def _place(self, key: str, payload: torch.Tensor, alone: bool) -> _Slot:
        slot = self.slots.get(key)
        if slot is not None:
            self._check(key, slot, payload)
            return slot
        if self.fixed:
            return self._place_late(key, payload)
        self._device = payload.device
        nbytes = payload.numel() * payload.element_size()
        compressed = self.codec is not None and payload.numel() >= MIN_ELEMENTS
        bucket = (payload.dtype, compressed)
        index = self._open.get(bucket)
        if alone or nbytes >= self.bucket_bytes:
            index = self._new_buffer(key, compressed)
            with normal_tensors():
                self.buffers[index] = payload.new_empty(self.comm.size, payload.numel())
        elif index is None or (self._filled[index] * payload.element_size() + nbytes > self.bucket_bytes):
            index = self._open[bucket] = self._new_buffer(key, compressed)
        slot = _Slot(index, self._filled[index], payload.numel(), payload.shape, payload.dtype)
        self._filled[index] += payload.numel()
        self._last_key[index] = key
        self.slots[key] = slot
        return slot

    def _place_late(self, key: str, payload: torch.Tensor) -> _Slot:
        """A buffer of its own for a layer call first seen after the layout was fixed (class docstring)."""
        if payload.is_cuda and torch.cuda.is_current_stream_capturing():  # a graph must not allocate its buffers
            raise _unknown_layer(key)
        index = self._new_buffer(key)
        with normal_tensors():
            self.buffers[index] = payload.new_empty(self.comm.size, payload.numel())
        self._filled[index] = payload.numel()
        slot = self.slots[key] = _Slot(index, 0, payload.numel(), payload.shape, payload.dtype)
        return slot

    def _new_buffer(self, key: str, compressed: bool = False) -> int:
        if compressed:
            self._wire[len(self.buffers)] = None  # allocated with the buffer
        self.buffers.append(None)
        self._last_key.append(key)
        self._filled.append(0)
        return len(self.buffers) - 1

    @normal_tensors()
    def _allocate(self) -> None:
        for index, buffer in enumerate(self.buffers):
            if buffer is None:
                dtype = next(s.dtype for s in self.slots.values() if s.buffer == index)
                self.buffers[index] = torch.empty(self.comm.size, self._filled[index], dtype=dtype, device=self._device)
        for key, gathered in self._staged.items():
            self.view(key).copy_(gathered)
        self._staged.clear()
        self._open.clear()
        for index in self._wire:
            buffer = self.buffers[index]
            size = self.codec.encoded_bytes(buffer.shape[1], buffer.dtype)
            self._wire[index] = torch.empty(self.comm.size, size, dtype=torch.uint8, device=buffer.device)
            if self.codec.residual:  # the first step was synchronous: the others hold this row exactly
                self._sent[index] = buffer[self.comm.rank].clone()
        self.fixed = True

    def _check(self, key: str, slot: _Slot, payload: torch.Tensor) -> None:
        if payload.shape != slot.shape or payload.dtype != slot.dtype:
            raise RuntimeError(
                f"distrifusion: layer call {key!r} sent a {payload.dtype} payload of shape {tuple(payload.shape)}, "
                f"but {slot.dtype} {tuple(slot.shape)} in the first step of this image size"
            )

    def _send_ready(self) -> None:
        for index in self._ready:
            if index in self._wire:
                self._pending[index] = self._send_compressed(index)
            else:
                self._pending[index] = self.comm.all_gather_inplace(self.buffers[index], async_op=True)
        self._ready.clear()

    def _send_compressed(self, index: int) -> _CompressedGather:
        """A displaced gather of a compressed buffer: encode this rank's row (or its change since what
        the others hold, whose record then takes the same decoded change), gather the codes."""
        buffer, wire, me, codec = self.buffers[index], self._wire[index], self.comm.rank, self.codec
        sent = self._sent.get(index)
        codec.encode(buffer[me] if sent is None else codec.change(buffer[me], sent), wire[me])
        if sent is not None:
            codec.add_change(sent, wire[me])
        return _CompressedGather(self.comm.all_gather_inplace(wire, async_op=True), buffer, wire, me, codec)

    def _wait(self, index: int) -> torch.Tensor:
        pending = self._pending.pop(index, None)
        if pending is not None:
            pending.wait()
        return self.buffers[index]


class _CompressedGather:
    """Waits for the codes, then decodes the other ranks' rows into the buffer (residual codecs:
    adds the decoded changes to the copies there)."""

    def __init__(self, pending, buffer: torch.Tensor, wire: torch.Tensor, me: int, codec: BlockCodec) -> None:
        self.pending, self.buffer, self.wire, self.me, self.codec = pending, buffer, wire, me, codec

    def wait(self) -> torch.Tensor:
        self.pending.wait()
        numel, dtype = self.buffer.shape[1], self.buffer.dtype
        for rank in range(self.buffer.shape[0]):
            if rank == self.me:
                continue
            if self.codec.residual:
                self.codec.add_change(self.buffer[rank], self.wire[rank])
            else:
                self.buffer[rank].copy_(self.codec.decode(self.wire[rank], numel, dtype))
        return self.buffer


def _unknown_layer(key: str) -> RuntimeError:
    return RuntimeError(
        f"distrifusion: layer call {key!r} did not run in the first step of this image size; every "
        "denoising step must run the same layers (call distrifusion.reset() before a new image)"
    )


def _write(row: torch.Tensor, payload: torch.Tensor) -> None:
    """Copy a payload into its row, unless it was computed there in the first place."""
    if payload.data_ptr() != row.data_ptr() or payload.stride() != row.stride():
        row.copy_(payload)
