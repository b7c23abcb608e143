"""Tiny random-weight Wan models and pipelines (no downloads): WanTransformer3DModel in the shapes of
Wan 2.1 T2V, 2.1 I2V (CLIP image tokens through added K/V), 2.2 TI2V (per-token timestep) and 2.2 A14B
(two experts), with a tiny UMT5 text encoder, an in-memory word-level tokenizer, a tiny AutoencoderKLWan
and, for I2V, a tiny CLIP vision encoder.

Sizes: 5 latent frames x 10 latent rows x 6 latent columns = 5 x 5 x 3 tokens, so strips are uneven
for 2 (3+2), 3 (2+2+1) and 4 (2+1+1+1) ranks in rows (token rows) and in frames alike; 17 frames of
80 x 48 pixels through the tiny VAE (4x in time, 8x in space).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

DTYPE = torch.float64
FRAMES, ROWS, COLS = 5, 10, 6  # latent frames, rows, columns
TEXT_DIM, Z_DIM, IMAGE_DIM = 16, 4, 16
PIXEL_FRAMES, HEIGHT, WIDTH = 4 * (FRAMES - 1) + 1, 8 * ROWS, 8 * COLS
PROMPT, NEGATIVE = "a red cat", "blurry"
TEXT_TOKENS = 512  # the pipelines pad every prompt to 512 tokens (Wan 2.1 I2V splits its context there)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Constant parameters (norm affines, zero inits) perturbed so that every path matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or torch.all(p == p.flatten()[0]):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_wan(kind: str = "t2v", seed: int = 0, dtype=DTYPE, **overrides) -> WanTransformer3DModel:
    """kind "t2v" (2.1 T2V, 2.2 A14B experts), "i2v" (2.1 I2V: latent + mask + condition channels, CLIP
    image tokens through added K/V), "ti2v" (2.2 TI2V: the latent channels only, per-token timestep)."""
    torch.manual_seed(seed)
    heads, head_dim = 2, 12  # RoPE splits a head in 4 frame + 4 row + 4 column channels
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=64,
    )
    if kind == "i2v":
        config.update(in_channels=2 * Z_DIM + 4, image_dim=IMAGE_DIM, added_kv_proj_dim=heads * head_dim)
    config.update(overrides)
    return _perturb(WanTransformer3DModel(**config).to(dtype).eval())


def video_inputs(model, batch: int = 1, seed: int = 1, frames=FRAMES, rows=ROWS, cols=COLS, dtype=DTYPE) -> dict:
    """A noisy video latent and the conditioning of one call (prompt tokens; I2V's image tokens)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    # Wan 2.1 I2V takes the last 512 tokens of its context as the text, the ones before as the image's.
    text = TEXT_TOKENS if cfg.image_dim is not None else 7
    inputs = dict(
        hidden_states=torch.randn(batch, cfg.in_channels, frames, rows, cols, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text, cfg.text_dim, generator=g, dtype=dtype),
    )
    if cfg.image_dim is not None:
        inputs["encoder_hidden_states_image"] = torch.randn(batch, 5, cfg.image_dim, generator=g, dtype=dtype)
    return inputs


def per_token_timestep(model, t: float, batch: int, frames=FRAMES, rows=ROWS, cols=COLS, dtype=DTYPE):
    """Wan 2.2 TI2V's timestep: one per token, 0 on the first (conditioning) frame, `t` elsewhere."""
    p_t, p_h, p_w = model.config.patch_size
    mask = torch.ones(frames // p_t, rows // p_h, cols // p_w, dtype=dtype)
    mask[0] = 0
    return (mask * t).flatten()[None].expand(batch, -1)


def denoise(model, steps: int = 4, per_token: bool = False, batch: int = 1, seed: int = 1, **sizes) -> torch.Tensor:
    """Euler flow matching on the bare model, guided by two calls per step (prompt, negative) as the Wan
    pipelines make them; `per_token`: Wan 2.2 TI2V's (batch, tokens) timestep."""
    inputs = video_inputs(model, batch, seed, **sizes)
    negative = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].flip(1)}
    x = inputs.pop("hidden_states")
    negative.pop("hidden_states")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((batch,), 1000 * s)
            if per_token:
                t = per_token_timestep(model, 1000 * s, batch, *x.shape[2:])
            cond = model(hidden_states=x, timestep=t, return_dict=False, **inputs)[0]
            uncond = model(hidden_states=x, timestep=t, return_dict=False, **negative)[0]
            v = uncond + 3.0 * (cond - uncond)
            # I2V: the model sees latent + mask + condition channels and predicts the latent's.
            x = torch.cat([x[:, : v.shape[1]] + (s_next - s) * v, x[:, v.shape[1] :]], 1)
    return x


