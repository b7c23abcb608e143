"""GPU check of the memory plan (issue 25): Flux-dev (random weights) in bfloat16 at 1024x1024 on one card,
the peak the CUDA allocator measures against the plan's count (distrifusion.measure.memory), for the whole
step (N = 1) and one rank's share of 2 and 4 (loopback collectives): weights, activations, exchange,
inputs. Passes within 10% (of the whole peak, and of the step's part above the weights).

    python benchmarks/device_memory_check.py [--json benchmarks/gpu_memory_check.json]

Needs a CUDA device with about 30 GB free (Flux-dev's 23.8 GB of weights); exit code 1 when a row is off
by more than 10%, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TOLERANCE = 0.10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="flux_dev")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("device_memory_check: no CUDA device", file=sys.stderr)
        return 2
    from distrifusion.measure.memory import measure_share_memory

    device = torch.device("cuda")
    rows = measure_share_memory(args.arch, args.size, args.size, torch.bfloat16, args.ranks, device)
    failed = False
    for row in rows:
        step_error = (row["step_planned"] - row["step_measured"]) / row["step_measured"]
        ok = abs(row["error"]) <= TOLERANCE and abs(step_error) <= TOLERANCE
        failed |= not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {row['arch']} {args.size}^2 bf16 on {torch.cuda.get_device_name(device)}, "
            f"share of {row['ranks']}: peak {row['measured'] / 1e9:.2f} GB measured, {row['predicted'] / 1e9:.2f} GB "
            f"planned ({row['error']:+.1%}); above the weights {row['step_measured'] / 1e9:.3f} GB measured, "
            f"{row['step_planned'] / 1e9:.3f} GB planned ({step_error:+.1%})",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=torch.cuda.get_device_name(device), rows=rows), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
