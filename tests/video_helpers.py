"""Tiny random-weight HunyuanVideo-1.5 and LTX-Video models and pipelines (no downloads).

Both denoise a latent video of 5 frames x 5 rows x 3 columns (patch 1: as many tokens), so that strips are
uneven for 2 (3+2), 3 (2+2+1) and 4 (2+1+1+1) ranks in rows and in frames alike.

- HunyuanVideo-1.5: `HunyuanVideo15Transformer3DModel` (2 blocks, 1 refiner block) with a prompt of 9 MLLM
  tokens (6 valid), 4 ByT5 tokens (2 valid) and 3 image tokens (zero: text-to-video; random: image-to-video);
  the pipeline `HunyuanVideo15Pipeline` with a tiny Qwen2.5-VL text model behind an in-memory word-level
  tokenizer with a chat template, a tiny ByT5 (T5 encoder, diffusers' byte tokenizer) and a tiny
  `AutoencoderKLHunyuanVideo15` (16x in space, 4x in time: 17 frames of 80 x 48 pixels).
- LTX-Video: `LTXVideoTransformer3DModel` (2 blocks) on packed tokens, text of 7 tokens (5 valid); T2V with
  one timestep per sample, I2V with one per token (0 on the first frame); `LTXPipeline` and
  `LTXImageToVideoPipeline` with a tiny T5 encoder and a tiny `AutoencoderKLLTXVideo` (32x in space, 8x in
  time: 33 frames of 160 x 96 pixels).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel, LTXVideoTransformer3DModel
from wan_helpers import _perturb, tiny_tokenizer

DTYPE = torch.float64
FRAMES, ROWS, COLS = 5, 5, 3  # latent frames, rows, columns (patch 1: tokens)
Z = 4  # latent channels
PROMPT, NEGATIVE = 'a red cat "hi"', "blurry"


# ------------------------------------------------------------------------------------ HunyuanVideo-1.5


def tiny_hunyuan(seed: int = 0, dtype=DTYPE, **overrides) -> HunyuanVideo15Transformer3DModel:
    torch.manual_seed(seed)
    config = dict(
        in_channels=2 * Z + 1,  # latent, image condition, its mask
        out_channels=Z,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=8,
        rope_axes_dim=(4, 4, 4),
        target_size=64,
    )
    config.update(overrides)
    return _perturb(HunyuanVideo15Transformer3DModel(**config).to(dtype).eval())


def _mask(batch: int, tokens: int, valid: int, dtype=DTYPE) -> torch.Tensor:
    mask = torch.zeros(batch, tokens, dtype=dtype)
    mask[:, :valid] = 1
    return mask


def hunyuan_inputs(model, batch: int = 1, seed: int = 1, image: bool = False, frames=FRAMES, rows=ROWS, cols=COLS):
    """One call's conditioning and noisy latent (latent + zero condition + zero mask channels, as the text-to-
    video pipeline makes them); `image`: random image embeddings (image-to-video)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=DTYPE)  # noqa: E731
    latent = rand(batch, Z, frames, rows, cols)
    condition = torch.zeros(batch, cfg.in_channels - Z, frames, rows, cols, dtype=DTYPE)
    return dict(
        hidden_states=torch.cat([latent, condition], 1),
        encoder_hidden_states=rand(batch, 9, cfg.text_embed_dim),
        encoder_attention_mask=_mask(batch, 9, 6),
        encoder_hidden_states_2=rand(batch, 4, cfg.text_embed_2_dim),
        encoder_attention_mask_2=_mask(batch, 4, 2),
        image_embeds=rand(batch, 3, cfg.image_embed_dim) * float(image),  # all zero: text-to-video
    )


def denoise_hunyuan(model, steps: int = 3, image: bool = False, seed: int = 1, **sizes) -> torch.Tensor:
    """Euler flow matching on the bare model, two calls per step (prompt; negative: other text, fewer valid
    tokens) as the pipelines make them."""
    inputs = hunyuan_inputs(model, seed=seed, image=image, **sizes)
    negative = {
        **inputs,
        "encoder_hidden_states": inputs["encoder_hidden_states"].flip(1),
        "encoder_attention_mask": _mask(1, 9, 4),
    }
    x = inputs.pop("hidden_states")
    negative.pop("hidden_states")

    def velocity(x, t):
        t = torch.full((x.shape[0],), t, dtype=x.dtype)  # as the pipelines: the model embeds it in its dtype
        cond = model(hidden_states=x, timestep=t, return_dict=False, **inputs)[0]
        uncond = model(hidden_states=x, timestep=t, return_dict=False, **negative)[0]
        return uncond + 3.0 * (cond - uncond)

    return _euler(velocity, x, steps)


