"""Step caching on top of displaced patches (issue 26): quality and speed on the embedded texture DiT.

For N = 1/2/4/8 ranks x {no cache, first-block cache at two thresholds} x {sync, displaced}: PSNR/SSIM of the
decoded image against one process without a cache, the denoiser calls that computed their remaining blocks
(`ComputedCalls`, the mean over seeds), and the combined speed-up

    steps x T(full call, one process) / (computed x T(share, computed call) + skipped x T(share, skipped call))

where T(share, ...) is one rank's share of N measured in this process with loopback collectives (the largest
strip, as `distrifusion bench` measures it; a skipped call runs the embedding, the first block, the agreement
all-gather and the output layers). Ranks are simulated with threads (`simulate_ranks`: the real layers and
exchanges). Writes cache_quality.json, cache_quality.md and a PNG per rank count under --out-dir.

    PYTHONPATH=src python benchmarks/cache_quality.py --size 64 --steps 16 --seeds 2 --out-dir docs/quality_cache
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distrifusion import ParallelConfig, parallelize, remove
from distrifusion.app.pipelines import load_texture_dit_pipeline
from distrifusion.measure.caching import ComputedCalls, enable_cache, parse_cache
from distrifusion.measure.quality import psnr, ssim
from distrifusion.measure.simulate import loopback_runtime, simulate_ranks
from distrifusion.measure.timing import time_calls

CPU = torch.device("cpu")


def sample(pipe, seed: int, size: int, steps: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(seed % 6, height=size, width=size, num_inference_steps=steps, generator=generator, output_type="np")[
        "images"
    ][0]


def with_cache(pipe, cache: str | None):
    pipe = copy.deepcopy(pipe)
    if cache:
        enable_cache(pipe.transformer, parse_cache(cache))
    return pipe


def call_inputs(pipe, size: int) -> dict:
    """The keyword arguments of one of the pipeline's denoiser calls at `size` (captured from a 1-step run)."""
    seen = {}
    handle = pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    pipe(0, height=size, width=size, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    handle.remove()
    return seen


def call_times(pipe, size: int, ranks: int, mode: str, repeats: int) -> tuple[float, float]:
    """Seconds of one denoiser call that computes, and of one a first-block cache skips, for one rank's share
    of `ranks` (the whole call when 1) in `mode`, after the warm-up."""
    inputs = call_inputs(pipe, size)
    times = []
    for cache in (None, "fbcache:1e9"):  # a threshold no change reaches: every call after the first skips
        model = with_cache(pipe, cache).transformer
        if ranks > 1:
            parallelize(model, ParallelConfig(mode=mode, warmup_steps=0), runtime=loopback_runtime(ranks))

        def call(model=model):
            with torch.no_grad(), model.cache_context("cond"):
                model(**inputs)

        call()  # step 0 (synchronous; the cache's first call always computes)
        times.append(time_calls(call, CPU, repeats, warmup=1))
        if ranks > 1:
            remove(model)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--caches", nargs="+", default=["fbcache:0.3", "fbcache:0.5"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/quality_cache"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_texture_dit_pipeline()
    base.set_progress_bar_config(disable=True)
    references = [sample(base, seed, args.size, args.steps) for seed in range(args.seeds)]
    rows, images = [], {}
    timing = {}
    for n in args.ranks:
        for mode in ("sync", "displaced") if n > 1 else ("one process",):
            timing[n, mode] = call_times(base, args.size, n, "sync" if n == 1 else mode, args.repeats)
    full = timing[1, "one process"][0]
    for cache in [None, *args.caches]:
        for n in args.ranks:
            for mode in ("sync", "displaced") if n > 1 else ("one process",):
                start = time.perf_counter()
                scores, computed = [], []
                for seed, reference in enumerate(references):
                    pipes = [with_cache(base, cache) for _ in range(n)]
                    counters = [ComputedCalls(p.transformer) for p in pipes]

                    def rank(runtime, seed=seed, pipes=pipes, mode=mode):
                        parallelize(pipes[runtime.rank], ParallelConfig(mode=mode), runtime=runtime)
                        return sample(pipes[runtime.rank], seed, args.size, args.steps)

                    image = sample(pipes[0], seed, args.size, args.steps) if n == 1 else simulate_ranks(n, rank)[0]
                    if len({c.computed for c in counters}) != 1:
                        raise RuntimeError(f"ranks computed different calls: {[c.computed for c in counters]}")
                    computed.append(counters[0].computed)
                    scores.append((psnr(image, reference), ssim(image, reference)))
                    if seed == 0:
                        images[cache, n, mode] = image
                p, s = np.array(scores).T
                share, skip = timing[n, mode]
                mean_computed = float(np.mean(computed))
                speedup = args.steps * full / (mean_computed * share + (args.steps - mean_computed) * skip)
                row = dict(
                    cache=cache or "none",
                    ranks=n,
                    mode=mode,
                    psnr=float(p.mean()),
                    psnr_min=float(p.min()),
                    ssim=float(s.mean()),
                    computed=mean_computed,
                    share_call_s=share,
                    skipped_call_s=skip,
                    speedup=speedup,
                    seconds=time.perf_counter() - start,
                )
                rows.append(row)
                print(
                    f"{row['cache']:12s} N={n} {mode:11s} PSNR {row['psnr']:6.1f} dB SSIM {row['ssim']:.4f} "
                    f"computed {mean_computed:4.1f}/{args.steps} speed-up x{speedup:.2f}",
                    flush=True,
                )
    write(args, rows, images, full)


def write(args, rows: list[dict], images: dict, full: float) -> None:
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(vars(args), out_dir=str(out), full_call_s=full, threads=1)
    (out / "cache_quality.json").write_text(json.dumps(dict(settings=settings, rows=rows), indent=1) + "\n")
    lines = [
        f"Embedded texture DiT, {args.size}x{args.size} px, {args.steps} steps, {args.seeds} seeds, float32, "
        f"1 torch thread; full call in one process {full * 1e3:.0f} ms.",
        "",
        "| cache | N | mode | PSNR / SSIM vs one process, no cache | calls computed | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        quality = "exact" if r["psnr"] == float("inf") else f"{r['psnr']:.1f} dB / {r['ssim']:.3f}"
        lines.append(
            f"| {r['cache']} | {r['ranks']} | {r['mode']} | {quality} | {r['computed']:.1f}/{args.steps} | "
            f"x{r['speedup']:.2f} |"
        )
    (out / "cache_quality.md").write_text("\n".join(lines) + "\n")
    caches = ["none", *args.caches]
    for n in args.ranks:
        modes = ("sync", "displaced") if n > 1 else ("one process",)
        tiles = [images[None if c == "none" else c, n, m] for m in modes for c in caches]
        strip = np.concatenate(tiles, axis=1)
        Image.fromarray((strip * 255).round().astype(np.uint8)).save(out / f"cache_N{n}.png")


if __name__ == "__main__":
    main()
