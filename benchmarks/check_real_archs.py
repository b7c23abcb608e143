"""Parity on the published architectures (random weights, float32): N simulated ranks against one
process. Too heavy for CI (an SDXL UNet is 10 GB in float32); run by hand on a machine with ~24 GB:

    python benchmarks/check_real_archs.py [sd15 sd21 sdxl] [--ranks 2 3]
    python benchmarks/check_real_archs.py flux_dev sd3_medium pixart_alpha --depth 2 --pixels 256 192
    python benchmarks/check_real_archs.py sdxl_vae --pixels 1024 768      (decode and encode, always exact)
    python benchmarks/check_real_archs.py wan21_t2v_1_3b wan21_t2v_14b wan22_ti2v_5b --depth 1 --pixels 128 96 \
        --frames 9 --video-split rows frames                               (a video, split in rows or frames)
    python benchmarks/check_real_archs.py qwen_image --depth 2 --pixels 256 192 --references 4
    python benchmarks/check_real_archs.py flux2_klein flux2_dev --depth 1 --pixels 128 128 --references 4

`--references S` appends S x S reference-image tokens to Flux, Flux.2 and Qwen-Image calls (Kontext,
Flux.2 with an image, Qwen-Image-Edit) and gives Qwen-Image a text mask whose second half is padding.

Transformers keep their published widths; `--depth` cuts them to that many blocks of each kind
(Flux: double- and single-stream) so that they fit in memory (Flux-dev alone is 48 GB in float32).

The ranks are threads whose models share one copy of the weights. Checked: sync mode (exact patch
parallelism) over a few steps, and displaced steps on an unchanged input (the previous step's
context then equals the fresh one, so they must be exact too). Prints the max error relative to the
output's scale; float32 reduction order alone gives ~1e-6.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import distrifusion
from distrifusion.measure.archs import ARCHS, CONFIGS
from distrifusion.measure.simulate import simulate_ranks
from distrifusion.measure.workload import build_model, model_inputs


def shared_copy(model):
    """A copy of `model` whose parameters and buffers are the original's tensors (no extra memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def calls(model, inputs, timesteps):
    with torch.no_grad():
        return [model(**{**inputs, "timestep": t}, return_dict=False)[0] for t in timesteps]


def run_rank(runtime, model, inputs, timesteps, split="rows", text_tokens="sharded"):
    """One simulated rank: sync-mode calls, then displaced calls on an unchanged input."""
    model = shared_copy(model)
    options = dict(split_cfg=False, video_split=split, text_tokens=text_tokens)
    sync = distrifusion.ParallelConfig(mode="sync", **options)
    distrifusion.parallelize(model, sync, runtime=runtime)
    synced = calls(model, inputs, timesteps)
    distrifusion.remove(model)
    displaced = distrifusion.ParallelConfig(warmup_steps=0, **options)
    distrifusion.parallelize(model, displaced, runtime=runtime)
    frozen = calls(model, inputs, timesteps[:1] * 3)  # step 0 sync, then displaced
    return synced, frozen


def vae_calls(vae, z, x):
    with torch.no_grad():
        return [vae.decode(z).sample, vae.encode(x).latent_dist.mean]


def run_vae_rank(runtime, vae, z, x):
    model = shared_copy(vae)
    distrifusion.parallelize(model, runtime=runtime)
    return vae_calls(model, z, x)


def check_vae(arch: str, ranks: list[int], pixels: tuple[int, int]) -> None:
    """Decode and encode (always exact) of a published VAE, N simulated ranks against one process."""
    start = time.time()
    vae = build_model(arch, torch.float32, torch.device("cpu"))
    z = model_inputs(vae, *pixels)["z"]
    x = torch.randn(1, 3, *pixels, generator=torch.Generator().manual_seed(1))
    reference = vae_calls(vae, z, x)
    for n in ranks:
        results = simulate_ranks(n, partial(run_vae_rank, vae=vae, z=z, x=x))
        errors = [
            max((r[i] - ref).abs().max().item() for r in results) / ref.abs().max().item()
            for i, ref in enumerate(reference)
        ]
        print(
            f"{arch}, {n} ranks, {pixels[0]}x{pixels[1]} px: decode max error {errors[0]:.2e}, encode {errors[1]:.2e} "
            f"(of the output scale; {time.time() - start:.0f} s)",
            flush=True,
        )


