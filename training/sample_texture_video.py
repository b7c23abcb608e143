"""Sample one clip per class from a trained texture video model; save a PNG strip and animated GIFs.

Example (from the repository root, one thread)::

    OMP_NUM_THREADS=1 python training/sample_texture_video.py \
        src/distrifusion/data/textures_video docs/embedded_video_classes.png \
        --frames 17 --size 64 --gif docs/embedded_video_classes.gif

The PNG has one row per class (label order, see DIR/classes.json) and one column per
``--every``-th frame (frames 0, 4, 8, 12, 16 by default). The GIF, if asked for, shows all
classes side by side, every frame. Sampling goes through ``TextureVideoPipeline``
(``distrifusion.app.pipelines``; FlowMatchEuler, ``--steps`` steps), one class at a time with
the seed ``--seed`` each, so a class's clip does not depend on which other classes are drawn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distrifusion.app.pipelines import load_texture_video_pipeline


def sample(
    model_dir: Path,
    frames: int,
    size: int,
    steps: int = 20,
    seed: int = 0,
    classes: list[int] | None = None,
) -> tuple[np.ndarray, list[str], float]:
    """Return uint8 clips (N, frames, size, size, 3), the class names and the seconds per clip-step."""
    pipe = load_texture_video_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(len(pipe.classes))) if classes is None else classes
    out = []
    t0 = time.time()
    for label in labels:
        gen = torch.Generator().manual_seed(seed)
        clip = pipe(label, num_frames=frames, height=size, width=size, num_inference_steps=steps, generator=gen)
        out.append((clip.frames[0] * 255).round().astype(np.uint8))
    per_step = (time.time() - t0) / (len(labels) * steps)
    return np.stack(out), [pipe.classes[i] for i in labels], per_step


def strip(clips: np.ndarray, every: int, gap: int = 4) -> np.ndarray:
    """Grid (rows = clips, columns = every ``every``-th frame) with white gaps, uint8 (H, W, 3)."""
    n, f, s = clips.shape[0], clips.shape[1], clips.shape[2]
    cols = list(range(0, f, every))
    grid = np.full((n * s + (n - 1) * gap, len(cols) * s + (len(cols) - 1) * gap, 3), 255, np.uint8)
    for i in range(n):
        for j, frame in enumerate(cols):
            grid[i * (s + gap) : i * (s + gap) + s, j * (s + gap) : j * (s + gap) + s] = clips[i, frame]
    return grid


def save_gif(clips: np.ndarray, path: Path, scale: int = 2, gap: int = 4, ms_per_frame: int = 100) -> None:
    """Animated GIF of all clips side by side (each magnified ``scale`` times), looping."""
    n, f, s = clips.shape[0], clips.shape[1], clips.shape[2]
    images = []
    for frame in range(f):
        row = np.full((s, n * s + (n - 1) * gap, 3), 255, np.uint8)
        for i in range(n):
            row[:, i * (s + gap) : i * (s + gap) + s] = clips[i, frame]
        img = Image.fromarray(row)
        images.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="pipeline folder written by train_texture_video.py")
    p.add_argument("out_png", type=Path, help="output PNG path")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64, help="height and width in pixels (even)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=4, help="PNG columns: every this many frames")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classes", type=int, nargs="*", default=None, help="labels to sample (default: all)")
    p.add_argument("--scale", type=int, default=2, help="magnify the PNG and GIF this many times (nearest)")
    p.add_argument("--gif", type=Path, default=None, help="also write an animated GIF of all classes here")
    p.add_argument("--npy", type=Path, default=None, help="also save the uint8 clips (N, F, H, W, 3) here")
    args = p.parse_args()
    if min(args.every, args.threads, args.scale) < 1:
        raise ValueError("--every, --threads and --scale must be positive")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    clips, names, per_step = sample(args.model_dir, args.frames, args.size, args.steps, args.seed, args.classes)
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(strip(clips, args.every))
    grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST).save(args.out_png)
    if args.gif is not None:
        save_gif(clips, args.gif, args.scale)
    if args.npy is not None:
        np.save(args.npy, clips)
    print(
        f"wrote {args.out_png} ({', '.join(names)}; {args.frames} frames of {args.size} px) "
        f"in {time.time() - t0:.1f} s, {per_step:.2f} s per clip-step"
    )


if __name__ == "__main__":
    main()
