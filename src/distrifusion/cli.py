"""`distrifusion` command line: generate an image over several local ranks or under torchrun."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

import torch

from .config import GROUPNORM_MODES, MODES, TEXT_TOKEN_MODES, ParallelConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="displaced", help="parallel mode (default: displaced)")
    p.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps after the first (default: 4)")
    p.add_argument("--groupnorm", choices=GROUPNORM_MODES, default="corrected_async", help="GroupNorm mode (UNets)")
    p.add_argument(
        "--text-tokens",
        choices=TEXT_TOKEN_MODES,
        default="replicated",
        help="Flux/SD3: every rank computes all text tokens, or a share each (default: replicated)",
    )
    p.add_argument(
        "--no-split-cfg",
        dest="split_cfg",
        action="store_false",
        help="do not split the CFG batch halves over two rank groups",
    )
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_const",
        const=False,
        default=None,
        help="run every step eagerly (default: CUDA graphs where possible)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="launch this many local processes (torch elastic launcher); not needed under torchrun",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrifusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one image, its rows split over the ranks")
    gen.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (the built-in texture UNet, no download), 'embedded-dit' (the built-in texture "
        "model with the Flux transformer architecture), or a diffusers pipeline folder or hub id (SD 1.5 / 2.1, "
        "SDXL, SD3, Flux.1, PixArt)",
    )
    gen.add_argument(
        "--prompt", default=None, help="text prompt; for the embedded model, the texture class (default: gravel)"
    )
    gen.add_argument(
        "--height", type=int, default=None, help="image height in pixels (default: 1024; embedded-dit: 256)"
    )
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: as height's)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    gen.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale for text pipelines")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, float32 on CPU")
    gen.add_argument("--out", default="image.png", help="output PNG path (written by rank 0)")
    _add_parallel_args(gen)

    qual = sub.add_parser("quality", help="PSNR/SSIM of each parallel method against the one-process image")
    qual.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (texture UNet), 'embedded-dit' (texture Flux transformer), or a texture model folder",
    )
    qual.add_argument("--height", type=int, default=256)
    qual.add_argument("--width", type=int, default=256)
    qual.add_argument("--steps", type=int, default=20)
    qual.add_argument(
        "--scheduler",
        choices=("ddim", "dpm", "euler"),
        default=None,
        help="UNet models: the sampler (default: ddim); transformers keep their flow-matching scheduler",
    )
    qual.add_argument("--seeds", type=int, default=8, help="images per method (seed i draws class i mod classes)")
    qual.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="simulated rank counts")
    qual.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    qual.add_argument("--out-dir", default="quality", help="where quality.md/json and comparison PNGs go")

    bench = sub.add_parser("bench", help="step times of the full model and of one rank's share; traffic; latency")
    bench.add_argument(
        "--arch",
        default="sdxl",
        help="sd15 | sd21 | sdxl | flux_dev | sd3_medium | pixart_alpha | PATH.json (random weights; a JSON's "
        "_class_name picks the diffusers model class)",
    )
    bench.add_argument("--sizes", type=int, nargs="+", default=[1024], help="square image sizes in pixels")
    bench.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on CUDA, float32 on CPU")
    bench.add_argument(
        "--simulate", type=int, nargs="+", default=[1], help="time one rank's share of each N (loopback collectives)"
    )
    bench.add_argument("--mode", choices=MODES, default="displaced")
    bench.add_argument(
        "--text-tokens",
        choices=["replicated", "sharded"],
        default="replicated",
        help="Flux/SD3: every rank computes all text tokens, or a share each (ParallelConfig.text_tokens)",
    )
    bench.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    bench.add_argument("--steps", type=int, default=10, help="denoising steps per image with --nproc")
    bench.add_argument(
        "--nproc", type=int, default=1, help="also time whole images over N real local processes against one process"
    )
    bench.add_argument(
        "--graphs",
        choices=["auto", "on", "off"],
        nargs="+",
        default=["auto"],
        help="CUDA graphs for our runs (auto: on CUDA); several values give one row each",
    )
    bench.add_argument(
        "--traffic-only",
        action="store_true",
        help="only count the bytes per step for each size and --simulate N (shape-only run: seconds, any size)",
    )
    bench.add_argument("--json", default=None, help="write all results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # to relaunch as ranks, and (quoted) to name the command in reports
    args.command_line = shlex.join(["distrifusion", *argv])
    if getattr(args, "nproc", 1) < 1:
        raise SystemExit("error: --nproc must be >= 1")
    if args.command == "generate" and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch(args.nproc, argv)
    try:
        return {"generate": generate, "quality": quality, "bench": bench}[args.command](args)
    except (ValueError, TypeError, OSError) as e:  # bad input, a model that cannot be loaded: one line
        print(f"distrifusion: error on rank {_rank()}: {e}", file=sys.stderr)
        return 2


def launch(nproc: int, argv: list[str], env: dict | None = None) -> int:
    """Re-run this command as `nproc` local ranks through torch's elastic launcher."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # ranks share the cores instead of fighting
    os.environ.update(env or {})
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "distrifusion", *argv)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {rank} (exit {f.exitcode})" for rank, f in sorted(e.failures.items()))
        print(f"distrifusion: failed on {failures}", file=sys.stderr)
        return 1
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def generate(args: argparse.Namespace) -> int:
    import distrifusion

    logging.basicConfig(level=logging.INFO if _rank() == 0 else logging.WARNING, format="%(message)s")
    config = ParallelConfig(
        mode=args.mode,
        warmup_steps=args.warmup_steps,
        groupnorm=args.groupnorm,
        text_tokens=args.text_tokens,
        split_cfg=args.split_cfg,
        cuda_graphs=args.cuda_graphs,
    )
    # The embedded DiT attends over every 2x2 pixel token: 256 px is its practical default on a CPU.
    default_size = 256 if args.model == "embedded-dit" else 1024
    height = args.height or default_size
    width = args.width or default_size
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if torch.cuda.is_available() else torch.float32)
    generator = torch.Generator().manual_seed(args.seed)
    step_ends: list[float] = []
    if args.model in ("embedded", "embedded-dit"):
        from .pipelines import load_texture_dit_pipeline, load_texture_pipeline

        load = load_texture_pipeline if args.model == "embedded" else load_texture_dit_pipeline
        pipe = load(torch_dtype=dtype)
        default_class = "gravel" if "gravel" in pipe.classes else pipe.classes[0]
        label = pipe.class_index(args.prompt or default_class)  # unknown class: error before any rank work
        pipe = distrifusion.parallelize(pipe, config)
        start = time.perf_counter()
        image = pipe(label, height=height, width=width, num_inference_steps=args.steps, generator=generator).images[0]
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)
        pipe = distrifusion.parallelize(pipe, config)
        start = time.perf_counter()

        def on_step_end(pipe, step, timestep, tensors):
            step_ends.append(time.perf_counter())
            return tensors

        image = pipe(
            prompt=args.prompt or "a photograph of a lighthouse at dusk",
            height=height,
            width=width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
            callback_on_step_end=on_step_end,
        ).images[0]
    seconds = time.perf_counter() - start
    # Text pipelines also encode the prompt and decode the latent; the last step's end bounds the denoising.
    denoising = (step_ends[-1] - start) if step_ends else seconds
    if _rank() == 0:
        image.save(args.out)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        print(
            f"wrote {args.out} ({width}x{height}, {args.steps} steps, {args.mode}, {world} rank(s)); "
            f"denoising took {denoising:.1f} s, the whole generation {seconds:.1f} s"
        )
    return 0


def quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .pipelines import EMBEDDED, EMBEDDED_DIT, load_texture_dit_pipeline, load_texture_pipeline
    from .quality import run_quality, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "embedded-dit" or (Path(args.model) / "transformer").is_dir():
        pipe = load_texture_dit_pipeline(EMBEDDED_DIT if args.model == "embedded-dit" else args.model)
        scheduler = None
    else:
        pipe = load_texture_pipeline(EMBEDDED if args.model == "embedded" else args.model)
        scheduler = args.scheduler or "ddim"
    results = run_quality(pipe, args.height, args.width, args.steps, scheduler, args.seeds, args.ranks)
    write_report(results, Path(args.out_dir), args.command_line)
    print(f"wrote {args.out_dir}/quality.md, quality.json and comparison images")
    return 0


def bench(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from .bench import bench_images, bench_step, build_model, count_traffic, format_row, format_table

    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if torch.cuda.is_available() else torch.float32)
    graph_choices = [{"auto": None, "on": True, "off": False}[g] for g in dict.fromkeys(args.graphs)]
    graphs = graph_choices[0]
    if "LOCAL_RANK" in os.environ:  # a rank launched by the --nproc branch below
        row = bench_images(
            args.arch,
            args.sizes[0],
            args.sizes[0],
            dtype,
            args.steps,
            args.repeats,
            args.mode,
            graphs,
            text_tokens=args.text_tokens,
        )
        if _rank() == 0:
            Path(os.environ["DISTRIFUSION_BENCH_OUT"]).write_text(json.dumps(row))
        return 0
    rows: list[dict] = []

    def save(rows: list[dict]) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"command": args.command_line, "results": rows}, indent=1))

    if args.traffic_only:
        for row in count_traffic(args.arch, args.sizes, dtype, args.simulate, args.mode, args.text_tokens):
            print(
                f"{row['arch']} {row['height']}x{row['width']} {row['dtype']}, {row['ranks']} ranks "
                f"({row['cfg_groups']} CFG groups, {row['text_tokens']} text): received per rank "
                f"{row['step_bytes'] / 1e9:.3f} GB per {row['mode']} step, {row['sync_step_bytes'] / 1e9:.3f} GB per "
                f"synchronous step; Ulysses would receive {row['ulysses_step_bytes'] / 1e9:.3f} GB per step",
                flush=True,
            )
            rows.append(row)
        save(rows)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.arch, dtype, device)
    for size in args.sizes:
        for graphs in graph_choices:
            for row in bench_step(
                args.arch,
                size,
                size,
                dtype,
                args.simulate,
                args.repeats,
                args.mode,
                device,
                graphs,
                model,
                text_tokens=args.text_tokens,
            ):
                print(format_row(row), flush=True)
                rows.append(row)
                save(rows)  # after every row: a later size that runs out of memory keeps the earlier ones
    del model
    print(format_table(rows), flush=True)
    graphs = graph_choices[0]  # --nproc runs use the first choice
    if args.nproc > 1:
        cores = os.cpu_count() or 1
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            row = bench_images(
                args.arch,
                args.sizes[0],
                args.sizes[0],
                dtype,
                args.steps,
                args.repeats,
                args.mode,
                graphs,
                text_tokens=args.text_tokens,
            )
            print(f"1 process x {threads} thread(s): {row['image_s']:.2f} s per image", flush=True)
            rows.append(row)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.json")
            threads = max(1, cores // args.nproc)
            if launch(args.nproc, args.argv, {"DISTRIFUSION_BENCH_OUT": out, "OMP_NUM_THREADS": str(threads)}):
                return 1
            row = json.loads(Path(out).read_text())
        base = next(r for r in rows if r.get("image_s") and r["threads"] == 1 and r["world_size"] == 1)
        row["speedup_vs_1x1"] = base["image_s"] / row["image_s"]
        print(
            f"{args.nproc} processes x {threads} thread(s): {row['image_s']:.2f} s per image "
            f"({row['speedup_vs_1x1']:.2f}x vs 1 process x 1 thread)",
            flush=True,
        )
        rows.append(row)
    save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