def _euler(velocity, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Flow-matching Euler steps from sigma 1 to 0; `velocity(x, t)` gives the (guided) velocity of the first
    entries of dim 1 (a video latent's latent channels, not its condition; packed tokens: all of them)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = velocity(x, 1000 * s)
            x = torch.cat([x[:, : v.shape[1]] + (s_next - s) * v, x[:, v.shape[1] :]], 1)
    return x


def tiny_qwen_text(vocab: int):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    torch.manual_seed(0)
    config = Qwen2_5_VLTextConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,  # the pipeline takes the third-last layer's states
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    )
    return Qwen2_5_VLTextModel(config).eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}a{% endif %}"
)


def tiny_t5(vocab: int, dim: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=vocab, d_model=dim, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8
    )
    return T5EncoderModel(config).eval()


def tiny_hunyuan_pipeline(dtype=DTYPE):
    """`HunyuanVideo15Pipeline` on tiny components. Its prompt lengths (1000 MLLM, 256 ByT5 tokens, 729 image
    tokens) and the MLLM template's 108 cropped tokens are instance attributes, set small here."""
    from diffusers import AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, HunyuanVideo15Pipeline
    from transformers import ByT5Tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer_2 = ByT5Tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=Z, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=tiny_qwen_text(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=tiny_hunyuan(1),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder_2=tiny_t5(len(tokenizer_2), 8),
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=4.0),
    )
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = 12, 8
    pipe.prompt_template_encode_start_idx, pipe.vision_num_semantic_tokens = 4, 3
    pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_hunyuan_pipeline(pipe, steps: int = 2, seed: int = 0, output_type: str = "latent", **kwargs):
    """A guided call of the tiny pipeline; `kwargs` add to or replace its arguments."""
    arguments = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=16 * ROWS,
        width=16 * COLS,
        num_frames=4 * (FRAMES - 1) + 1,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    return pipe(**{**arguments, **kwargs}).frames


# ------------------------------------------------------------------------------------------- LTX-Video


def tiny_ltx(seed: int = 0, dtype=DTYPE, **overrides) -> LTXVideoTransformer3DModel:
    torch.manual_seed(seed)
    config = dict(
        in_channels=Z,
        out_channels=Z,
        num_attention_heads=2,
        attention_head_dim=12,  # RoPE: inner 24 = 3 axes x 4 frequencies x (cos, sin)
        cross_attention_dim=24,
        num_layers=2,
        caption_channels=16,
    )
    config.update(overrides)
    return _perturb(LTXVideoTransformer3DModel(**config).to(dtype).eval())


def ltx_inputs(model, batch: int = 2, seed: int = 1, frames=FRAMES, rows=ROWS, cols=COLS) -> dict:
    """A CFG batch [negative, prompt] of packed tokens as the pipelines make it: text of 7 tokens, 5 and 4
    valid; the latent's sizes; the pipelines' rope interpolation (frame rate 25, VAE 8x in time, 32x in
    space)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 7, model.config.caption_channels, generator=g, dtype=DTYPE)
    mask = _mask(batch, 7, 5)
    mask[: batch // 2, 4] = 0
    return dict(
        hidden_states=torch.randn(batch, frames * rows * cols, model.config.in_channels, generator=g, dtype=DTYPE),
        encoder_hidden_states=text,
        encoder_attention_mask=mask,
        num_frames=frames,
        height=rows,
        width=cols,
        rope_interpolation_scale=(8 / 25, 32, 32),
    )


def per_token_timestep(t: float, batch: int, frames=FRAMES, rows=ROWS, cols=COLS) -> torch.Tensor:
    """LTXImageToVideoPipeline's timestep: one per token, 0 on the first (conditioning) frame."""
    mask = torch.ones(frames, rows * cols, dtype=DTYPE)
    mask[0] = 0
    return (t * mask).flatten()[None].expand(batch, -1)


