"""Writing a generated video: MP4 (H.264 through imageio's ffmpeg plugin, whose imageio-ffmpeg wheel
bundles an ffmpeg binary), animated WebP or GIF (Pillow), or a folder of PNG frames.

Any pipeline whose output has `.frames`, (batch, frames, height, width, 3) values in [0, 1] (diffusers'
Wan pipelines with output_type="np", an embedded video pipeline), is written by `write_video`.
"""

from __future__ import annotations

import os
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")


def is_frame_folder(out: str) -> bool:
    """Whether `--out` names a folder of frames (an existing folder, or a path ending in a slash)."""
    return out.endswith(("/", os.sep)) or Path(out).is_dir()


def is_video_path(out: str) -> bool:
    return is_frame_folder(out) or Path(out).suffix.lower() in VIDEO_SUFFIXES


def to_uint8(frames):
    """(frames, height, width, 3) floats in [0, 1] (numpy or torch) as a uint8 numpy array."""
    import numpy as np

    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected video frames (frames, height, width, 3), got shape {frames.shape}")
    return (np.clip(frames, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def write_video(frames, out: str | Path, fps: float = 16.0) -> Path:
    """Write (frames, height, width, 3) values in [0, 1] to `out`: .mp4, .webp, .gif, or a folder (PNG
    frames frame_00000.png, ...). A file goes through a temporary name in the same folder, so that an
    interrupted run leaves no half-written video. Returns the path written."""
    from PIL import Image

    pixels = to_uint8(frames)
    if is_frame_folder(str(out)):
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(pixels):
            Image.fromarray(frame).save(folder / f"frame_{i:05d}.png")
        return folder
    out = Path(out)
    suffix = out.suffix.lower()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{out.suffix}")
    try:
        if suffix == ".mp4":
            _write_mp4(pixels, tmp, fps)
        elif suffix in (".webp", ".gif"):
            images = [Image.fromarray(frame) for frame in pixels]
            duration = max(1, round(1000 / fps))  # milliseconds per frame
            extra = {"lossless": True} if suffix == ".webp" else {}
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=duration, loop=0, **extra)
        else:
            raise ValueError(f"unknown video format {suffix!r}; use .mp4, .webp, .gif or a folder/")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_mp4(pixels, path: Path, fps: float) -> None:
    """H.264 in yuv420p (what players expect), which needs even sides: an odd one is padded by one row or
    column (edge pixels repeated). `macro_block_size=2` keeps imageio from resizing to multiples of 16."""
    import imageio.v2 as imageio
    import numpy as np

    height, width = pixels.shape[1:3]
    if height % 2 or width % 2:
        pixels = np.pad(pixels, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    options = dict(fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=2, quality=8)
    with imageio.get_writer(path, format="FFMPEG", mode="I", **options) as writer:
        for frame in pixels:
            writer.append_data(frame)
