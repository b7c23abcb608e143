"""The command line refuses bad input before any work: one line, no traceback, exit code 2, at once
(nothing heavy is imported before the checks). Issue 11's table, one row per test (the rows that
need real ranks, Ctrl-C and a stopped rank, are in test_cli.py)."""

import json
import os
import subprocess
import sys
import time

import pytest

from distrifusion.app import cli, cli_checks


def run_cli(*args, env=None, timeout=60):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "distrifusion", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc, time.perf_counter() - start


def assert_one_line_error(proc, seconds, *fragments, pixel_model=True):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and proc.stdout == "", proc.stderr[-3000:]
    assert lines[0].startswith("distrifusion: error: ") and lines[0].count("distrifusion:") == 1
    assert "Traceback" not in proc.stderr
    assert "latent" not in proc.stderr or not pixel_model  # the embedded models work on pixels
    for fragment in fragments:
        assert fragment in lines[0]
    assert seconds < 20


@pytest.mark.parametrize(
    "args, fragments",
    [
        # `generate --height 100` (1 process): was a traceback (sizes of tensors must match)
        (
            ["--height", "100"],
            ["image height of 100 px must be a multiple of the model's block of 8 px", "use 96 or 104"],
        ),
        (
            ["--height", "100", "--nproc", "2"],
            ["image height of 100 px must be a multiple of the model's block of 8 px"],
        ),
        (
            ["--model", "embedded-dit", "--height", "15"],
            ["image height of 15 px must be a multiple of the model's block of 2 px"],
        ),
        # `--height 0`: was silently 1024
        (["--height", "0"], ["image height must be positive, got 0 px"]),
        # `--width -8`: was a traceback (negative dimension)
        (["--width", "-8"], ["image width must be positive, got -8 px"]),
        # `--steps 0`: was ZeroDivisionError with 1 and 2 ranks
        (["--steps", "0"], ["--steps must be >= 1, got 0"]),
        (["--steps", "0", "--nproc", "2"], ["--steps must be >= 1, got 0"]),
        # `--nproc 64 --height 256`: launched 64 processes
        (
            ["--nproc", "64", "--height", "256"],
            ["too small to split over 64 ranks; the minimum is 512 px", "at most 32"],
        ),
        (["--nproc", "2", "--height", "8"], ["too small to split over 2 ranks; the minimum is 16 px"]),
        # `--out /nonexistent/dir/x.png`: refused only after the whole image
        (["--out", "/nonexistent/dir/x.png"], ["output folder /nonexistent/dir does not exist"]),
        (["--out", "x.foo"], ["unknown image format '.foo'"]),
        # every numeric option in range; unknown classes before any weight is loaded
        (["--warmup-steps", "-1"], ["--warmup-steps must be >= 0, got -1"]),
        (["--guidance-scale", "inf"], ["--guidance-scale must be a finite number"]),
        (["--timeout", "0"], ["--timeout must be > 0, got 0"]),
        (["--nproc", "0"], ["--nproc must be >= 1, got 0"]),
        (["--prompt", "marble"], ["unknown class 'marble'", "brick"]),
        (["--model", "./no/such/folder"], ["model folder ./no/such/folder does not exist"]),
        (["--height", "abc"], ["argument --height: invalid int value: 'abc'"]),
    ],
)
def test_generate_refuses_bad_input_at_once(tmp_path, args, fragments):
    out = ["--out", str(tmp_path / "x.png")] if "--out" not in args else []
    proc, seconds = run_cli("generate", *args, *out)
    assert_one_line_error(proc, seconds, *fragments)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["bench", "--repeats", "0"], ["--repeats must be >= 1, got 0"]),
        (["bench", "--sizes", "100"], ["image height of 100 px must be a multiple of 8 px"]),
        (["bench", "--sizes", "256", "--simulate", "16"], ["too small to split over 8 ranks (16 ranks, CFG"]),
        (["bench", "--arch", "nope"], ["unknown architecture 'nope'"]),
        (
            ["bench", "--arch", "qwen_image", "--sizes", "1000"],
            ["1000 px must be a multiple of the model's block of 16 px", "token row"],
        ),
        (["bench", "--arch", "flux2_klein", "--sizes", "64", "--simulate", "8"], ["the minimum is 128 px"]),
        (["quality", "--ranks", "8", "--height", "32"], ["too small to split over 8 ranks; the minimum is 64 px"]),
        (["quality", "--seeds", "0"], ["--seeds must be >= 1, got 0"]),
        (["quality", "--model", "embedded-dit", "--height", "4"], ["too small for SSIM's 7x7 window"]),
    ],
)
def test_bench_and_quality_refuse_bad_input_at_once(args, fragments):
    proc, seconds = run_cli(*args)
    assert_one_line_error(proc, seconds, *fragments, pixel_model=args[0] == "quality")


