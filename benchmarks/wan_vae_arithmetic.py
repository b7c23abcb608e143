"""The Wan VAE decode of a long video, from shapes alone (meta device: no weights, no compute, seconds):
per N, the largest share's peak of live tensor bytes, its floating-point operations and the bytes a rank
receives, against the whole decode on one device. By hand, not CI.

    PYTHONPATH=src python benchmarks/wan_vae_arithmetic.py --sizes 480x832 720x1280 --frames 81 \
        --ranks 1 2 4 8 --dtype bfloat16 --json benchmarks/wan21_vae_decode_arithmetic.json

`--device cpu` runs the same count on real tensors (small sizes: it computes), to compare the live bytes with
the process's measured peak (`distrifusion bench --arch wan21_vae`).

Live bytes are the tensors alive at once (a storage counted from its creation to its release); an allocator
adds its own slack on top (CUDA's caching allocator, a CPU's malloc), and convolution workspaces are not
tensors. So they are the floor of what a device needs, per rank exactly as for one device.
"""

from __future__ import annotations

import argparse
import json
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from distrifusion.engine.config import ParallelConfig
from distrifusion.measure.traffic import counting_loopback_runtime
from distrifusion.measure.workload import build_model, model_inputs
from distrifusion.models import WanVAEAdapter
from distrifusion.parallel.parallelize import parallelize_model, remove


class LiveBytes(TorchDispatchMode):
    """The peak of bytes held by tensor storages created inside it (each counted until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # the storage itself: meta storages all have address 0
                if key not in self.sizes and storage.nbytes():
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)


def measure(vae, inputs: dict, ranks: int, device: torch.device) -> dict:
    counter = {"bytes": 0}
    if ranks > 1:  # this process plays the largest share (rank 0) with loopback collectives
        parallelize_model(vae, ParallelConfig(), counting_loopback_runtime(ranks, device, counter), WanVAEAdapter())
    live, flops = LiveBytes(), FlopCounterMode(display=False)
    with torch.no_grad(), flops, live:
        vae.decode(**inputs)
    if ranks > 1:
        remove(vae)
    tflop = flops.get_total_flops() / 1e12
    return dict(ranks=ranks, live_gib=live.peak / 2**30, tflop=tflop, received_gb=counter["bytes"] / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["480x832", "720x1280"], help="HEIGHTxWIDTH in pixels")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="meta")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vae = build_model("wan21_vae", dtype, device)
    rows = []
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        inputs = model_inputs(vae, height, width, frames=args.frames)
        for n in args.ranks:
            row = dict(height=height, width=width, frames=args.frames, dtype=args.dtype)
            row.update(measure(vae, inputs, n, device))
            whole = next((r for r in rows if r["ranks"] == 1 and r["height"] == height and r["width"] == width), None)
            if whole is not None:
                row["live_vs_whole"] = row["live_gib"] / whole["live_gib"]
                row["tflop_vs_whole"] = row["tflop"] / whole["tflop"]
            print(row, flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
