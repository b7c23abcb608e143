"""Displaced and naive patches against one process for the newer transformer families, on random
weights: Qwen-Image (a padded text mask), Qwen-Image-Edit, Flux.2, Flux.2 and Flux.1 Kontext with
reference-image tokens. The tiny models of `tests/transformer_helpers.py` (published block structure,
toy width), float32, a `--rows` x `--cols` token grid, `--steps` Euler flow-matching steps with a CFG
batch of 2 (guidance 3, the whole batch on every rank: every rank has a strip), N simulated ranks.

    python benchmarks/quality_new_families.py --rows 32 --cols 32 --steps 20 --ranks 2 4 8

Prints PSNR (dB, over the reference's range) of the final latent against one process's for sync,
displaced (warm-up 4 and 1, sharded text) and naive. Random weights: a model that was never trained
says how much the stale context moves its output, not how an image looks.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from helpers import psnr  # noqa: E402
from transformer_helpers import NEW_FAMILIES, denoise, tiny_transformer  # noqa: E402

import distrifusion  # noqa: E402
from distrifusion.measure.simulate import simulate_ranks  # noqa: E402

METHODS = {
    "sync": dict(mode="sync"),
    "displaced, warm-up 4": dict(mode="displaced", warmup_steps=4),
    "displaced, warm-up 1": dict(mode="displaced", warmup_steps=1),
    "naive": dict(mode="naive"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("families", nargs="*", default=NEW_FAMILIES)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--cols", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| family | method | " + " | ".join(f"N = {n}" for n in args.ranks) + " |")
    print("|---|---|" + "---|" * len(args.ranks))
    for family in args.families:
        start = time.time()
        model = tiny_transformer(family, dtype=torch.float32)
        reference = denoise(model, family, args.rows, args.cols, steps=args.steps, dtype=torch.float32)
        for method, config in METHODS.items():
            figures = []
            for n in args.ranks:
                replicas = [copy.deepcopy(model) for _ in range(n)]  # built here: the ranks are threads

                def rank(runtime, replicas=replicas, config=config, family=family):
                    replica = replicas[runtime.rank]
                    settings = distrifusion.ParallelConfig(split_cfg=False, text_tokens="sharded", **config)
                    distrifusion.parallelize(replica, settings, runtime=runtime)
                    return denoise(replica, family, args.rows, args.cols, steps=args.steps, dtype=torch.float32)

                figures.append(psnr(simulate_ranks(n, rank)[0], reference))
            print(f"| {family} | {method} | " + " | ".join(f"{f:.1f}" for f in figures) + " |", flush=True)
        print(f"<!-- {family}: {time.time() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