def test_help_is_quick():
    """`distrifusion --help` imported torch and diffusers first (8-10 s)."""
    for args in (["--help"], ["generate", "--help"]):
        proc, seconds = run_cli(*args)
        assert proc.returncode == 0 and "usage: distrifusion" in proc.stdout
        assert seconds < 3, seconds
    probe = "import sys, distrifusion.app.cli; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_bench_help_says_what_applies_and_what_it_costs():
    proc, _ = run_cli("bench", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for fragment in ("whole images (3)", "--steps STEPS denoising steps per image", "The default run on a CPU"):
        assert fragment in text


def test_under_torchrun_only_rank_0_reports_bad_input():
    env = dict(WORLD_SIZE="2", LOCAL_RANK="0", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc, seconds = run_cli("generate", "--height", "100", env=env)
    assert_one_line_error(proc, seconds, "image height of 100 px")
    proc, _ = run_cli("generate", "--height", "100", env=dict(env, LOCAL_RANK="1", RANK="1"))
    assert proc.returncode == 2 and proc.stderr == "" and proc.stdout == ""


def test_launcher_reports_an_error_of_every_rank_once(capfd):
    """Ranks that all fail alike (here the checks, which each rank repeats) give one line, no rank named
    (was: "distrifusion: error on rank 0: distrifusion: ..." once per rank)."""
    start = time.perf_counter()
    code = cli.launch(2, ["generate", "--height", "100", "--out", os.devnull + ".png"])
    captured = capfd.readouterr()
    assert code == 2
    assert captured.err.splitlines() == [
        "distrifusion: error: image height of 100 px must be a multiple of the model's block of 8 px "
        "(the embedded model: the UNet halves the image 3 times); use 96 or 104"
    ]
    assert time.perf_counter() - start < 20


def test_notes_for_options_without_effect(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli_checks, "_cuda_likely", lambda: False)
    args = cli.build_parser().parse_args(["generate", "--nproc", "4", "--height", "64", "--guidance-scale", "3"])
    notes = cli.check(args)
    assert any("4 ranks on 2 CPU cores" in n for n in notes)
    assert any("--guidance-scale has no effect on the embedded models" in n for n in notes)
    args = cli.build_parser().parse_args(["bench", "--sizes", "256", "--simulate", "2", "--steps", "2"])
    assert any("--steps applies to --nproc's whole images only" in n for n in cli.check(args))


def test_pipeline_sizes_are_checked_from_its_config_files(tmp_path):
    """A diffusers pipeline folder: the latent factor (the VAE's 8 px) times the model's block, read from
    the config files alone; with CFG on an even world the rows are split over half the ranks."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"down_block_types": ["A"] * 4, "sample_size": 64}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
    geo = cli.pipeline_geometry(str(tmp_path), None)
    assert (geo.own_px, geo.block_px, geo.cfg, geo.default_px) == (8, 64, True, 512)
    assert cli.check_image_size(geo, 128, 72, 4) == 2  # two CFG groups of two
    with pytest.raises(ValueError, match="image height of 520 px must be a multiple of the model's block of 64 px"):
        cli.check_image_size(geo, 520, 512, 2)
    with pytest.raises(ValueError, match="8 latent rows of 8 px"):
        cli.check_image_size(geo, 520, 512, 2)
    cli.check_image_size(geo, 520, 512, 1)  # one process: the UNet takes any multiple of 8 px
    with pytest.raises(ValueError, match="too small to split over 4 ranks"):
        cli.check_image_size(geo, 128, 128, 4, split_cfg=False)


def test_strip_boundaries_follow_the_engine_split():
    from distrifusion.engine.state import Partition, split_rows

    plan = Partition(1, 20, 8, 1, 0, 0, split_rows(20, 4, 3), block=4)  # 20 rows in blocks of 4: 8, 8, 4
    assert cli.strip_boundaries(160, plan) == [64, 128]  # 8 px per row
    assert cli.strip_boundaries(160, Partition(2, 20, 8, 2, 0, 0, (20,), block=4)) == []  # CFG halves: no strips
