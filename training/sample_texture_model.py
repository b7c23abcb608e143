"""Sample one image per class from a trained texture model and save a PNG grid.

Example (from the repository root, one thread)::

    OMP_NUM_THREADS=1 python training/sample_texture_model.py \
        src/distrifusion/data/textures training/samples/grid_256.png --size 256

The grid is one row: classes left to right in label order (see DIR/classes.json).
Uses DDIM with ``--steps`` steps (default 20) and eta 0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image


@torch.no_grad()
def sample(
    model_dir: Path,
    size: int,
    steps: int = 20,
    seed: int = 0,
    classes: list[int] | None = None,
    timestep_spacing: str | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Return uint8 images (N, size, size, 3), one per class, and the class names.

    ``timestep_spacing`` overrides the scheduler's configured spacing when given.
    """
    if size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8, got {size}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet").float().eval()
    sched = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    if timestep_spacing is not None:
        sched = DDIMScheduler.from_config(sched.config, timestep_spacing=timestep_spacing)
    names = json.loads((model_dir / "classes.json").read_text())["classes"]
    labels = list(range(len(names))) if classes is None else classes
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for label in labels:  # one at a time keeps peak memory low at large sizes
        x = torch.randn((1, 3, size, size), generator=gen)
        for t in sched.timesteps:
            eps = unet(x, t, class_labels=torch.tensor([label])).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        out.append(((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    return np.stack(out), [names[i] for i in labels]


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="pipeline folder written by train_texture_model.py")
    p.add_argument("out_png", type=Path, help="output PNG path")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classes", type=int, nargs="*", default=None, help="labels to sample (default: all)")
    p.add_argument(
        "--timestep-spacing",
        choices=["leading", "trailing", "linspace"],
        default=None,
        help="override the scheduler's timestep spacing",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    images, names = sample(args.model_dir, args.size, args.steps, args.seed, args.classes, args.timestep_spacing)
    gap = 4
    n, s = len(images), args.size
    grid = np.full((s, n * s + (n - 1) * gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        grid[:, i * (s + gap) : i * (s + gap) + s] = img
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out_png)
    print(f"wrote {args.out_png} ({', '.join(names)}) in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
