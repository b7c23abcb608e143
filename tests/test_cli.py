"""End to end: the `distrifusion generate` command with real local ranks (gloo, CPU)."""

import subprocess
import sys
import time

import numpy as np
from PIL import Image


def run_cli(*args, timeout=300):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "distrifusion", *args], capture_output=True, text=True, timeout=timeout
    )
    return proc, time.perf_counter() - start


def test_generate_two_ranks_writes_png(tmp_path):
    out = tmp_path / "texture.png"
    proc, _ = run_cli(
        "generate",
        "--nproc",
        "2",
        "--prompt",
        "grass",
        "--height",
        "64",
        "--width",
        "96",
        "--steps",
        "3",
        "--warmup-steps",
        "1",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    image = Image.open(out)
    assert image.size == (96, 64) and image.mode == "RGB"
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 100  # a picture, not a blank


def test_unsplittable_height_fails_on_every_rank_quickly(tmp_path):
    # 8 px is one block of the embedded model; 2 ranks need 16.
    proc, seconds = run_cli(
        "generate",
        "--nproc",
        "2",
        "--height",
        "8",
        "--width",
        "64",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "x.png"),
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("too small to split over 2 ranks; the minimum is 16 rows") == 2, proc.stderr[-3000:]
    # The launcher's summary; whichever rank fails second may already have been stopped by the launcher.
    summary = next(line for line in proc.stderr.splitlines() if line.startswith("distrifusion: failed on rank"))
    assert "(exit 2)" in summary
    assert not (tmp_path / "x.png").exists()
    assert seconds < 90  # process start-up included; a hang would run into the collective timeout


def test_unknown_class_lists_the_classes(tmp_path):
    proc, _ = run_cli(
        "generate", "--prompt", "marble", "--height", "16", "--width", "16", "--out", str(tmp_path / "x.png")
    )
    assert proc.returncode != 0
    assert "unknown class 'marble'" in proc.stderr and "brick" in proc.stderr


def test_quality_command_writes_report(tmp_path):
    proc, _ = run_cli(
        "quality",
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "2",
        "--seeds",
        "1",
        "--ranks",
        "2",
        "--out-dir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "quality.md").read_text()
    assert "| sync (exact) |" in table and "| naive patches |" in table and "N=2 PSNR / SSIM" in table
    assert (tmp_path / "compare_groupnorm_N2.png").exists() and (tmp_path / "quality.json").exists()


def test_generate_loads_a_saved_pipeline_from_a_path(tmp_path):
    """The real loading path (`from_pretrained` on a folder) with a tiny SD pipeline saved here."""
    import torch
    from test_pipelines import tiny_sd

    pipe = tiny_sd().to(torch.float32)
    pipe.save_pretrained(tmp_path / "sd")
    out = tmp_path / "sd.png"
    proc, _ = run_cli(
        "generate",
        "--nproc",
        "2",
        "--model",
        str(tmp_path / "sd"),
        "--prompt",
        "a cat",
        "--height",
        "40",
        "--width",
        "24",
        "--steps",
        "2",
        "--no-split-cfg",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(out).size == (24, 40)