# ----------------------------------------------------------------------------- pipelines


def tiny_tokenizer():
    """A word-level fast tokenizer made in memory: each lower-case letter and word piece is a token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz", "a", "red", "cat", "blurry"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(vocab: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=vocab,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    return UMT5EncoderModel(config).eval()


def tiny_vae(z_dim: int = Z_DIM) -> AutoencoderKLWan:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    return vae.eval()


def tiny_clip_vision():
    """A tiny CLIP vision encoder (32 px, 16 px patches: 1 + 4 tokens of IMAGE_DIM) and its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=IMAGE_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config).eval(), processor


def tiny_pipeline(kind: str = "t2v", dtype=DTYPE):
    """kind: "t2v" (WanPipeline), "a14b" (WanPipeline with two experts, boundary at 0.5), "i2v"
    (WanImageToVideoPipeline with CLIP image tokens), "ti2v" (WanImageToVideoPipeline, expand_timesteps:
    the 2.2 TI2V per-token timestep, the first frame given)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    tokenizer = tiny_tokenizer()
    common = dict(
        tokenizer=tokenizer,
        text_encoder=tiny_text_encoder(len(tokenizer)),
        vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    if kind == "t2v":
        pipe = WanPipeline(transformer=tiny_wan("t2v", 1), **common)
    elif kind == "a14b":
        experts = dict(transformer=tiny_wan("t2v", 1), transformer_2=tiny_wan("t2v", 2))
        pipe = WanPipeline(**experts, boundary_ratio=0.5, **common)
    elif kind == "i2v":
        encoder, processor = tiny_clip_vision()
        transformer = tiny_wan("i2v", 1)
        pipe = WanImageToVideoPipeline(
            transformer=transformer, image_encoder=encoder, image_processor=processor, **common
        )
    elif kind == "ti2v":
        pipe = WanImageToVideoPipeline(transformer=tiny_wan("ti2v", 1), expand_timesteps=True, **common)
    else:
        raise ValueError(kind)
    pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_frame(dtype=DTYPE):
    """A smooth (1, 3, HEIGHT, WIDTH) image in [0, 1] for the image-to-video pipelines."""
    rows = torch.linspace(0, 1, HEIGHT, dtype=dtype)[:, None]
    cols = torch.linspace(0, 1, WIDTH, dtype=dtype)[None, :]
    return torch.stack(torch.broadcast_tensors(rows * cols, rows, 1 - cols))[None]


def text_embeddings(pipe, text: str, length: int) -> torch.Tensor:
    """The prompt's UMT5 embeddings as the Wan pipelines make them (padded to `length`, zero past the
    prompt). Given to the image-to-video pipeline as `prompt_embeds`: its prompt cleaning needs ftfy
    (diffusers 0.41/0.42 call it unguarded there), which is not a dependency."""
    tokens = pipe.tokenizer([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    out[:, int(tokens.attention_mask.sum()) :] = 0
    return out.to(pipe.transformer.dtype)


def run_pipeline(pipe, kind: str, steps: int = 3, seed: int = 0, output_type: str = "latent", **kwargs):
    """A guided call (prompt and negative prompt: two model calls per step). Text of 16 tokens, but for
    Wan 2.1 I2V, whose attention takes the last 512 tokens of its context as the text."""
    length = TEXT_TOKENS if kind == "i2v" else 16
    if kind in ("i2v", "ti2v"):
        kwargs["image"] = first_frame()
        kwargs["prompt_embeds"] = text_embeddings(pipe, PROMPT, length)
        kwargs["negative_prompt_embeds"] = text_embeddings(pipe, NEGATIVE, length)
    else:
        kwargs.update(prompt=PROMPT, negative_prompt=NEGATIVE, max_sequence_length=length)
    return pipe(
        height=HEIGHT,
        width=WIDTH,
        num_frames=PIXEL_FRAMES,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        **kwargs,
    ).frames
