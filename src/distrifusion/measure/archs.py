"""The published architectures that `bench`, `plan` and the command line's checks know by name.

Torch-free on purpose: the command line's argument checks read it before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).parent.parent / "data" / "configs"
"""The folder of the published config files (diffusers config dictionaries, no weights)."""

ARCHS = {
    "sd15": "sd15_unet.json",
    "sd21": "sd21_unet.json",
    "sdxl": "sdxl_unet.json",
    "flux_dev": "flux_dev_transformer.json",
    "sd3_medium": "sd3_medium_transformer.json",
    "pixart_alpha": "pixart_alpha_transformer.json",
    # Wan: the project's shared/configs files, written from the model cards; every key checked against
    # WanTransformer3DModel's signature (diffusers 0.41.0/0.42.1: no unknown key; pos_embed_seq_len, FLF2V
    # only, left at None) and the widths against the Wan team's own configs (wan_t2v_14B, wan_t2v_1_3B,
    # wan_i2v_14B, Wan2.2 wan_ti2v_5B: dim, ffn_dim, heads, layers, patch (1, 2, 2), freq_dim 256, eps 1e-6,
    # qk/cross-attn norms; 2.2 TI2V: VAE stride (4, 16, 16); its 48 latent channels are the model card's, not
    # checked in a config). Built on the meta device they have
    # 14.29B, 1.42B, 16.39B (with the image cross-attention) and 5.00B parameters.
    "wan21_t2v_14b": "wan21_t2v_14b_transformer.json",
    "wan21_t2v_1_3b": "wan21_t2v_1_3b_transformer.json",
    "wan21_i2v_14b": "wan21_i2v_14b_transformer.json",
    "wan22_ti2v_5b": "wan22_ti2v_5b_transformer.json",
    "qwen_image": "qwen_image_transformer.json",
    "flux2_dev": "flux2_dev_transformer.json",
    "flux2_klein": "flux2_klein_transformer.json",
    "sana_1024": "sana_1024_transformer.json",
    "sana_2k": "sana_2k_transformer.json",
    "sana_4k": "sana_4k_transformer.json",
    "z_image": "z_image_turbo_transformer.json",
    # HunyuanVideo-1.5 720p T2V: TRANSFORMER_CONFIGS["720p_t2v"] of diffusers' own conversion script
    # (huggingface/diffusers scripts/convert_hunyuan_video1_5_to_diffusers.py), every key a parameter of
    # HunyuanVideo15Transformer3DModel in 0.41.0 and 0.42.1; 8.33B parameters on the meta device (the model
    # card's 8.3B). LTX-Video 0.9 (2B): LTXVideoTransformer3DModel's defaults (every key checked equal in 0.42.1),
    # the 2B versions' shapes in diffusers' scripts/convert_ltx_to_diffusers.py; 1.92B parameters.
    "hunyuan_video15_720p": "hunyuan_video15_720p_t2v_transformer.json",
    "ltx_video_2b": "ltx_video_2b_transformer.json",
    "sd_vae": "sd_vae.json",
    "sdxl_vae": "sdxl_vae.json",
    "wan21_vae": "wan21_vae.json",
}
"""Each named architecture's config file in `CONFIGS` (where each came from: `CONFIGS / "README.md"`, or
the file's own "_source" entry)."""


def arch_config_path(arch: str) -> Path:
    """The config file of a named architecture, or `arch` itself when it is a path to a .json file."""
    return CONFIGS / ARCHS[arch] if arch in ARCHS else Path(arch)


TEXT_ENCODERS = CONFIGS / "text_encoders"
"""Text encoders' configs (transformers classes, `_config_class` names the configuration), for the memory plan."""


@dataclass(frozen=True)
class Pipeline:
    """What a published pipeline loads beside its denoiser, and how it calls it."""

    vae: str | None
    text_encoders: tuple[str, ...] = ()
    text_tokens: int = 77
    """Tokens each text encoder reads (the pipeline's padded length)."""
    calls_per_step: int = 1
    """Denoiser calls per step: 2 for a pipeline that runs guidance as a second call (true CFG)."""
    experts: int = 1
    """Denoisers of the same shape loaded at once (Wan2.2-A14B: a high-noise and a low-noise expert)."""
    frames: int | None = None
    """Video: frames of the default clip (None: an image model)."""
    size: tuple[int, int] = (1024, 1024)
    """The default (height, width) in pixels."""


PIPELINES = {
    "sd15": Pipeline("sd_vae.json", ("clip_l.json",), size=(512, 512)),
    "sd21": Pipeline("sd_vae.json", ("clip_l.json",), size=(768, 768)),
    "sdxl": Pipeline("sdxl_vae.json", ("clip_l.json", "openclip_bigg.json")),
    "flux_dev": Pipeline("flux_vae.json", ("clip_l.json", "t5_xxl.json"), text_tokens=512),
    "sd3_medium": Pipeline("sd_vae.json", ("clip_l.json", "openclip_bigg.json", "t5_xxl.json"), text_tokens=333),
    "pixart_alpha": Pipeline("sd_vae.json", ("t5_xxl.json",), text_tokens=120),
    "Flux2Transformer2DModel": Pipeline("flux2_vae.json", ("mistral_small_3_1_24b.json",), text_tokens=512),
    "QwenImageTransformer2DModel": Pipeline(
        "qwen_image_vae.json", ("qwen2_5_vl_7b.json",), text_tokens=512, calls_per_step=2, size=(1328, 1328)
    ),
    "WanTransformer3DModel": Pipeline(
        "wan21_vae.json", ("umt5_xxl.json",), text_tokens=512, calls_per_step=2, frames=81, size=(720, 1280)
    ),
}
"""By architecture name, or by the denoiser's class for a config file (PATH.json). The text encoders'
configs (data/configs/text_encoders) were written from the published config files' figures; their
parameter counts match the published ones (CLIP-L 123M, OpenCLIP bigG 695M, T5-XXL encoder 4.76B, UMT5-XXL
encoder 5.68B, Mistral Small 3.1 24.0B, Qwen2.5-VL-7B 8.29B). The Flux.1, Flux.2 and Qwen-Image VAEs are
diffusers' default configs of their classes (Flux.1's with 16 latent channels and no quant convs)."""
