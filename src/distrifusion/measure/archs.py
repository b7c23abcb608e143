"""The published architectures that `bench`, `plan` and the command line's checks know by name.

Torch-free on purpose: the command line's argument checks read it before any heavy import.
"""

from __future__ import annotations

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
    "sd_vae": "sd_vae.json",
    "sdxl_vae": "sdxl_vae.json",
}
"""Each named architecture's config file in `CONFIGS` (where each came from: `CONFIGS / "README.md"`, or
the file's own "_source" entry)."""


def arch_config_path(arch: str) -> Path:
    """The config file of a named architecture, or `arch` itself when it is a path to a .json file."""
    return CONFIGS / ARCHS[arch] if arch in ARCHS else Path(arch)
