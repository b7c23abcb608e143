"""What one SANA layer sends per step, counted (meta device: shapes only, any machine, seconds):

    python benchmarks/sana_layer_bytes.py [--arch sana_4k] [--dtype bfloat16] [--sizes 1024 2048 4096] [--ranks 8]

Prints, per image size, the bytes of this rank's payload in each exchange of one layer (each other rank
of its CFG group receives them): the linear attention's per-head sums (float32 whatever the model's
dtype, as diffusers computes them) and the Mix-FFN conv's halo rows, counted at `ParallelState.context`
(`distrifusion.measure.traffic.layer_payloads`) on the published widths with 2 of the layers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from distrifusion.measure.archs import arch_config_path
from distrifusion.measure.traffic import layer_payloads
from distrifusion.measure.workload import build_model, model_inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sana_4k")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ranks", type=int, default=8)
    args = parser.parse_args()
    config = json.loads(arch_config_path(args.arch).read_text())
    config["num_layers"] = 2  # every layer is alike; the widths are the published ones
    path = Path(tempfile.mkdtemp()) / "sana.json"
    path.write_text(json.dumps(config))
    model = build_model(str(path), getattr(torch, args.dtype), torch.device("meta"))
    print(f"{args.arch}, {args.dtype}, {args.ranks} ranks (CFG batch of 2 split over 2 groups): bytes per layer call")
    for size in args.sizes:
        sent = layer_payloads(model, model_inputs(model, size, size), args.ranks)
        attention = sent["transformer_blocks.0.attn1"]
        halo = sent["transformer_blocks.0.ff.conv_depth"]
        print(f"{size}x{size} px: linear attention sums {attention:,} B, Mix-FFN halo rows {halo:,} B", flush=True)


if __name__ == "__main__":
    main()
