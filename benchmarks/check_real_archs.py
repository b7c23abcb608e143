"""Parity on the published UNet architectures (random weights, float32): N simulated ranks against one
process. Too heavy for CI (an SDXL UNet is 10 GB in float32); run by hand on a machine with ~24 GB:

    python benchmarks/check_real_archs.py [sd15 sd21 sdxl] [--ranks 2 3]

The ranks are threads whose models share one copy of the weights. Checked: sync mode (exact patch
parallelism) over a few steps, and displaced steps on an unchanged input (the previous step's
context then equals the fresh one, so they must be exact too). Prints the max error relative to the
output's scale; float32 reduction order alone gives ~1e-6.
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import torch

import distrifusion
from distrifusion.bench import build_unet, unet_inputs
from distrifusion.simulate import simulate_ranks


def shared_copy(model):
    """A copy of `model` whose parameters and buffers are the original's tensors (no extra memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def calls(unet, sample, kwargs, timesteps):
    with torch.no_grad():
        return [unet(sample, t, **kwargs).sample for t in timesteps]


def run_rank(runtime, unet, sample, kwargs, timesteps):
    """One simulated rank: sync-mode calls, then displaced calls on an unchanged input."""
    model = shared_copy(unet)
    sync = distrifusion.ParallelConfig(mode="sync", split_cfg=False)
    distrifusion.parallelize(model, sync, runtime=runtime)
    synced = calls(model, sample, kwargs, timesteps)
    distrifusion.remove(model)
    displaced = distrifusion.ParallelConfig(warmup_steps=0, split_cfg=False)
    distrifusion.parallelize(model, displaced, runtime=runtime)
    frozen = calls(model, sample, kwargs, timesteps[:1] * 3)  # step 0 sync, then displaced
    return synced, frozen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("archs", nargs="*", default=["sd15", "sd21", "sdxl"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--pixels", type=int, nargs=2, default=(256, 192), help="height width (latent: /8)")
    args = parser.parse_args()
    timesteps = [torch.tensor(t) for t in (900, 800, 700)]
    for arch in args.archs:
        start = time.time()
        unet = build_unet(arch, torch.float32, torch.device("cpu"))
        # The batch of 2 is the CFG batch, kept whole (split_cfg=False) so that every rank computes strips.
        sample, kwargs = unet_inputs(unet, *args.pixels)
        reference = calls(unet, sample, kwargs, timesteps)
        frozen_ref = reference[0]
        scale = max(r.abs().max().item() for r in reference)
        for ranks in args.ranks:
            results = simulate_ranks(
                ranks, partial(run_rank, unet=unet, sample=sample, kwargs=kwargs, timesteps=timesteps)
            )
            sync_err = max((s - r).abs().max().item() for res in results for s, r in zip(res[0], reference))
            frozen_err = max((f - frozen_ref).abs().max().item() for res in results for f in res[1])
            print(
                f"{arch}, {ranks} ranks, latent {sample.shape[2]}x{sample.shape[3]}: sync max error "
                f"{sync_err / scale:.2e}, displaced on an unchanged input {frozen_err / scale:.2e} "
                f"(of the output scale {scale:.2f}; {time.time() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
