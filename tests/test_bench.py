"""The bench command's measurements and JSON (speed itself is never asserted here)."""

import json
import subprocess
import sys

import pytest
from helpers import CONFIGS


def test_bench_json_fields(tmp_path):
    arch = tmp_path / "tiny_sd15.json"
    arch.write_text(json.dumps({**CONFIGS["sd15"], "sample_size": 8}))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distrifusion",
            "bench",
            "--arch",
            str(arch),
            "--sizes",
            "64",
            "128",
            "--simulate",
            "4",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"].startswith("distrifusion bench --arch")
    small, large = report["results"]
    for row in (small, large):
        assert row["card"].startswith("CPU") and row["diffusers_graph_s"] is None
        for key in (
            "diffusers_eager_s",
            "ours_world1_s",
            "share_step_s",
            "sync_step_s",
            "compute_speedup",
            "bandwidth_needed_GBps",
            "peak_memory_mb",
        ):
            assert row[key] > 0, key
        assert row["ranks"] == 4 and row["cfg_groups"] == 2  # CFG batch of 2: two groups of 2
        assert row["step_bytes"] > 0 and row["sync_step_bytes"] >= row["step_bytes"]
    # Traffic grows with the image: halos with the width, keys/values with the area.
    assert large["step_bytes"] > 2 * small["step_bytes"]
    assert "one rank's share of 4" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| 128x128")]
    assert len(table) == 1 and "| 4 |" in table[0]  # the markdown summary has a row per size


def test_traffic_only_counts_what_a_real_run_sends(tmp_path):
    """The shape-only count (meta device) equals the bytes counted in a real loopback run."""
    import torch

    from distrifusion.measure.bench import bench_step, count_traffic

    arch = tmp_path / "tiny_sd15.json"
    arch.write_text(json.dumps({**CONFIGS["sd15"], "sample_size": 8}))
    counted = count_traffic(str(arch), [128], torch.float32, [4])
    measured = bench_step(str(arch), 128, 128, torch.float32, [4], repeats=1)
    assert counted[0]["step_bytes"] == measured[0]["step_bytes"] > 0
    # Step 0 also has the ranks agree (inputs, refusals, layer count, config, graphs on and stale: 8 float64 from
    # each of the 3 others), which a shape-only run skips.
    assert measured[0]["sync_step_bytes"] - counted[0]["sync_step_bytes"] == 8 * 8 * 3
    out = tmp_path / "traffic.json"
    command = ["bench", "--arch", str(arch), "--sizes", "128", "--simulate", "2", "4", "--traffic-only", "--json"]
    proc = subprocess.run([sys.executable, "-m", "distrifusion", *command, str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["ranks"] for r in rows] == [2, 4] and rows[1]["step_bytes"] == counted[0]["step_bytes"]


@pytest.mark.parametrize(
    "config",
    [
        dict(_class_name="QwenImageTransformer2DModel", in_channels=16, out_channels=4, axes_dims_rope=[4, 6, 6]),
        dict(_class_name="Flux2Transformer2DModel", in_channels=16, num_single_layers=1, axes_dims_rope=[4, 4, 4, 4]),
    ],
    ids=["qwen_image", "flux2"],
)
def test_traffic_only_counts_the_new_families_as_a_real_run(tmp_path, config):
    """Qwen-Image and Flux.2 (tiny widths of the published layouts): the meta-device count is a real run's."""
    import torch

    from distrifusion.measure.bench import bench_step, count_traffic

    arch = tmp_path / "tiny.json"
    width = dict(num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32)
    arch.write_text(json.dumps({**width, **config}))
    counted = count_traffic(str(arch), [256], torch.float32, [4])
    measured = bench_step(str(arch), 256, 256, torch.float32, [4], repeats=1)
    assert counted[0]["step_bytes"] == measured[0]["step_bytes"] > 0
    assert counted[0]["ulysses_step_bytes"] > 0


def test_bench_graphs_on_without_cuda_is_a_clear_error(tmp_path):
    arch = tmp_path / "tiny_sd15.json"
    arch.write_text(json.dumps({**CONFIGS["sd15"], "sample_size": 8}))
    command = ["bench", "--arch", str(arch), "--sizes", "64", "--repeats", "1", "--graphs", "on"]
    proc = subprocess.run([sys.executable, "-m", "distrifusion", *command], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cuda_graphs=True needs a CUDA device" in proc.stderr


TINY_VAE = dict(
    _class_name="AutoencoderKL",
    block_out_channels=[8, 16, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
)


def test_vae_bench_share_of_the_decode(tmp_path):
    """A VAE arch times the decode alone: the whole one, then the largest share of each N."""
    arch = tmp_path / "tiny_vae.json"
    arch.write_text(json.dumps(TINY_VAE))
    out = tmp_path / "vae.json"
    command = ["bench", "--arch", str(arch), "--sizes", "256", "--simulate", "4", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "distrifusion", *command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, share = json.loads(out.read_text())["results"]
    assert (full["ranks"], share["ranks"]) == (1, 4) and full["received_bytes"] == 0 < share["received_bytes"]
    assert full["activation_mb"] > 0 and share["decode_s"] > 0
    # A quarter of the rows: well under half of one process's activations (measured 0.27-0.30).
    assert share["memory_vs_full"] < 0.5


def test_vae_bench_share_only_skips_the_whole_decode(tmp_path):
    """--share-only (a size one device cannot hold) runs the shares alone: no ratio to a whole decode
    that did not run, and a shape-only lower bound on what that decode would need instead."""
    arch = tmp_path / "tiny_vae.json"
    arch.write_text(json.dumps(TINY_VAE))
    out = tmp_path / "vae.json"
    command = ["bench", "--arch", str(arch), "--sizes", "256", "--simulate", "2", "4", "--repeats", "1"]
    command += ["--share-only", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "distrifusion", *command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["ranks"] for r in rows] == [2, 4]
    for row in rows:
        assert row["decode_s"] > 0 and row["activation_mb"] > 0 and row["received_bytes"] > 0
        assert row["time_vs_full"] is None and row["memory_vs_full"] is None
        # At least one conv of the last up block at 256x256: 8 channels in and 8 out, float32.
        assert row["full_min_mb"] >= 2 * 8 * 256 * 256 * 4 / 2**20
    assert "whole decode not run" in proc.stdout and "of the whole decode" not in proc.stdout
    # Not for a denoiser, nor without a share to run.
    for extra in (["--arch", "sd15", "--simulate", "2"], ["--arch", str(arch)]):
        proc = subprocess.run(
            [sys.executable, "-m", "distrifusion", "bench", *extra, "--share-only"], capture_output=True, text=True
        )
        assert proc.returncode == 2 and "--share-only needs a VAE arch" in proc.stderr
