"""QUALITY.md's video table: the embedded video model (a pixel-space WanTransformer3DModel trained on moving
textures, `distrifusion.app.pipelines.TextureVideoPipeline`) split over N simulated ranks
(`simulate_ranks`: the real layers and exchanges, threads instead of processes), against one process.

    OMP_NUM_THREADS=1 python benchmarks/quality_video.py --split rows --ranks 8 2 4 \\
        --size 32 --frames 17 --steps 50 --prompts brick --out benchmarks/quality_video/rows.json

For each method (sync, naive, displaced with warm-up 0/1/2/4; `--sync-also` adds experiments) and rank
count it writes one row, over the clips of `--prompts` (default: all six classes, one clip each):
- PSNR (dB) and SSIM of every frame against the one-process clip (mean over frames and clips; the worst
  frame of any clip);
- a temporal measure, tPSNR (dB): the PSNR of the frame-to-frame change (frame t minus frame t-1) against
  the one-process clip's change. An error that stands still (the same seam in every frame) leaves the change
  as it was (high tPSNR); an error that moves or flickers from frame to frame lowers it.
Results are written to the JSON file after each row (a long run keeps what it finished) and the clips of
the largest N are kept in a .npz beside it (not committed), for `--picture`:

    python benchmarks/quality_video.py --picture docs/quality_video_N8.png --prompts brick --amplify 10 \\
        --from benchmarks/quality_video/rows.json benchmarks/quality_video/frames.json \\
        --rows "naive patches | rows | N=8" "displaced, warm-up 4 | rows | N=8" \\
               "naive patches | frames | N=8" "displaced, warm-up 4 | frames | N=8"

draws frames side by side (per class: the one-process clip, then the `--rows` clips; columns: frames).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distrifusion.app.pipelines import load_texture_video_pipeline
from distrifusion.engine.config import ParallelConfig
from distrifusion.measure.quality import psnr, ssim
from distrifusion.measure.simulate import simulate_ranks
from distrifusion.parallel.parallelize import parallelize, remove

METHODS = {
    "sync (exact)": dict(mode="sync"),
    "naive patches": dict(mode="naive"),
    **{f"displaced, warm-up {w}": dict(mode="displaced", warmup_steps=w) for w in (0, 1, 2, 4)},
}


@dataclasses.dataclass
class SyncAlsoConfig(ParallelConfig):
    """An experiment, not a library option: displaced steps with these steps (0-based calls) synchronous as
    well, to find where in the trajectory the stale context costs the most (`--sync-also`)."""

    sync_also: tuple[int, ...] = ()

    def is_sync_step(self, step: int) -> bool:
        return super().is_sync_step(step) or step in self.sync_also


def clip_scores(clip: np.ndarray, reference: np.ndarray) -> dict:
    """Per-frame PSNR/SSIM (mean and worst frame) and the temporal PSNR of clips (frames, H, W, 3) in [0, 1]."""
    p = [psnr(a, b) for a, b in zip(clip, reference, strict=True)]
    s = [ssim(a, b) for a, b in zip(clip, reference, strict=True)]
    change, change_ref = np.diff(clip.astype(np.float64), axis=0), np.diff(reference.astype(np.float64), axis=0)
    return dict(
        psnr=float(np.mean(p)), psnr_min=float(np.min(p)), ssim=float(np.mean(s)), ssim_min=float(np.min(s)),
        tpsnr=psnr(change, change_ref) if len(clip) > 1 else float("nan"),
    )  # fmt: skip


def measure(args: argparse.Namespace) -> None:
    """Every method at every N on each class's clip; a row per (method, N): the mean over the clips of each
    score, and the worst clip's worst frame (`psnr_min`, `ssim_min`) and lowest tPSNR (`tpsnr_min`)."""
    torch.set_num_threads(args.threads)
    pipe = load_texture_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = args.prompts or pipe.classes
    shape = dict(num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=args.steps)

    def sample(p, prompt: str) -> np.ndarray:
        label = pipe.class_index(prompt)
        return p(label, generator=torch.Generator().manual_seed(args.seed), **shape).frames[0]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    references = {prompt: sample(pipe, prompt) for prompt in prompts}
    seconds = round((time.perf_counter() - start) / len(prompts), 1)
    settings = dict(vars(args), prompts=prompts, reference_seconds=seconds, machine=args.machine)
    results = dict(settings=settings, rows=[])
    clips = {f"reference | {prompt}": clip for prompt, clip in references.items()}
    replicas = [copy.deepcopy(pipe) for _ in range(max(args.ranks))]  # one replica per simulated rank
    methods = {name: (ParallelConfig, method) for name, method in METHODS.items() if name in args.methods}
    for steps in args.sync_also:  # e.g. "18" or "16,17,18": one method each
        also = tuple(int(k) for k in steps.split(","))
        methods[f"displaced, warm-up 4, sync also {steps}"] = (SyncAlsoConfig, dict(mode="displaced", sync_also=also))
    for n in args.ranks:
        for name, (kind, method) in methods.items():
            config = kind(split_cfg=False, video_split=args.split, **method)
            start = time.perf_counter()
            scores = []
            for prompt in prompts:

                def rank_fn(runtime, config=config, prompt=prompt):
                    replica = replicas[runtime.rank]
                    parallelize(replica, config, runtime=runtime)
                    try:
                        return sample(replica, prompt)
                    finally:
                        remove(replica)

                clip = simulate_ranks(n, rank_fn)[0]
                scores.append(clip_scores(clip, references[prompt]))
                if n == max(args.ranks):
                    clips[f"{name} | {args.split} | N={n} | {prompt}"] = clip
            row = dict(method=name, split=args.split, ranks=n, clips=len(prompts))
            row.update({key: float(np.mean([c[key] for c in scores])) for key in ("psnr", "ssim", "tpsnr")})
            row.update(
                psnr_min=min(c["psnr_min"] for c in scores),
                ssim_min=min(c["ssim_min"] for c in scores),
                tpsnr_min=min(c["tpsnr"] for c in scores),
                per_clip={prompt: round(c["psnr"], 2) for prompt, c in zip(prompts, scores, strict=True)},
            )
            row["seconds"] = round(time.perf_counter() - start, 1)
            results["rows"].append(row)
            print(
                f"{args.split:6s} N={n} {name:22s} PSNR {row['psnr']:6.2f} dB (worst frame {row['psnr_min']:6.2f}) "
                f"SSIM {row['ssim']:.4f} tPSNR {row['tpsnr']:6.2f} dB (lowest {row['tpsnr_min']:6.2f}) "
                f"[{len(prompts)} clips, {row['seconds']:.0f} s]",
                flush=True,
            )
            out.write_text(json.dumps(results, indent=1))
            if n == max(args.ranks):
                np.savez_compressed(out.with_suffix(".npz"), **clips)


