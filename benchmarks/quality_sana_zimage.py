"""Displaced against naive patches on SANA and Z-Image with random weights (no trained small model of
these families exists here): PSNR of the final latent against one process.

    python benchmarks/quality_sana_zimage.py [--families sana zimage] [--ranks 2 4 8] [--seeds 2] [--steps 10]

Models: the published block structure at a reduced width and depth (SANA: 8 heads x 32, 4 layers, the
Mix-FFN, sin-cos positions interpolated as the 2K/4K models do; Z-Image: width 256, 8 heads, 1 refiner and
4 main layers), float32, a 32 x 32 latent grid (SANA: 32 x 32 latent cells, 1024 px with its DC-AE; Z-Image:
16 x 16 tokens of 2 x 2 cells, 256 px), a CFG batch of 2 (guidance 4) kept whole so that every rank computes
strips, `--steps` flow-matching Euler steps from noise. Ranks are simulated with threads
(`simulate_ranks`). Random weights make the trajectories far from what the method assumes (a trained model
changes less from step to step): read the figures as displaced against naive, not as absolute quality.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from functools import partial

import torch
from diffusers import SanaTransformer2DModel, ZImageTransformer2DModel

import distrifusion
from distrifusion.measure.simulate import simulate_ranks

METHODS = [
    ("sync (exact)", dict(mode="sync")),
    ("naive patches", dict(mode="naive")),
    *[(f"displaced, warm-up {w}", dict(mode="displaced", warmup_steps=w)) for w in (0, 1, 2, 4)],
]


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "sana":
        model = SanaTransformer2DModel(
            in_channels=32,
            out_channels=32,
            num_attention_heads=8,
            attention_head_dim=32,
            num_layers=4,
            num_cross_attention_heads=4,
            cross_attention_head_dim=64,
            cross_attention_dim=256,
            caption_channels=64,
            sample_size=16,
            patch_size=1,
            interpolation_scale=1.0,
        )
    else:
        model = ZImageTransformer2DModel(
            in_channels=16, dim=256, n_layers=4, n_refiner_layers=1, n_heads=8, n_kv_heads=8, cap_feat_dim=64,
            axes_dims=[8, 12, 12], axes_lens=[256, 64, 64],
        )  # fmt: skip
    with torch.no_grad():  # zero-initialised parameters (output layers, pad tokens) would make a trivial model
        for p in model.parameters():
            if p.numel() == 1 or torch.all(p == p.flatten()[0]):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def denoise(model, family: str, steps: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if family == "sana":
        x = torch.randn(1, 32, 32, 32, generator=g)
        text = torch.randn(2, 32, 64, generator=g)
        mask = torch.ones(2, 32, dtype=torch.long)
    else:
        x = torch.randn(1, 16, 32, 32, generator=g)
        captions = [torch.randn(n, 64, generator=g) for n in (40, 12)]
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            batch = x.expand(2, *x.shape[1:])
            if family == "sana":
                t = torch.full((2,), s * 1000.0)
                v = model(batch, text, t, encoder_attention_mask=mask, return_dict=False)[0]
            else:
                out = model(list(batch.unsqueeze(2).unbind(0)), torch.full((2,), 1.0 - s), captions, return_dict=False)
                v = -torch.stack(out[0]).squeeze(2)  # as ZImagePipeline: the model's output negated
            v = v[:1] + 4.0 * (v[1:] - v[:1])
            x = x + (s_next - s) * v
    return x


def run_rank(runtime, model, family: str, config: dict, steps: int, seed: int) -> torch.Tensor:
    replica = copy.deepcopy(model)
    distrifusion.parallelize(replica, distrifusion.ParallelConfig(split_cfg=False, **config), runtime=runtime)
    return denoise(replica, family, steps, seed)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = (b.max() - b.min()).item()
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="+", default=["sana", "zimage"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for family in args.families:
        start = time.time()
        model = build(family)
        references = [denoise(model, family, args.steps, seed) for seed in range(args.seeds)]
        print(f"\n{family}: PSNR of the final latent against one process (mean of {args.seeds} seeds)")
        print("| method | " + " | ".join(f"N={n}" for n in args.ranks) + " |")
        print("|---|" + "---|" * len(args.ranks))
        for label, config in METHODS:
            cells = []
            for n in args.ranks:
                values = []
                for seed in range(args.seeds):
                    job = partial(run_rank, model=model, family=family, config=config, steps=args.steps, seed=seed)
                    values.append(psnr(simulate_ranks(n, job)[0], references[seed]))
                cells.append(f"{sum(values) / len(values):.1f} dB")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