def with_references(model, inputs: dict, side: int) -> dict:
    """`inputs` with `side` x `side` reference-image tokens after the image's (their ids as the editing
    pipelines make them) and, for Qwen-Image, a text mask with padding."""
    tokens = inputs["hidden_states"]
    g = torch.Generator().manual_seed(2)
    refs = torch.randn(tokens.shape[0], side * side, tokens.shape[2], generator=g, dtype=tokens.dtype)
    inputs = dict(inputs, hidden_states=torch.cat([tokens, refs], 1))
    if "img_shapes" in inputs:  # Qwen-Image-Edit
        inputs["img_shapes"] = [shapes + [(1, side, side)] for shapes in inputs["img_shapes"]]
        text = inputs["encoder_hidden_states"]
        mask = torch.ones(text.shape[:2], dtype=torch.long)
        mask[:, text.shape[1] // 2 :] = 0
        inputs["encoder_hidden_states_mask"] = mask
        return inputs
    ids = inputs["img_ids"]  # Kontext: first coordinate 1; Flux.2: 10
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    extra = torch.zeros(side * side, ids.shape[-1], dtype=ids.dtype)
    extra[:, 0], extra[:, 1:3] = 1 if ids.shape[-1] == 3 else 10, grid
    inputs["img_ids"] = torch.cat([ids, extra])
    return inputs


def cut_depth(arch: str, depth: int) -> str:
    """A config file like `arch`'s with `depth` blocks of each kind (transformers only)."""
    config = json.loads((CONFIGS / ARCHS[arch]).read_text())
    for key in ("num_layers", "num_single_layers"):
        if key in config:
            config[key] = min(config[key], depth)
    if "dual_attention_layers" in config:
        config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < depth]
    path = Path(tempfile.mkdtemp()) / f"{arch}_depth{depth}.json"
    path.write_text(json.dumps(config))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("archs", nargs="*", default=["sd15", "sd21", "sdxl"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--pixels", type=int, nargs=2, default=(256, 192), help="height width (latent: /8)")
    parser.add_argument("--depth", type=int, default=2, help="blocks of each kind kept in a transformer")
    parser.add_argument("--frames", type=int, default=None, help="video archs: pixel frames (1 + 4k)")
    parser.add_argument("--video-split", nargs="+", default=["rows"], help="video archs: rows and/or frames")
    parser.add_argument("--references", type=int, default=0, help="S x S reference-image tokens (Flux, Flux.2, Qwen)")
    parser.add_argument("--text-tokens", choices=["sharded", "replicated"], default="sharded")
    args = parser.parse_args()
    for arch in args.archs:
        if arch.endswith("_vae"):
            check_vae(arch, args.ranks, tuple(args.pixels))
            continue
        start = time.time()
        source = arch if arch in ("sd15", "sd21", "sdxl") or arch.endswith(".json") else cut_depth(arch, args.depth)
        model = build_model(source, torch.float32, torch.device("cpu"))
        # The CFG batch is kept whole (split_cfg=False) so that every rank computes strips.
        inputs = model_inputs(model, *args.pixels, frames=args.frames)
        if args.references:
            inputs = with_references(model, inputs, args.references)
        t0 = inputs["timestep"]
        timesteps = [t0 * f for f in (1.8, 1.6, 1.4)]
        reference = calls(model, inputs, timesteps)
        frozen_ref = reference[0]
        scale = max(r.abs().max().item() for r in reference)
        video = inputs["hidden_states"].dim() == 5 if "hidden_states" in inputs else False
        for ranks, split in [(n, s) for n in args.ranks for s in (args.video_split if video else ["rows"])]:
            run = partial(
                run_rank, model=model, inputs=inputs, timesteps=timesteps, split=split, text_tokens=args.text_tokens
            )
            results = simulate_ranks(ranks, run)
            sync_err = max((s - r).abs().max().item() for res in results for s, r in zip(res[0], reference))
            frozen_err = max((f - frozen_ref).abs().max().item() for res in results for f in res[1])
            what = f" x {args.frames} frames, split in {split}" if video else ""
            print(
                f"{arch}, {ranks} ranks, {args.pixels[0]}x{args.pixels[1]} px{what}"
                + (f" + {args.references}x{args.references} reference tokens" if args.references else "")
                + f", text {args.text_tokens}: sync max error "
                f"{sync_err / scale:.2e}, displaced on an unchanged input {frozen_err / scale:.2e} "
                f"(of the output scale {scale:.2f}; {time.time() - start:.0f} s)",
                flush=True,
            )
        del model


if __name__ == "__main__":
    main()
