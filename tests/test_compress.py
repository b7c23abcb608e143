"""Compressed displaced exchange (`ParallelConfig.compress`): the codecs' error bounds, error
feedback that keeps receivers' copies from drifting, exactness where nothing is compressed
(synchronous steps; a lossless codec through the residual path), and the bytes saved."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import BLOCK, denoise, tiny_model

import distrifusion
from distrifusion.engine.compress import BLOCK as CODEC_BLOCK
from distrifusion.engine.compress import BlockCodec
from distrifusion.engine.exchange import Exchange
from distrifusion.measure.simulate import LoopbackCommunicator, simulate_ranks

HEIGHT, WIDTH = 5 * BLOCK, 3 * BLOCK


def _roundtrip(codec: BlockCodec, x: torch.Tensor) -> torch.Tensor:
    wire = torch.empty(codec.encoded_bytes(x.numel(), x.dtype), dtype=torch.uint8)
    codec.encode(x, wire)
    return codec.decode(wire, x.numel(), x.dtype)


HALF_STEP = {"int8": 0.5 / 127, "fp8": 1 / 16, "int4": 0.5 / 7, "int2": 0.5}
"""A code's largest error, as a fraction of its block's largest magnitude."""


@pytest.mark.parametrize("kind,bound", [*HALF_STEP.items(), ("lossless", 0.0)])
def test_codec_error_is_bounded_per_block(kind, bound):
    """int8: half a step of the block's scale; fp8 e4m3: 3 mantissa bits (1/16 of the block's
    largest value at most, counting its subnormals); lossless: the bytes themselves."""
    x = torch.randn(3 * CODEC_BLOCK + 17, dtype=torch.float32) * torch.logspace(-3, 2, 3 * CODEC_BLOCK + 17)
    codec = BlockCodec(kind)
    y = _roundtrip(codec, x)
    padded = torch.nn.functional.pad(x, (0, 4 * CODEC_BLOCK - x.numel())).view(4, CODEC_BLOCK)
    block_max = padded.abs().amax(1).repeat_interleave(CODEC_BLOCK)[: x.numel()]
    assert ((y - x).abs() <= bound * block_max * (1 + 1e-6)).all()
    if kind != "lossless":
        n = 64 * CODEC_BLOCK  # whole blocks: ~3.9x (int4: 7.5x, int2: 14x) fewer bytes than float32
        assert codec.encoded_bytes(n, torch.float32) * {"int4": 7.4, "int2": 13.9}.get(kind, 3.8) < n * 4


@pytest.mark.parametrize("kind", list(HALF_STEP))
def test_error_feedback_keeps_copies_from_drifting(kind):
    """A payload that drifts for 60 steps, then stays: with residual coding the receivers' copy
    equals the sender's record bitwise, stays within one step's coding error of the truth while
    it drifts, and converges to it once it stops; without residual coding the error stays."""
    torch.manual_seed(0)
    results = {}
    for residual in (False, True):
        exchange = Exchange(LoopbackCommunicator(2, rank=0), 1 << 20, BlockCodec(kind, residual=residual))
        x = torch.randn(8192)
        exchange.gather_now("kv", x.clone())
        exchange.flush()
        errors = []
        for step in range(100):
            if step < 60:
                x = x + 0.05 * torch.randn(8192)
            exchange.swap("kv", x.clone())
            exchange.flush()
            copy_of_mine = exchange.view("kv")[1]  # loopback: the other row is what receivers hold of ours
            if residual:
                assert torch.equal(copy_of_mine, exchange._sent[0])
            errors.append((copy_of_mine - x).abs().max().item())
        results[residual] = errors
    # The change coded each step is the drift (~N(0, 0.05²), < 0.3) plus the last step's error e, so
    # e <= c (0.3 + e), e <= c / (1 - c) * 0.3 for a code whose error is c of the block's largest value.
    c = HALF_STEP[kind]
    step_bound = c / (1 - c) * 0.05 * 6
    assert max(results[True][:60]) < step_bound
    assert results[True][-1] < 1e-3 * results[False][-1]  # converged; plain coding keeps its error
    assert results[False][-1] > 1e-3


def _images(world: int, config: distrifusion.ParallelConfig, steps: int = 6) -> list[torch.Tensor]:
    base = tiny_model("sdxl")

    def rank(runtime):
        model = copy.deepcopy(base)
        distrifusion.parallelize(model, config, runtime=runtime)
        return denoise(model, "sdxl", HEIGHT, WIDTH, steps=steps)

    return simulate_ranks(world, rank)


def test_residual_path_with_a_lossless_codec_is_uncompressed_displaced(monkeypatch):
    """The residual bookkeeping alone (a lossless codec) changes nothing but float rounding of the
    subtraction and addition (float64: 1e-12 of the scale is far above it, far below any error).
    2 ranks: their strips' payloads are large enough to be coded (3 ranks' are not, here)."""
    config = dict(mode="displaced", warmup_steps=1, split_cfg=False)
    plain = _images(2, distrifusion.ParallelConfig(**config))
    coded = []

    class CountingLossless(BlockCodec):
        def encode(self, x, out):
            coded.append(x.numel())
            super().encode(x, out)

    monkeypatch.setattr(
        "distrifusion.engine.state.make_codec", lambda compress: CountingLossless("lossless", residual=True)
    )
    lossless = _images(2, distrifusion.ParallelConfig(**config, compress="residual-int8"))
    assert len(coded) > 10, "the residual path must have run"
    for a, b in zip(plain, lossless):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_residual_codes_survive_float16_swings_and_non_finite_values():
    """A float16 payload swinging from +40000 to -40000 (a change float16 cannot hold) stays finite on
    the receivers, and a NaN that reaches a payload once is gone from their copy a step later (residual
    codes add to the copy: a NaN there would otherwise stay for the rest of the image)."""
    exchange = Exchange(LoopbackCommunicator(2, rank=0), 1 << 20, BlockCodec("int8", residual=True))
    x = torch.full((8192,), 40000.0, dtype=torch.float16)
    exchange.gather_now("kv", x.clone())
    exchange.flush()
    for value in [-40000.0, 40000.0, float("nan"), 1.0, 2.0]:
        x = torch.full((8192,), value, dtype=torch.float16)
        exchange.swap("kv", x.clone())
        exchange.flush()
        received = exchange.view("kv")[1]  # loopback: what the receivers hold of this rank's row
        if value == value:  # finite steps: the copy is right (within int8's half step of the value)
            assert torch.isfinite(received).all() and (received - value).abs().max() <= abs(value) / 254 + 1e-3
        assert torch.equal(received, exchange._sent[0]) or not torch.isfinite(received).all()


def test_int8_decodes_the_largest_float32_as_finite():
    big = torch.finfo(torch.float32).max
    y = _roundtrip(BlockCodec("int8"), torch.tensor([big, -big, 1.0]))
    assert torch.isfinite(y).all() and y[0] > 0.99 * big


def _transformer_images(family: str, config: distrifusion.ParallelConfig) -> list[torch.Tensor]:
    from transformer_helpers import denoise as denoise_tokens
    from transformer_helpers import tiny_transformer

    base = tiny_transformer(family)

    def rank(runtime):
        model = copy.deepcopy(base)
        distrifusion.parallelize(model, config, runtime=runtime)
        # Flux 48 x 16 tokens, SD3 16 x 16 patches (its largest position table): strips' keys/values get coded;
        # 16 x 16 reference tokens (Qwen-Image-Edit, Flux.2): theirs too, sharded or not. Qwen-Image's text
        # mask (one padded prompt) travels beside sharded text, uncoded (too small).
        rows = 48 if family in ("flux", "qwen_edit", "flux2_ref") else 16
        return denoise_tokens(model, family, rows, 16, batch=1, steps=5, ref=16)

    return simulate_ranks(2, rank)


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_edit", "flux2_ref"])
@pytest.mark.parametrize("text_tokens", ["sharded", "replicated"])
def test_lossless_codec_is_uncompressed_displaced_for_transformers(monkeypatch, family, text_tokens):
    """A coded buffer is decoded only when the next step waits for it, so a lossless codec shows whether
    the uncompressed path ever reads another rank's row after this step's gather has started: with
    sharded text, joint attention read its image keys from the exchange buffer after the text's
    exchange call had sent that buffer off (fresh rows could land in a displaced step)."""
    config = dict(mode="displaced", warmup_steps=1, split_cfg=False, text_tokens=text_tokens)
    plain = _transformer_images(family, distrifusion.ParallelConfig(**config))
    coded = []

    class Lossless(BlockCodec):
        def encode(self, x, out):
            coded.append(x.numel())
            super().encode(x, out)

    monkeypatch.setattr("distrifusion.engine.state.make_codec", lambda compress: Lossless("lossless"))
    lossless = _transformer_images(family, distrifusion.ParallelConfig(**config, compress="int8"))
    assert coded  # the keys/values did go through the codec
    for a, b in zip(plain, lossless):
        assert torch.equal(a, b)


def test_sync_steps_are_never_compressed():
    sync = _images(2, distrifusion.ParallelConfig(mode="sync", split_cfg=False))
    compressed = _images(2, distrifusion.ParallelConfig(mode="sync", split_cfg=False, compress="int8"))
    for a, b in zip(sync, compressed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compress", ["int8", "fp8", "residual-int8", "residual-fp8", "residual-int4"])
def test_compressed_displaced_stays_close_to_uncompressed(compress):
    config = dict(mode="displaced", warmup_steps=1, split_cfg=False)
    plain = _images(2, distrifusion.ParallelConfig(**config))
    compressed = _images(2, distrifusion.ParallelConfig(**config, compress=compress))
    for a, b in zip(plain, compressed):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_compress_setting_is_validated():
    with pytest.raises(ValueError, match="compress"):
        distrifusion.ParallelConfig(compress="zip")
