"""Compressed exchange for displaced steps (`ParallelConfig.compress`).

What a displaced step sends is already a step old, so sending it approximately costs little, as
long as the error does not pile up from step to step. Two ways, each with four codes:

- "int8" / "fp8" / "int4" / "int2": every payload row is sent in 8, 4 or 2 bits per value
  (int2: -1, 0 or 1 times the scale) with one float32 scale per block of `BLOCK` values (the
  block's largest magnitude maps to the code's largest value): about 3.9x, 7.5x or 14x fewer
  bytes than float32 (half that against float16). The receiver's copy is the decoded row.
- "residual-..." of each: each rank sends the change of its row since what the receivers hold,
  in the same code. Receivers add it to their copy; the sender adds the same
  decoded change to its own record of that copy (error feedback), so the next change carries
  this step's coding error too and the copies never drift further than one step's error.
  Activations change slowly from step to step, so the change is small and its coding error
  smaller still. Changes are computed in float32 at least, and a copy that holds a NaN or inf
  (a non-finite activation once sent) adds the next change to 0 there: it is gone a step later.

The modes are listed in `config.COMPRESS_MODES`. Synchronous exchanges are never compressed (the
synchronous mode and warm-up steps stay exact), nor are small payloads (GroupNorm statistics,
FreeU's spectra: `MIN_ELEMENTS`), which go in buckets of their own.
"""

from __future__ import annotations

import torch

BLOCK = 256
"""Values per scale: a scale (4 bytes) per 256 one-byte values adds 1.6% to the bytes."""
MIN_ELEMENTS = 4096
"""Payloads smaller than this are sent as they are (statistics, whose entries differ in scale)."""


class BlockCodec:
    """8-bit values with one float32 scale per block, packed in one uint8 row:
    [values (padded to whole blocks) | scales as bytes]."""

    def __init__(self, kind: str, residual: bool = False) -> None:
        if kind not in ("int8", "fp8", "int4", "int2", "lossless"):  # lossless: the bytes as they are (for tests)
            raise ValueError(f"unknown codec {kind!r}")
        self.kind, self.residual = kind, residual

    def encoded_bytes(self, numel: int, dtype: torch.dtype) -> int:
        if self.kind == "lossless":
            return numel * torch.empty(0, dtype=dtype).element_size()
        blocks = -(-numel // BLOCK)
        return blocks * BLOCK // self._per_byte + 4 * blocks

    @property
    def _per_byte(self) -> int:
        return {"int4": 2, "int2": 4}.get(self.kind, 1)

    def work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What residuals are computed in: float32 at least (a float16 change from +40000 to -40000
        overflows float16); the lossless test codec keeps the payload's own."""
        return dtype if self.kind == "lossless" else torch.promote_types(dtype, torch.float32)

    def change(self, row: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        """The change to send: `row` minus what the receivers hold (`copy`, see `add_change`)."""
        wide = self.work_dtype(row.dtype)
        return row.to(wide) - _finite_or_zero(copy.to(wide))

    def add_change(self, copy: torch.Tensor, code: torch.Tensor) -> None:
        """`copy` += the change coded in `code`, computed alike by the sender (its record of what the
        receivers hold) and by every receiver: in `work_dtype`, kept within the copy's dtype, and from 0
        where the copy is not finite, so that a NaN or inf that once reached it (a non-finite
        activation) is gone a step later instead of staying for the rest of the image."""
        total = _finite_or_zero(copy.to(self.work_dtype(copy.dtype)))
        total += self.decode(code, copy.numel(), total.dtype)
        info = torch.finfo(copy.dtype)
        copy.copy_(total.clamp_(info.min, info.max))

    def encode(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write the code of the 1-D `x` into the uint8 row `out`."""
        if self.kind == "lossless":
            out.copy_(x.contiguous().view(torch.uint8))
            return
        blocks = -(-x.numel() // BLOCK)
        padded = torch.nn.functional.pad(x.float(), (0, blocks * BLOCK - x.numel())).view(blocks, BLOCK)
        top = {"int8": 127.0, "fp8": 448.0, "int4": 7.0, "int2": 1.0}[self.kind]  # the code's largest value
        scale = padded.abs().amax(1, keepdim=True).clamp_min(1e-30) / top
        scaled = padded / scale
        if self.kind == "int8":
            code = scaled.round_().to(torch.int8).view(torch.uint8)
        elif self.kind == "fp8":
            code = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
        else:  # int4 / int2: 2 / 4 values per byte, each stored as value + top + 1 (never negative)
            bits, per = 8 // self._per_byte, self._per_byte
            fields = (scaled.round_() + top + 1).to(torch.uint8)
            code = sum(fields[:, i::per] * (1 << (bits * (per - 1 - i))) for i in range(per)).to(torch.uint8)
        values = code.numel()
        out[:values].copy_(code.flatten())
        out[values:].copy_(scale.flatten().view(torch.uint8))

    def decode(self, data: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The values coded in the uint8 row (or rows) `data`: (..., numel) of `dtype`."""
        if self.kind == "lossless":
            return data.view(dtype)
        blocks = -(-numel // BLOCK)
        per = self._per_byte
        values = blocks * BLOCK // per
        code, scale = data[..., :values], data[..., values:].contiguous().view(torch.float32)
        if per > 1:
            bits, top = 8 // per, {"int4": 7, "int2": 1}[self.kind]
            fields = [(code >> (bits * (per - 1 - i))) & ((1 << bits) - 1) for i in range(per)]
            code = torch.stack(fields, -1).flatten(-2).float() - (top + 1)
        else:
            code = code.view(torch.int8 if self.kind == "int8" else torch.float8_e4m3fn).float()
        values = code.unflatten(-1, (blocks, BLOCK)) * scale.unsqueeze(-1)
        # 127 x (max / 127) may round past the largest finite value: keep within the narrower type's range.
        info = min(torch.finfo(dtype), torch.finfo(values.dtype), key=lambda i: i.max)
        return values.flatten(-2)[..., :numel].clamp(info.min, info.max).to(dtype)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def make_codec(compress: str | None) -> BlockCodec | None:
    """The codec of a `ParallelConfig.compress` value (None: no compression)."""
    if compress is None:
        return None
    return BlockCodec(compress.removeprefix("residual-"), residual=compress.startswith("residual-"))
