"""`distrifusion quality`: how far each parallel method's image is from the one-process image.

Like the paper's Table 1: for several seeds, generate the single-process reference, then the
same image with N simulated ranks (`simulate_ranks`: real layers and exchanges, threads instead
of processes) for each method, and compare the decoded images (PSNR, SSIM). LPIPS and FID need
network weights that cannot be downloaded here; they are skipped with a notice.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from ..engine.config import ParallelConfig
from ..parallel.parallelize import parallelize, remove
from .simulate import simulate_ranks


@dataclass(frozen=True)
class Method:
    label: str
    family: str
    config: dict


METHODS = [
    Method("sync (exact)", "reference", dict(mode="sync")),
    Method("naive patches", "reference", dict(mode="naive")),
    *[
        Method(f"displaced, warm-up 4, GN {gn}", "groupnorm", dict(groupnorm=gn))
        for gn in ("separate", "stale", "corrected_async", "sync")
    ],
    *[Method(f"displaced, warm-up {w}, GN corrected_async", "warmup", dict(warmup_steps=w)) for w in (0, 1, 2)],
]
# Transformers have no GroupNorm; their own choice is where text tokens are computed.
TRANSFORMER_METHODS = [
    Method("sync (exact)", "reference", dict(mode="sync")),
    Method("naive patches", "reference", dict(mode="naive")),
    *[
        Method(f"displaced, warm-up {w}, sharded text", "warmup", dict(warmup_steps=w, text_tokens="sharded"))
        for w in (0, 1, 2, 4)
    ],
    *[
        Method(f"displaced, warm-up {w}, replicated text", "text", dict(warmup_steps=w, text_tokens="replicated"))
        for w in (0, 1, 2, 4)
    ],
]
SCHEDULERS = ("ddim", "dpm", "euler")


def compression_methods(modes: list[str]) -> list[Method]:
    """Uncompressed displaced steps against each compression of their exchange (the defaults:
    warm-up 4, GroupNorm corrected_async), with the exact and naive references."""
    return [
        *METHODS[:2],
        Method("displaced, uncompressed", "compress", {}),
        *[Method(f"displaced, {mode}", "compress", dict(compress=mode)) for mode in modes],
    ]


def methods_for(pipe) -> list[Method]:
    """The methods worth comparing for the pipeline's denoiser (a UNet or a transformer)."""
    return TRANSFORMER_METHODS if hasattr(pipe, "transformer") else METHODS


def make_scheduler(pipe, name: str | None):
    """The scheduler `name` configured from the pipeline's; None keeps the pipeline's own (a flow-
    matching transformer needs its flow-matching scheduler)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name is None:
        return pipe.scheduler
    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}[name]
    return cls.from_config(pipe.scheduler.config)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(image, reference, channel_axis=2, data_range=1.0))


def _sample(pipe: DiffusionPipeline, label: int, size: tuple[int, int], steps: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    out = pipe(label, height=size[0], width=size[1], num_inference_steps=steps, generator=generator, output_type="np")
    return out.images[0]


def run_quality(
    pipe: DiffusionPipeline,
    height: int,
    width: int,
    steps: int,
    scheduler: str | None,
    seeds: int,
    ranks: list[int],
    methods: list[Method] | None = None,
    log=print,
) -> dict:
    """Compare every method at every rank count with the one-process images; returns JSON-ready results."""
    methods = methods or methods_for(pipe)
    pipe.scheduler = make_scheduler(pipe, scheduler)
    scheduler = scheduler or type(pipe.scheduler).__name__
    pipe.set_progress_bar_config(disable=True)
    # One pipeline per simulated rank, as real ranks each hold their own replica.
    replicas = [copy.deepcopy(pipe) for _ in range(max(ranks))]
    results = {
        "settings": dict(
            height=height, width=width, steps=steps, scheduler=scheduler, seeds=seeds, ranks=ranks, classes=pipe.classes
        ),
        "rows": [],
        "images": {},
    }
    references = []
    for seed in range(seeds):
        references.append(_sample(pipe, seed % len(pipe.classes), (height, width), steps, seed))
    for method in methods:
        for n in ranks:
            config = ParallelConfig(split_cfg=False, **method.config)
            start = time.perf_counter()
            scores = []
            for seed, reference in enumerate(references):

                def rank_fn(runtime, seed=seed, config=config):
                    replica = replicas[runtime.rank]
                    parallelize(replica, config, runtime=runtime)
                    try:
                        return _sample(replica, seed % len(pipe.classes), (height, width), steps, seed)
                    finally:
                        remove(replica)

                image = simulate_ranks(n, rank_fn)[0]
                scores.append((psnr(image, reference), ssim(image, reference)))
                if seed == 0:
                    results["images"][method.label, n] = image
            p, s = np.array(scores).T
            row = dict(
                method=method.label,
                family=method.family,
                ranks=n,
                psnr=float(p.mean()),
                psnr_min=float(p.min()),
                ssim=float(s.mean()),
                seconds=time.perf_counter() - start,
            )
            results["rows"].append(row)
            log(
                f"{method.label:45s} N={n}: PSNR {row['psnr']:6.2f} dB (min {row['psnr_min']:6.2f}), "
                f"SSIM {row['ssim']:.4f}  [{row['seconds']:.0f} s]"
            )
    results["images"]["reference", 0] = references[0]
    return results


def write_report(results: dict, out_dir: Path, command: str) -> None:
    """quality.json, quality.md (a table per method x rank count) and one comparison PNG per family."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = results.pop("images")
    settings = results["settings"]
    (out_dir / "quality.json").write_text(json.dumps({**results, "command": command}, indent=1))
    ranks = settings["ranks"]
    lines = [
        f"`{command}`",
        "",
        "| method | " + " | ".join(f"N={n} PSNR / SSIM" for n in ranks) + " |",
        "|---|" + "---|" * len(ranks),
    ]
    for label in dict.fromkeys(r["method"] for r in results["rows"]):
        cells = {r["ranks"]: r for r in results["rows"] if r["method"] == label}
        lines.append(
            f"| {label} | " + " | ".join(f"{cells[n]['psnr']:.1f} dB / {cells[n]['ssim']:.3f}" for n in ranks) + " |"
        )
    lines.append("")
    lines.append("LPIPS and FID: skipped (their network weights cannot be downloaded on this machine).")
    (out_dir / "quality.md").write_text("\n".join(lines) + "\n")
    n = max(ranks)
    reference = images["reference", 0]
    naive = images["naive patches", n]
    for family in dict.fromkeys(r["family"] for r in results["rows"] if r["family"] != "reference"):
        labels = [r["method"] for r in results["rows"] if r["family"] == family and r["ranks"] == n]
        panels = [reference, naive] + [images[label, n] for label in labels]
        panels += [np.clip(np.abs(images[label, n] - reference) * 10, 0, 1) for label in labels]
        strip = np.concatenate([np.pad(p, ((4, 4), (4, 4), (0, 0)), constant_values=1) for p in panels], 1)
        Image.fromarray((strip * 255).round().astype(np.uint8)).save(out_dir / f"compare_{family}_N{n}.png")
        (out_dir / f"compare_{family}_N{n}.txt").write_text(
            "panels, left to right: reference (1 process) | naive | "
            + " | ".join(labels)
            + " | then |image - reference| x 10 for each of those\n"
        )
