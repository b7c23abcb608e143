"""Sample one image per class from a trained texture DiT and save a PNG grid.

Example (from the repository root, one thread)::

    OMP_NUM_THREADS=1 python training/sample_texture_dit.py \
        src/distrifusion/data/textures_dit docs/embedded_dit_classes.png --size 128

The grid is one row: classes left to right in label order (see DIR/classes.json). Sampling
goes through ``distrifusion.app.pipelines.TextureDiTPipeline`` (FlowMatchEuler, ``--steps`` steps),
one class at a time with the seed ``--seed`` each, so a class's image does not depend on
which other classes are drawn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from distrifusion.app.pipelines import load_texture_dit_pipeline


def sample(
    model_dir: Path, size: int, steps: int = 20, seed: int = 0, classes: list[int] | None = None, shift: float = 0.0
) -> tuple[np.ndarray, list[str], float]:
    """Return uint8 images (N, size, size, 3), the class names and the seconds per step.

    ``shift`` > 0 overrides the scheduler's configured shift.
    """
    pipe = load_texture_dit_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if shift > 0:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    labels = list(range(len(pipe.classes))) if classes is None else classes
    out = []
    t0 = time.time()
    for label in labels:
        gen = torch.Generator().manual_seed(seed)
        image = pipe(label, height=size, width=size, num_inference_steps=steps, generator=gen, output_type="np")
        out.append((image.images[0] * 255).round().astype(np.uint8))
    per_step = (time.time() - t0) / (len(labels) * steps)
    return np.stack(out), [pipe.classes[i] for i in labels], per_step


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="pipeline folder written by train_texture_dit.py")
    p.add_argument("out_png", type=Path, help="output PNG path")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shift", type=float, default=0.0, help="override the scheduler's shift (0: keep)")
    p.add_argument("--classes", type=int, nargs="*", default=None, help="labels to sample (default: all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    images, names, per_step = sample(args.model_dir, args.size, args.steps, args.seed, args.classes, args.shift)
    gap = 4
    n, s = len(images), args.size
    grid = np.full((s, n * s + (n - 1) * gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        grid[:, i * (s + gap) : i * (s + gap) + s] = img
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out_png)
    print(f"wrote {args.out_png} ({', '.join(names)}) in {time.time() - t0:.1f} s, {per_step:.2f} s per image-step")


if __name__ == "__main__":
    main()
