"""The embedded video model (`generate --model embedded-video`): a pixel-space WanTransformer3DModel trained
by training/train_texture_video.py, shipped in the package. Its defaults are the size it was trained at, a
clip written by generate decodes back to the frames and size asked, its strips (rows or frames) in sync mode
equal one process, and quality and plan (images only) refuse it at once."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_cli_input import assert_one_line_error, run_cli

from distrifusion.app import cli, cli_checks
from distrifusion.app.pipelines import EMBEDDED_VIDEO, TextureVideoPipeline, load_pipeline
from distrifusion.engine.config import ParallelConfig
from distrifusion.measure.simulate import simulate_ranks
from distrifusion.parallel.parallelize import parallelize, remove


def _read_mp4(path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path, plugin="FFMPEG")


@pytest.fixture(scope="module")
def pipe() -> TextureVideoPipeline:
    pipe = load_pipeline("embedded-video")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_default_clip_is_the_size_the_model_was_trained_at():
    """64 x 64 px, 17 frames: the largest clips of training (classes.json's cycle, "64x17x1")."""
    assert cli_checks.EMBEDDED["embedded-video"] == EMBEDDED_VIDEO
    geo = cli_checks.embedded_geometry("embedded-video", EMBEDDED_VIDEO)
    assert (geo.default_px, geo.default_frames, geo.time_factor, geo.own_px, geo.cfg) == (64, 17, 1, 2, False)
    trained = json.loads((EMBEDDED_VIDEO / "classes.json").read_text())["trained"]
    assert f"{geo.default_px}x{geo.default_frames}x" in trained["cycle"]
    args = cli.build_parser().parse_args(["generate", "--model", "embedded-video"])
    cli_checks.check_generate(args)
    assert (args.height, args.width, args.frames, args.out) == (64, 64, 17, "video.mp4")


def test_generate_in_one_process_writes_an_mp4_of_the_frames_and_size_asked(tmp_path, capsys):
    """The fast variant of the two-rank test below: one process, the CLI's own code path."""
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--model", "embedded-video", "--prompt", "brick", "--frames", "5", "--steps", "2"]
    assert cli.main([*argv, "--height", "16", "--width", "24", "--out", str(out)]) == 0
    assert f"wrote {out} (24x16, 5 frames at 16 fps" in capsys.readouterr().out
    video = _read_mp4(out)
    assert video.shape == (5, 16, 24, 3) and video.std() > 0


@pytest.mark.slow
def test_generate_on_two_gloo_ranks_writes_an_mp4_of_the_frames_and_size_asked(tmp_path):
    """Two processes (~40 s on a loaded 2-core CPU, mostly start-up), strips of token rows; the progress
    bar counts the steps."""
    out = tmp_path / "clip.mp4"
    args = ["--model", "embedded-video", "--nproc", "2", "--frames", "5", "--steps", "2", "--prompt", "grass"]
    proc, _ = run_cli("generate", *args, "--height", "16", "--width", "24", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out} (24x16, 5 frames at 16 fps, split in rows, 2 steps, displaced, 2 ranks)" in proc.stdout
    assert "2/2" in proc.stderr  # per-step progress
    video = _read_mp4(out)
    assert video.shape == (5, 16, 24, 3) and video.std() > 0


@pytest.mark.parametrize("split, mode", [("rows", "sync"), ("frames", "sync"), ("rows", "naive")])
def test_sync_strips_of_the_trained_model_equal_one_process(pipe, split, mode):
    """Three simulated ranks, uneven strips (10 token rows or 5 frames over 3), float32: sync mode is exact
    up to float32 rounding of the split matrix products (QUALITY.md: 154 dB, RMS ~2e-8; asserted 1e-5). Naive patches
    (no context from the other strips) are far from it: the split is real."""
    shape = dict(num_frames=5, height=20, width=16, num_inference_steps=2, output_type="pt")
    reference = pipe("ihc", generator=torch.Generator().manual_seed(3), **shape).frames
    replicas = [copy.deepcopy(pipe) for _ in range(3)]

    def rank_fn(runtime):
        replica = replicas[runtime.rank]
        parallelize(replica, ParallelConfig(mode=mode, video_split=split), runtime=runtime)
        try:
            return replica("ihc", generator=torch.Generator().manual_seed(3), **shape).frames
        finally:
            remove(replica)

    clips = simulate_ranks(3, rank_fn)
    for clip in clips:
        assert clip.shape == reference.shape
        error = (clip - reference).abs().max()
        assert error < 1e-5 if mode == "sync" else error > 1e-2, error


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["generate", "--prompt", "lighthouse"], ["unknown class 'lighthouse'", "brick, grass, gravel"]),
        (["generate", "--height", "8", "--nproc", "8"], ["too small to split over 8 ranks"]),
        (["generate", "--height", "15"], ["image height of 15 px must be a multiple"]),
        (["generate", "--out", "x.png"], ["--out x.png"]),
        (["quality"], ["quality is for image models; the embedded video model makes videos"]),
        (["plan"], ["plan --model is for image models"]),
    ],
)
def test_bad_input_for_the_embedded_video_model_is_refused_at_once(args, fragments, tmp_path):
    out = ["--out", str(tmp_path / "x.mp4")] if args[0] == "generate" and "--out" not in args else []
    proc, seconds = run_cli(args[0], "--model", "embedded-video", *args[1:], *out)
    assert_one_line_error(proc, seconds, *fragments)
    assert not list(tmp_path.iterdir())
