"""Video from the command line: `generate --frames N --out X.mp4|.webp|.gif|DIR/` on a tiny random Wan
pipeline folder (saved with save_pretrained), refusals before any work (exit 2, one line), and the
writers (a written video decodes back to the frames and size asked)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cli_input import assert_one_line_error, run_cli
from wan_helpers import HEIGHT, PIXEL_FRAMES, WIDTH, tiny_pipeline

from distrifusion.app import cli_checks
from distrifusion.app.video import write_video


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_wan")
    tiny_pipeline("t2v", dtype=torch.float32).save_pretrained(folder)
    return folder


def _read_mp4(path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path, plugin="FFMPEG")


def test_generate_writes_an_mp4_that_decodes_to_the_frames_and_size_asked(wan_folder, tmp_path):
    """Two ranks (strips of token rows), the diffusers WanPipeline loaded from the folder: 17 frames of
    80 x 48 px."""
    out = tmp_path / "clip.mp4"
    args = ["--model", str(wan_folder), "--nproc", "2", "--frames", str(PIXEL_FRAMES), "--steps", "2"]
    proc, _ = run_cli("generate", *args, "--height", str(HEIGHT), "--width", str(WIDTH), "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out} ({WIDTH}x{HEIGHT}, {PIXEL_FRAMES} frames at 16 fps, split in rows" in proc.stdout
    video = _read_mp4(out)
    assert video.shape == (PIXEL_FRAMES, HEIGHT, WIDTH, 3)
    assert video.std() > 0  # not a blank clip


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--frames", "20"], ["--frames 20: this WanPipeline makes 1 + 4k frames", "use 17 or 21"]),
        (["--height", "72"], ["image height of 72 px must be a multiple of the model's block of 16 px"]),
        (["--nproc", "8"], ["image height of 80 px is too small to split over 8 ranks", "at most 5"]),
        (
            ["--frames", "5", "--nproc", "4", "--video-split", "frames"],
            ["--frames 5 are 2 latent frame(s), too few to split over 4 ranks", "use --frames 13 or more"],
        ),
        (["--out", "clip.avi"], ["unknown video format '.avi'"]),
        (["--show-strips"], ["does not apply to videos"]),
        (["--fps", "0"], ["--fps must be > 0"]),
    ],
)
def test_bad_video_input_is_refused_at_once(wan_folder, tmp_path, args, fragments):
    defaults = {"--height": str(HEIGHT), "--width": str(WIDTH), "--out": str(tmp_path / "clip.mp4")}
    given = [a for k, v in defaults.items() if k not in args for a in (k, v)]
    out = [a if a != "clip.avi" else str(tmp_path / a) for a in args]
    proc, seconds = run_cli("generate", "--model", str(wan_folder), *out, *given)
    assert_one_line_error(proc, seconds, *fragments, pixel_model=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--frames", "17"], ["--frames: the embedded model makes images, not videos"]),
        (["--out", "x.mp4"], ["--out x.mp4: the embedded model makes images"]),
        (["--arch", "wan21_t2v_14b", "--frames", "80", "bench"], ["--frames 80: --arch wan21_t2v_14b makes 1 + 4k"]),
        (["--arch", "sd15", "--frames", "17", "bench"], ["--frames: --arch sd15 is an image model"]),
    ],
)
def test_frames_and_videos_are_for_video_models(args, fragments):
    command = "bench" if args[-1] == "bench" else "generate"
    proc, seconds = run_cli(command, *[a for a in args if a != "bench"])
    assert_one_line_error(proc, seconds, *fragments, pixel_model=False)


def test_wan_geometry_is_read_from_the_config_files(tmp_path):
    """Wan 2.1: 8 px per latent cell, 2 x 2 cells per token, 4 frames per latent frame; Wan 2.2 TI2V's VAE
    16 px: 32 px per token row."""
    for sub in ("transformer", "vae"):
        (tmp_path / sub).mkdir()
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": [1, 2, 2]}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"scale_factor_spatial": 16, "scale_factor_temporal": 4}))
    geo = cli_checks.pipeline_geometry(str(tmp_path), None)
    assert (geo.own_px, geo.block_px, geo.cfg, geo.time_factor, geo.default_frames) == (32, 32, False, 4, 81)
    cli_checks.check_video(geo, 81, 704, 1280, 8, "rows")  # 22 token rows over 8 ranks
    cli_checks.check_video(geo, 29, 64, 64, 8, "frames")  # 8 latent frames
    with pytest.raises(ValueError, match="too few to split over 8 ranks"):
        cli_checks.check_video(geo, 25, 64, 64, 8, "frames")


@pytest.mark.parametrize("suffix", [".webp", ".gif", "/"])
def test_webp_gif_and_frame_folders_decode_to_the_frames_written(tmp_path, suffix):
    from PIL import Image, ImageSequence

    rng = np.random.default_rng(0)
    frames = rng.random((5, 12, 20, 3))
    path = write_video(frames, str(tmp_path / "v") + suffix, fps=8)
    files = [Image.open(p) for p in sorted(path.iterdir())] if suffix == "/" else None
    images = files or ImageSequence.Iterator(Image.open(path))
    pixels = np.stack([np.asarray(im.convert("RGB")) for im in images])  # each frame read before the next seek
    assert pixels.shape == (5, 12, 20, 3)
    expected = (frames * 255 + 0.5).astype(np.uint8)
    if suffix != ".gif":  # lossless WebP and PNG: the same pixels (GIF: a 256-colour palette)
        assert np.array_equal(pixels, expected)


def test_an_mp4_with_odd_sides_is_padded_to_even(tmp_path):
    frames = np.random.default_rng(0).random((3, 11, 21, 3))
    assert _read_mp4(write_video(frames, tmp_path / "odd.mp4")).shape == (3, 12, 22, 3)
