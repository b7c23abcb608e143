"""By hand, not CI: the published Wan 2.1 VAE architecture (`wan21_vae`, random weights, float32) decodes
and encodes one video whole in this process, then split in rows over N ranks (threads with real
all-gathers: `simulate_ranks`), and prints how far each rank's output is from the whole one, relative to
the output's scale (the split is exact up to float reduction order; the issue asks for 1e-5). With
`--float64`, the whole decode and encode also run in float64, and every float32 result (the whole one
and each rank's) is measured against them: float32's own error, which the split's should match.

    PYTHONPATH=src python benchmarks/wan_vae_check.py --height 240 --width 416 --frames 9 --ranks 2 3 \
        --json benchmarks/cpu_wan_vae_check_240x416x9.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import distrifusion
from distrifusion.measure.simulate import simulate_ranks
from distrifusion.measure.workload import build_model, model_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--float64", action="store_true", help="also the whole decode/encode in float64")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    vae = build_model("wan21_vae", torch.float32, torch.device("cpu"))  # random weights: ~0.1% of pixels clamp
    z = model_inputs(vae, args.height, args.width, frames=args.frames)["z"]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, args.frames, args.height, args.width, generator=g) * 2 - 1
    result = dict(vars(args), threads=torch.get_num_threads(), cpu=f"{os.cpu_count()} cores", rows=[])

    def both(model, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        with torch.no_grad():
            start = time.perf_counter()
            decoded = model.decode(z.to(dtype)).sample
            middle = time.perf_counter()
            encoded = model.encode(x.to(dtype)).latent_dist.mean
            return decoded, encoded, middle - start, time.perf_counter() - middle

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    decoded, encoded, decode_s, encode_s = both(vae)
    saturated = (decoded.abs() >= 1).float().mean().item()
    print(f"one process: decode {decode_s:.0f} s, encode {encode_s:.0f} s; {saturated:.2%} clamped", flush=True)
    result["whole"] = dict(decode_s=decode_s, encode_s=encode_s, clamped=saturated)
    exact = None
    if args.float64:
        exact = both(copy.deepcopy(vae).double(), torch.float64)[:2]
        result["whole"].update(
            decode_error_vs_float64=error(decoded, exact[0]), encode_error_vs_float64=error(encoded, exact[1])
        )
        print(result["whole"], flush=True)
    for n in args.ranks:

        def rank(runtime):
            return both(distrifusion.parallelize(copy.deepcopy(vae), runtime=runtime))

        for r, (d, e, ds, es) in enumerate(simulate_ranks(n, rank)):
            row = dict(
                ranks=n,
                rank=r,
                decode_error=error(d, decoded),
                encode_error=error(e, encoded),
                decode_s=ds,
                encode_s=es,
            )
            if exact is not None:
                row.update(decode_error_vs_float64=error(d, exact[0]), encode_error_vs_float64=error(e, exact[1]))
            print(row, flush=True)
            result["rows"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
