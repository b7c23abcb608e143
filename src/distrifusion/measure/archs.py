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
    "sd_vae": "sd_vae.json",
    "sdxl_vae": "sdxl_vae.json",
    "wan21_vae": "wan21_vae.json",
}
"""Each named architecture's config file in `CONFIGS`."""


def arch_config_path(arch: str) -> Path:
    """The config file of a named architecture, or `arch` itself when it is a path to a .json file."""
    return CONFIGS / ARCHS[arch] if arch in ARCHS else Path(arch)