def denoise_ltx(model, steps: int = 3, per_token: bool = False, seed: int = 1, **sizes) -> torch.Tensor:
    """Euler flow matching on the bare model with the CFG batch in one call, as the LTX pipelines do."""
    inputs = ltx_inputs(model, seed=seed, **sizes)
    x = inputs.pop("hidden_states")
    grid = (inputs["num_frames"], inputs["height"], inputs["width"])

    def velocity(x, t):
        t = per_token_timestep(t, x.shape[0], *grid) if per_token else torch.full((x.shape[0],), t)
        uncond, cond = model(hidden_states=x, timestep=t, return_dict=False, **inputs)[0].chunk(2)
        return (uncond + 3.0 * (cond - uncond)).repeat(2, 1, 1)  # packed: every token, every channel

    return _euler(velocity, x, steps)


def tiny_ltx_vae():
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        latent_channels=Z,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
    )
    return vae.eval()


def tiny_ltx_pipeline(kind: str = "t2v", dtype=DTYPE):
    """kind "t2v" (`LTXPipeline`) or "i2v" (`LTXImageToVideoPipeline`)."""
    from diffusers import LTXImageToVideoPipeline, LTXPipeline

    tokenizer = tiny_tokenizer()
    cls = LTXPipeline if kind == "t2v" else LTXImageToVideoPipeline
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_ltx_vae(),
        text_encoder=tiny_t5(len(tokenizer), 16),
        tokenizer=tokenizer,
        transformer=tiny_ltx(1),
    )
    pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_frame(dtype=DTYPE):
    """A smooth (1, 3, 160, 96) image in [0, 1] for the image-to-video pipeline."""
    rows = torch.linspace(0, 1, 32 * ROWS, dtype=dtype)[:, None]
    cols = torch.linspace(0, 1, 32 * COLS, dtype=dtype)[None, :]
    return torch.stack(torch.broadcast_tensors(rows * cols, rows, 1 - cols))[None]


def run_ltx_pipeline(pipe, kind: str = "t2v", steps: int = 2, seed: int = 0, **kwargs):
    if kind == "i2v":
        kwargs["image"] = first_frame()
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32 * ROWS,
        width=32 * COLS,
        num_frames=8 * (FRAMES - 1) + 1,
        num_inference_steps=steps,
        guidance_scale=3.0,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).frames


# ------------------------------------------------------------------------------- shared by their tests


def parallel_runs(model, runs: dict, run) -> dict:
    """`run(model, *args)` under each ParallelConfig of `runs` ({key: (config, args)}), the engine removed after
    each: {key: output}."""
    import distrifusion

    out = {}
    for key, (config, args) in runs.items():
        distrifusion.parallelize(model, config)
        out[key] = run(model, *args)
        distrifusion.remove(model)
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def same_on_every_rank(outs: list) -> torch.Tensor:
    assert all(torch.equal(o, outs[0]) for o in outs), "ranks finished with different videos"
    return outs[0]


def check_lossless_codec(monkeypatch, base, run, config: dict) -> None:
    """A lossless codec on the exchange (2 simulated ranks, `run(model)` each) equals uncompressed displaced
    steps exactly, and the keys/values did go through it (tests/test_compress.py)."""
    import copy

    import distrifusion
    from distrifusion.engine.compress import BlockCodec
    from distrifusion.measure.simulate import simulate_ranks

    def videos(config):
        def rank(runtime):
            model = copy.deepcopy(base)
            distrifusion.parallelize(model, config, runtime=runtime)
            return run(model)

        return simulate_ranks(2, rank)

    plain = videos(distrifusion.ParallelConfig(**config))
    coded = []

    class Lossless(BlockCodec):
        def encode(self, x, out):
            coded.append(x.numel())
            super().encode(x, out)

    monkeypatch.setattr("distrifusion.engine.state.make_codec", lambda compress: Lossless("lossless"))
    lossless = videos(distrifusion.ParallelConfig(**config, compress="int8"))
    assert coded
    for a, b in zip(plain, lossless):
        assert torch.equal(a, b)


def displaced_and_naive_psnr(rank_results: dict, reference: torch.Tensor, split: str) -> tuple[float, float]:
    """PSNR (dB) against one process of the ("t2v", split, "displaced"/"naive", "approx") runs of one rank."""
    from helpers import psnr

    return tuple(psnr(rank_results["t2v", split, mode, "approx"], reference) for mode in ("displaced", "naive"))