def picture(args: argparse.Namespace) -> None:
    """Frames side by side, for each of `--prompts` (default brick) in turn: one row per clip (the
    one-process clip first, then `--rows`), one column per `--every`-th frame; with `--amplify K`, each
    clip's row is followed by its difference from the one-process clip x K."""
    prompts = args.prompts or ["brick"]
    stored: dict[str, np.ndarray] = {}
    for path in args.sources:
        with np.load(Path(path).with_suffix(".npz")) as data:
            stored.update({key: data[key] for key in data.files})
    drawn, names = [], []
    for prompt in prompts:
        reference = stored[f"reference | {prompt}"]
        for name in ["reference"] + args.rows:
            clip = stored.get(f"{name} | {prompt}")
            if clip is None:
                raise SystemExit(f"no clip {name!r} of {prompt!r} in {args.sources}")
            drawn.append(clip)
            names.append(f"{name} | {prompt}")
            if args.amplify and name != "reference":
                drawn.append(np.clip(np.abs(clip - reference) * args.amplify, 0, 1))
    cols = list(range(0, drawn[0].shape[0], args.every))
    cell, gap = drawn[0].shape[1] * args.scale, 4
    grid = np.full((len(drawn) * (cell + gap) - gap, len(cols) * (cell + gap) - gap, 3), 255, np.uint8)
    for i, clip in enumerate(drawn):
        for j, f in enumerate(cols):
            img = Image.fromarray((clip[f] * 255 + 0.5).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
            top, left = i * (cell + gap), j * (cell + gap)
            grid[top : top + cell, left : left + cell] = img
    Image.fromarray(grid).save(args.picture, optimize=True)
    print(f"wrote {args.picture}: rows {names}{f' (each with |difference| x {args.amplify})' * bool(args.amplify)}")
    print(f"frames {cols}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("rows", "frames"), default="rows")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 2, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompts", nargs="+", default=None, help="texture classes, a clip each (default: all six)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sync-also",
        nargs="+",
        default=[],
        help="experiment: displaced (warm-up 4) with these comma-separated 0-based steps synchronous too",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine", default="2-core CPU shared with other jobs, no GPU")
    p.add_argument("--out", default="benchmarks/quality_video/rows.json")
    p.add_argument("--picture", default=None, help="draw the frames of earlier runs instead of measuring")
    p.add_argument("--from", dest="sources", nargs="+", default=[])
    p.add_argument("--rows", nargs="+", default=[], help="clips to draw, as stored: 'METHOD | SPLIT | N=n'")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--amplify", type=float, default=0, help="also draw |clip - one process| times this")
    args = p.parse_args()
    if args.picture:
        picture(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
