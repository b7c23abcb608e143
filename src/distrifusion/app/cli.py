"""`distrifusion` command line: generate an image over several local ranks or under torchrun.

Every command first checks all of its input (`check`), before any process is spawned and before
any weight is loaded; torch and diffusers are imported inside the commands only, so that `--help`
and a refused command answer at once.

The input checks and model geometry are in `cli_checks`, the local-rank launcher in `launcher`, and the
timers of generate's report in `timing`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from ..engine.config import COMPRESS_MODES, GROUPNORM_MODES, MODES, TEXT_TOKEN_MODES, VIDEO_SPLITS, ParallelConfig
from ..measure.archs import ARCHS
from ..measure.caching import cache_help, parse_cache
from .cli_checks import EMBEDDED, Geometry, UsageError, check, is_vae
from .cli_checks import check_image_size as check_image_size  # re-exported: tests call cli.check_image_size
from .cli_checks import pipeline_geometry as pipeline_geometry  # and cli.pipeline_geometry
from .launcher import RUN_DIR, Interrupted, as_rank, as_torchrun_worker, launch, raise_interrupted

DTYPE_NAMES = ("float32", "float16", "bfloat16")


# -- the parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message, as one line
        if os.environ.get("RANK", "0") == "0":
            print(f"distrifusion: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode", choices=(*MODES, "auto"), default="displaced",
        help="parallel mode (default: displaced); auto: the fastest on these links, measured first (see `plan`)",
    )  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps after the first (default: 4)")
    p.add_argument("--groupnorm", choices=GROUPNORM_MODES, default="corrected_async", help="GroupNorm mode (UNets)")
    p.add_argument(
        "--text-tokens",
        choices=TEXT_TOKEN_MODES,
        default="sharded",
        help="joint-attention transformers (Flux.1/2, SD3, Qwen-Image): each rank computes a share of the text "
        "(and reference-image) tokens, or all of them (default: sharded)",
    )
    p.add_argument(
        "--compress",
        choices=COMPRESS_MODES,
        default=None,
        help="displaced steps' exchange in 8 bits per value (int8/fp8), or their change since the last step "
        "with error feedback (residual-int8/fp8); default: uncompressed",
    )
    p.add_argument(
        "--no-split-cfg",
        dest="split_cfg",
        action="store_false",
        help="do not split the CFG batch halves over two rank groups (with CFG and 2 ranks, each rank otherwise "
        "computes one branch of the whole image: no strips)",
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
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a rank waits for the others in any collective before failing (default: 300)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="launch this many local processes (ranks); not needed under torchrun",
    )


def _add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--video-split",
        choices=VIDEO_SPLITS,
        default=ParallelConfig.video_split,
        help=f"video models: what a rank's strip is, a band of token rows across all frames or a run of latent "
        f"frames (default: {ParallelConfig.video_split})",
    )


def _size(text: str) -> tuple[int, int]:
    """A --sizes value: N (square) or HEIGHTxWIDTH."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or HEIGHTxWIDTH") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not N or HEIGHTxWIDTH")
    return (parts[0], parts[-1])


def _cache(text: str):
    try:
        return parse_cache(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_verbose(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show torch's and diffusers' warnings, every rank's output and tracebacks",
    )


BENCH_DESCRIPTION = """\
Measurements (1 always, 2 with --simulate, 3 with --nproc; none with --traffic-only):
  1. full step: one denoising step of the whole model (plain diffusers eagerly, and as a CUDA graph
     on CUDA; ours with one rank), --repeats times per --sizes size (median);
  2. one rank's share: with --simulate N (N > 1), the step of the rank with the largest strip of N,
     synchronous and displaced, with loopback collectives, and the bytes it receives per step;
  3. whole images: with --nproc N, --repeats images of --steps steps at the first size, in 1 process
     (1 thread, then all cores) and over N local processes;
  --traffic-only: only the bytes per step for every size and --simulate N (no weights, no compute).
Bytes are counted in --dtype (float32 by default on a CPU: twice float16's).
Random weights: nothing is downloaded.

Cost: per size, 3 + 2 x repeats full steps, and for each --simulate N > 1, 7 + 2 x repeats steps of
one rank's share; --nproc adds 3 x (1 + repeats) images of --steps steps. The default run on a CPU
(sd15, 256 px, 1 repeat, no share: 5 full steps of ~2.6 s on 2 idle cores, plus building the model
and imports) takes under a minute; 145 s measured on our 2 cores shared with a training job. On
CUDA the default is sdxl at 1024 px with 3 repeats."""


def _add_dtype(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: float16 on CUDA, float32 on CPU")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate one image, its rows split over the ranks")
    gen.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (the built-in texture UNet, no download), 'embedded-dit' (the built-in texture "
        "model with the Flux transformer architecture), 'embedded-video' (the built-in moving-texture video "
        "model with the Wan transformer architecture, 64x64, 17 frames), or a diffusers pipeline folder or hub id "
        "(SD 1.5 / 2.1, SDXL, SD3, Flux.1, PixArt, Wan)",
    )
    gen.add_argument(
        "--prompt", default=None, help="text prompt; for the embedded models, the texture class (default: gravel)"
    )
    gen.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height in pixels (default: 1024; embedded-dit: 128; embedded-video: 64; a pipeline: its "
        "model's size)",
    )
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: as height's)")
    gen.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    gen.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="CFG scale for text pipelines (default: the pipeline's); the embedded models have no CFG",
    )
    gen.add_argument("--seed", type=int, default=0)
    _add_dtype(gen)
    gen.add_argument(
        "--out",
        default=None,
        help="output path, written by rank 0: an image (default image.png), or for a video model .mp4 (default "
        "video.mp4), an animated .webp or .gif, or a folder/ of PNG frames",
    )
    gen.add_argument(
        "--frames",
        type=int,
        default=None,
        help="video models: frames to generate (a Wan pipeline: 1 + 4k, default 81)",
    )
    gen.add_argument("--fps", type=float, default=16.0, help="video models: frames per second of the file (default 16)")
    _add_video_args(gen)
    gen.add_argument(
        "--cache",
        type=_cache,
        default=None,
        help=f"a diffusers step cache on the denoiser ({cache_help()}); every rank takes the decision one process "
        "would (see README, 'Step caches'); the summary says how many calls computed",
    )
    gen.add_argument(
        "--show-strips",
        action="store_true",
        help="also write a copy of the image with thin lines at the strip boundaries (OUT's name + .strips)",
    )
    _add_parallel_args(gen)
    _add_verbose(gen)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser(
        "serve",
        help="serve images or videos over HTTP from one long-lived process group (API, web page, health, metrics)",
        description="Serve images over HTTP: POST /v1/images/generations (OpenAI images shape), POST /generate "
        "(a PNG), POST /v1/jobs + GET /v1/jobs/ID (progress), GET /health, GET /metrics, and a web page at /. "
        "A video model (Wan) serves OpenAI's videos API instead: POST /v1/videos, GET /v1/videos/ID (progress), "
        "GET /v1/videos/ID/content (the MP4), DELETE /v1/videos/ID.",
    )
    srv.add_argument("--model", default="embedded", help="as generate's --model (default: embedded)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key",
        default=None,
        help="require this key (Authorization: Bearer KEY) on every endpoint but /health and the page; or set "
        "DISTRIFUSION_API_KEY",
    )
    srv.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more get 503 (default: 16)")
    srv.add_argument("--max-pixels", type=int, default=1024 * 1024, help="largest width x height (default: 1048576)")
    srv.add_argument("--max-steps", type=int, default=100, help="most denoising steps per request (default: 100)")
    srv.add_argument("--max-images", type=int, default=4, help="largest n per request (default: 4)")
    srv.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds a request may take, queue included (default: 600)"
    )
    srv.add_argument(
        "--max-restarts", type=int, default=3, help="restarts of a failed worker group in a row before giving up"
    )
    srv.add_argument("--default-size", type=int, default=None, help="side in px when a request gives no size")
    srv.add_argument("--fps", type=float, default=16.0, help="video models: a clip's frames per second (default 16)")
    srv.add_argument("--max-frames", type=int, default=129, help="video models: most frames per clip (default: 129)")
    srv.add_argument(
        "--clip-store-mb",
        type=float,
        default=2048.0,
        help="video models: finished clips kept, in MiB, in a folder of the server's own that goes when it stops; "
        "the oldest are removed beyond it (default: 2048)",
    )
    srv.add_argument(
        "--clip-ttl", type=float, default=3600.0, help="video models: seconds a finished clip is kept (default: 3600)"
    )
    _add_video_args(srv)
    _add_dtype(srv)
    _add_parallel_args(srv)
    _add_verbose(srv)


def _add_quality(sub: argparse._SubParsersAction) -> None:
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
    qual.add_argument(
        "--compress",
        choices=COMPRESS_MODES,
        nargs="+",
        default=None,
        help="compare these compressions of the displaced exchange (with sync, naive and uncompressed displaced) "
        "instead of the default methods",
    )
    qual.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    qual.add_argument("--out-dir", default="quality", help="where quality.md/json and comparison PNGs go")
    _add_verbose(qual)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="step times of the full model and of one rank's share; traffic; latency",
        description=BENCH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    every = bench.add_argument_group("all measurements")
    every.add_argument(
        "--arch",
        default=None,
        help=f"{' | '.join(ARCHS)} | PATH.json (random weights; a JSON's _class_name picks the diffusers "
        "model class). Default: sdxl on CUDA, sd15 on a CPU (an SDXL UNet takes ~10 GB and a minute to build there)",
    )
    every.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=None,
        help="image sizes in pixels, N (square) or HEIGHTxWIDTH (default: 1024 on CUDA, 256 on a CPU); --nproc uses "
        "the first",
    )
    every.add_argument(
        "--frames",
        type=int,
        default=None,
        help="video archs (Wan, and the Wan VAE wan21_vae): frames of the video, 1 + 4k (default: 81; the VAE: 17)",
    )
    _add_video_args(every)
    _add_dtype(every)
    every.add_argument("--mode", choices=MODES, default="displaced")
    every.add_argument(
        "--text-tokens",
        choices=TEXT_TOKEN_MODES,
        default="sharded",
        help="joint-attention transformers (Flux.1/2, SD3, Qwen-Image): each rank computes a share of the text "
        "(and reference-image) tokens, or all of them (ParallelConfig.text_tokens)",
    )
    every.add_argument(
        "--compress",
        choices=COMPRESS_MODES,
        default=None,
        help="displaced steps' exchange compressed (ParallelConfig.compress); traffic and share timings",
    )
    every.add_argument(
        "--simulate",
        type=int,
        nargs="+",
        default=[1],
        help="(2, and --traffic-only) one rank's share of each N, loopback collectives (default: 1, no share)",
    )
    timed = bench.add_argument_group("timings (1, 2, 3)")
    timed.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions, median reported; with --nproc also images per setting (default: 3 on CUDA, "
        "1 on a CPU)",
    )
    timed.add_argument(
        "--graphs",
        choices=["auto", "on", "off"],
        nargs="+",
        default=["auto"],
        help="CUDA graphs for our runs (auto: on CUDA); several values give one row each (--nproc: the first)",
    )
    timed.add_argument(
        "--compile",
        action="store_true",
        help="(1, 2) time our runs as torch.compile(model) after parallelize (--graphs auto then means off: "
        "compiled code and CUDA graph capture are not combined)",
    )
    images = bench.add_argument_group("whole images (3)")
    images.add_argument(
        "--nproc", type=int, default=1, help="also time whole images over N real local processes against one process"
    )
    images.add_argument("--steps", type=int, default=None, help="denoising steps per image (default: 10)")
    bench.add_argument(
        "--traffic-only",
        action="store_true",
        help="only count the bytes per step for each size and --simulate N (shape-only run: seconds, any size)",
    )
    bench.add_argument(
        "--share-only",
        action="store_true",
        help="a VAE arch: time only the --simulate shares, without the whole decode or a warm-up call (for a "
        "size one device cannot hold)",
    )
    bench.add_argument(
        "--memory",
        action="store_true",
        help="peak memory of one rank's share of each --simulate N (loopback), measured on this device beside the "
        "memory plan's count (plan --memory) for the same: weights, activations, exchange, inputs",
    )
    bench.add_argument("--json", default=None, help="write all results to this JSON file")
    _add_verbose(bench)


PLAN_DESCRIPTION = (
    "Predicts the step time of sync, displaced and displaced + each compression on all the ranks, "
    "and displaced on fewer: each choice's share of a step and its exchange (when each collective is issued, "
    "its bytes, where the step waits for it) are measured, then replayed against the measured link (latency, "
    "bandwidth, ranks' skew); see distrifusion.measure.planner. ParallelConfig(mode='auto') and --mode auto "
    "(generate, serve) run the most faithful choice predicted within 10% of the fastest. Launch it as generate: "
    "--nproc N here, or under torchrun."
)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    pln = sub.add_parser(
        "plan",
        help="measure the link and each choice's share of a step; predict and rank the step times",
        description=PLAN_DESCRIPTION,
    )
    pln.add_argument("--nproc", type=int, default=2, help="ranks to plan for (under torchrun: its world size)")
    pln.add_argument(
        "--arch", default=None, help=f"{' | '.join(ARCHS)} | PATH.json, random weights (default: sdxl on "
        "CUDA, sd15 on a CPU)",
    )  # fmt: skip
    pln.add_argument("--model", default=None, help="plan a pipeline's denoiser instead: embedded, a folder, a hub id")
    pln.add_argument("--height", type=int, default=None, help="pixels (default: 1024 on CUDA, 256 on a CPU)")
    pln.add_argument("--width", type=int, default=None, help="pixels (default: as height's)")
    _add_dtype(pln)
    pln.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (median)")
    pln.add_argument(
        "--measure", action="store_true",
        help="also run each all-rank choice for real and print the prediction's error",
    )  # fmt: skip
    pln.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="collective timeout")
    pln.add_argument("--json", default=None, help="write the plan (and measurements) to this JSON file")
    memory = pln.add_argument_group(
        "memory (--memory: per-rank memory counted on the meta device; no launch, no weights, any machine)"
    )
    memory.add_argument(
        "--memory", action="store_true",
        help="per-rank memory of --arch at --height x --width (--frames) in --dtype for each --ranks N, weights "
        "whole or sharded (ParallelConfig.shard_weights), text encoders replicated, sharded or on the CPU; what "
        "fits each --cards size; the bytes per step of the weight gathers and of the exchange",
    )  # fmt: skip
    memory.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8], help="rank counts (default 1 2 4 8)")
    memory.add_argument("--frames", type=int, default=None, help="video frames (default: the pipeline's, e.g. Wan 81)")
    memory.add_argument(
        "--text-encoder", action="append", default=None, metavar="PATH.json",
        help="a text encoder's config (transformers; repeat for several); 'none': count none. Default: the "
        "pipeline's (distrifusion.measure.archs.PIPELINES)",
    )  # fmt: skip
    memory.add_argument("--vae", default=None, metavar="PATH.json", help="the VAE's config (default: the pipeline's)")
    memory.add_argument("--experts", type=int, default=None, help="denoisers of this shape loaded at once (Wan2.2: 2)")
    memory.add_argument("--cards", type=float, nargs="+", default=None, help="card sizes in GB (default 24 48 80 141)")
    _add_verbose(pln)


def build_parser() -> argparse.ArgumentParser:
    """The `distrifusion` parser: one sub-parser per command, each built by its own `_add_<command>`."""
    parser = _Parser(prog="distrifusion", description=__doc__.split("\n\n")[0])
    _add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_command in (_add_generate, _add_serve, _add_quality, _add_bench, _add_plan):
        add_command(sub)
    return parser


# -- running: errors, signals, output ------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _one_line(e: BaseException) -> str:
    """An exception as one line: no duplicated "distrifusion:" prefix, no C++ source locations."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    text = re.sub(r"^\[[^\]]+\.(?:cc|cpp|h|hpp):\d+\]\s*", "", lines[0])
    while text.startswith("distrifusion: "):
        text = text.removeprefix("distrifusion: ")
    if not isinstance(e, (ValueError, TypeError, OSError)):
        text = f"{type(e).__name__}: {text}"
        if "timed out" in text.lower() or "timeout" in text.lower():
            text += " (a rank stopped responding? --timeout sets how long the others wait)"
    return text + (" (-v for the details)" if len(lines) > 1 else "")


def _exit_code(e: BaseException, running: bool) -> int:
    """2: bad input (a value, a type, a model that cannot be loaded); 1: a failure while running."""
    if isinstance(e, (ValueError, TypeError)) or (isinstance(e, OSError) and not running):
        return 2
    return 1


def report_error(e: BaseException, code: int, verbose: bool, silent: str | None = None) -> None:
    """One line, once: by the launcher (our ranks leave it in the run folder), by rank 0 under torchrun
    for bad input (which every rank finds alike), by each failing rank for a failure. `silent`: the roll
    call's sentence naming ranks that no longer answer (comm.roll_call)."""
    message = _one_line(e) + (f"; {silent}" if silent else "")
    if verbose:
        traceback.print_exception(e)
    run_dir = os.environ.get(RUN_DIR)
    if run_dir and "LOCAL_RANK" in os.environ:
        record = json.dumps({"code": code, "message": message, "time": time.time()})
        Path(run_dir, f"error.{_rank()}").write_text(record)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and code == 1:
        print(f"distrifusion: error on rank {_rank()}: {message}", file=sys.stderr)
    elif _rank() == 0:
        print(f"distrifusion: error: {message}", file=sys.stderr)


def _quiet(verbose: bool) -> None:
    """Keep torch's and diffusers' messages that are not the user's business out of the output."""
    import logging
    import warnings

    rank0 = _rank() == 0
    own = logging.getLogger("distrifusion")
    own.propagate = False
    if not own.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        own.addHandler(handler)
    own.setLevel(logging.INFO if rank0 or verbose else logging.WARNING)
    if verbose:
        return
    for name, value in (
        ("TORCH_CPP_LOG_LEVEL", "ERROR"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("HF_HUB_VERBOSITY", "error"),
    ):
        os.environ.setdefault(name, value)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", message="distrifusion")  # ours (e.g. an option without effect) stay

    def show(message, category, filename, lineno, file=None, line=None):
        if rank0:
            print(f"distrifusion: warning: {str(message).removeprefix('distrifusion: ')}", file=sys.stderr)

    warnings.showwarning = show


def _note(text: str) -> None:
    if _rank() == 0:
        print(f"distrifusion: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    t0 = float(os.environ.get("DISTRIFUSION_T0") or time.time())
    argv = sys.argv[1:] if argv is None else list(argv)
    launched = RUN_DIR in os.environ and "LOCAL_RANK" in os.environ
    if launched:
        as_rank()
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        as_torchrun_worker()
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # to relaunch as ranks, and (quoted) to name the command in reports
    args.command_line = shlex.join(["distrifusion", *argv])
    args.t0 = t0
    _quiet(args.verbose)
    try:
        notes = check(args)
    except ValueError as e:  # UsageError, or ParallelConfig's own
        report_error(e, 2, False)
        return 2
    for note in notes:
        _note(note)
    launches = args.command == "generate" or (args.command == "plan" and not args.memory)
    if launches and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch(args.nproc, argv, t0=t0, verbose=args.verbose)
    # Under torchrun, SIGTERM is the agent ending the job (the agent reports): a generate rank ends at once
    # (SIG_DFL), even blocked in a collective, where a Python handler would wait for the collective's timeout.
    torchrun_generate = "TORCHELASTIC_RUN_ID" in os.environ and args.command == "generate"
    if not launched and not torchrun_generate and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_interrupted)
    args.running = False
    try:
        commands = {"generate": generate, "quality": quality, "bench": bench, "serve": serve, "plan": plan}
        code = commands[args.command](args)
        _close_process_group()
        return code
    except (KeyboardInterrupt, Interrupted) as e:
        _release_graphs()
        signum = getattr(e, "signum", signal.SIGINT)
        if _rank() == 0:
            print(f"distrifusion: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # noqa: BLE001 - every failure ends as one line and an exit code
        _release_graphs()
        code = _exit_code(e, args.running)
        silent = None
        if code == 1 and "torch.distributed" in sys.modules:
            from ..engine.comm import roll_call

            silent = roll_call(min(5.0, getattr(args, "timeout", None) or 300.0))
        report_error(e, code, args.verbose, silent)
        return code


def _close_process_group() -> None:
    """A rank that exits with collectives in flight or gloo threads running can abort in C++ teardown
    ("terminate called without an active exception"): meet the others, then close the group, after
    destroying every CUDA graph (NCCL >= 2.26 waits in the group's destruction for the graphs that hold
    its collectives; ours live in reference cycles that only the garbage collector would end)."""
    _release_graphs()
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _release_graphs() -> None:
    """Destroy every CUDA graph of this process (no collective: also on the way out after a failure)."""
    if "distrifusion.engine.graphs" in sys.modules:
        from ..engine.graphs import release_all_graphs

        release_all_graphs()


# -- the commands --------------------------------------------------------------------------------


def _dtype(name: str | None):
    import torch

    if name:
        return getattr(torch, name)
    return torch.float16 if torch.cuda.is_available() else torch.float32


def _parallel_config(args: argparse.Namespace) -> ParallelConfig:
    geo: Geometry | None = args.geometry
    uses_cfg = geo.cfg if geo is not None else True
    return ParallelConfig(
        mode=args.mode,
        warmup_steps=args.warmup_steps,
        groupnorm=args.groupnorm,
        text_tokens=args.text_tokens,
        split_cfg=args.split_cfg and uses_cfg,  # no CFG batch, nothing to split (and no notice saying so)
        cuda_graphs=args.cuda_graphs,
        compress=args.compress,
        video_split=getattr(args, "video_split", ParallelConfig.video_split),
        **({"timeout_s": args.timeout} if args.timeout else {}),
        **({"auto_size": (args.height, args.width)} if getattr(args, "height", None) else {}),
    )


def serve(args: argparse.Namespace) -> int:
    from .serve import WorkerGroup, rank_main, serve_front

    if "LOCAL_RANK" not in os.environ:  # the front: it starts the ranks (and restarts them)
        return serve_front(args, WorkerGroup(args.argv, args.nproc), args.nproc)
    args.config = _parallel_config(args)
    args.dtype_value = _dtype(args.dtype)
    return rank_main(args)


def generate(args: argparse.Namespace) -> int:
    import torch

    import distrifusion

    from ..measure.timing import peak_memory_mb

    if not args.verbose:  # loading bars; the denoising bar (rank 0's) stays
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    config = _parallel_config(args)
    height, width = args.height, args.width
    dtype = _dtype(args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    times: dict[str, float] = {}
    from ..measure.timing import DeviceSpan, TimedCommunicator, time_phase
    from ..parallel.parallelize import denoiser_of, denoisers_of
    from .pipelines import load_pipeline

    pipe = load_pipeline(args.model, dtype)
    video = getattr(args, "video", False)
    extra = {"num_frames": args.frames} if video else {}  # a video pipeline (diffusers' Wan, an embedded one)
    if args.model in EMBEDDED:
        default_class = "gravel" if "gravel" in pipe.classes else pipe.classes[0]
        label = pipe.class_index(args.prompt or default_class)
        pipe = distrifusion.parallelize(pipe, config)
        run = lambda: pipe(  # noqa: E731
            label, height=height, width=width, num_inference_steps=args.steps, generator=generator, **extra
        )
    else:
        pipe = distrifusion.parallelize(pipe, config)
        device = denoiser_of(pipe)._distrifusion_state.runtime.device  # phases synchronised on CUDA
        if hasattr(pipe, "encode_prompt"):
            time_phase(pipe, "encode_prompt", times, "text encoding", device)
        if getattr(pipe, "vae", None) is not None:
            time_phase(pipe.vae, "decode", times, "VAE decoding", device)
        if args.guidance_scale is not None:
            extra["guidance_scale"] = args.guidance_scale
        prompt = args.prompt or "a photograph of a lighthouse at dusk"
        run = lambda: pipe(  # noqa: E731
            prompt=prompt, height=height, width=width, num_inference_steps=args.steps, generator=generator, **extra
        )
    denoiser = denoiser_of(pipe)
    computed = None
    if args.cache is not None:  # after parallelize: the engine feeds the hooks the whole image's statistic
        from ..measure.caching import ComputedCalls, enable_cache

        enable_cache(denoiser, args.cache)
        computed = ComputedCalls(denoiser)
    state = denoiser._distrifusion_state
    runtime = state.runtime
    clock = [0.0]
    timed_exchange = runtime.world_size > 1 and runtime.device.type == "cpu"
    if timed_exchange:  # before the first call, which builds the exchange from these communicators
        runtime.world = TimedCommunicator(runtime.world, clock)
        runtime.patch_groups = {k: TimedCommunicator(c, clock) for k, c in runtime.patch_groups.items()}
    marks: dict[str, float] = {}
    # From the first denoiser call's start to the last one's end, however many calls a step makes (true
    # CFG calls it twice): on CUDA as the device ran them (events, read after the image), not as launched.
    span = DeviceSpan(runtime.device)

    def before(module, inputs):
        if span.first is None:
            marks["waited_before"] = clock[0]
            span.start()

    def after(module, inputs, output):
        span.stop()
        marks["waited"] = clock[0]  # the denoising's waits (not a split VAE's)

    hooks = []
    for model in denoisers_of(pipe):  # Wan 2.2 A14B: both experts' steps
        hooks += [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    args.running = True
    start = time.perf_counter()
    startup = time.time() - args.t0
    result = run()
    image = result.frames[0] if video else result.images[0]
    seconds = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    denoising = span.seconds()
    denoising = seconds if denoising is None else denoising
    waited = marks.get("waited", clock[0]) - marks.get("waited_before", 0.0)
    mine = dict(denoising=denoising, wait=waited, peak_mb=peak_memory_mb(runtime.device))
    everyone = [mine]
    if runtime.world_size > 1:
        import torch.distributed as dist

        everyone = [None] * runtime.world_size
        dist.all_gather_object(everyone, mine)
    if _rank() != 0:
        return 0
    out = Path(args.out)
    if video:
        from .video import write_video

        write_video(image, args.out, args.fps)
    else:
        _save(image, out)
    if args.show_strips:
        note = _save_strips(image, strips_path(args.out), state, runtime.world_size)
        if note:
            _note(note)
    total = time.time() - args.t0
    phases = [f"start-up {startup:.1f} s (launch, imports, loading)"]
    phases += [f"{name} {times[name]:.1f} s" for name in ("text encoding",) if name in times]
    per_step = denoising / args.steps
    split = ""
    if timed_exchange:
        worst = max(r["wait"] for r in everyone) / args.steps
        split = f"; waiting for the other ranks {worst:.2f} s/step, max over ranks"
    phases.append(f"denoising {denoising:.1f} s ({per_step:.2f} s/step{split})")
    phases += [f"{name} {times[name]:.1f} s" for name in ("VAE decoding",) if name in times]
    rest = total - startup - denoising - sum(times.values())
    phases.append(f"other {max(rest, 0.0):.1f} s")
    memory = ", ".join(f"{r['peak_mb'] / 1024:.2f}" for r in everyone)
    world = runtime.world_size
    mode = state.config.mode + (f" + {state.config.compress}" if state.config.compress else "")
    mode += " (auto)" if args.mode == "auto" else ""
    if computed is not None:
        mode += f", {args.cache}"
        if args.cache.kind == "fbcache":  # pab and taylorseer skip inside calls that still run every block
            mode += f": {computed.computed} of {computed.calls} calls computed"
    size = f"{width}x{height}"
    if video:
        size += f", {len(image)} frames at {args.fps:g} fps, split in {config.video_split}"
    print(
        f"wrote {args.out} ({size}, {args.steps} steps, {mode}, {world} rank{'s' * (world > 1)}) "
        f"in {total:.1f} s: {', '.join(phases)}; peak memory per rank {memory} GB",
        flush=True,
    )
    return 0


def _save(image, out: Path) -> None:
    """Write through a temporary file, so that an interrupted run leaves no half-written image."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{out.suffix}")
    try:
        image.save(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def strips_path(out: str) -> Path:
    path = Path(out)
    return path.with_name(f"{path.stem}.strips{path.suffix}")


def strip_boundaries(image_height: int, partition) -> list[int]:
    """Pixel rows where a strip of the engine's split (`Partition.rows`, in the model's rows) begins, but the first."""
    if partition is None or partition.patch_size < 2:
        return []
    px = image_height // partition.height
    starts, row = [], 0
    for rows in partition.rows[:-1]:
        row += rows
        starts.append(row * px)
    return starts


def _save_strips(image, path: Path, state, world: int) -> str | None:
    """A copy of the image with a thin red line where each strip begins; a note when there are none."""
    from PIL import ImageDraw

    partition = state.partition if world > 1 else None
    copy = image.convert("RGB")
    draw = ImageDraw.Draw(copy)
    for y in strip_boundaries(copy.height, partition):
        draw.line([(0, y), (copy.width - 1, y)], fill=(255, 0, 0), width=1)
    _save(copy, path)
    if world == 1:
        return f"--show-strips: 1 rank, one strip; wrote {path} without lines"
    if partition is not None and partition.patch_size == 1:
        return (
            f"--show-strips: each of the {world} ranks computes one CFG branch of the whole image, no strips "
            f"(use 4 ranks or --no-split-cfg to see patches); wrote {path} without lines"
        )
    return None


def quality(args: argparse.Namespace) -> int:
    import torch

    from ..measure.quality import compression_methods, run_quality, write_report
    from .pipelines import EMBEDDED, EMBEDDED_DIT, load_texture_dit_pipeline, load_texture_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "embedded-dit" or (Path(args.model) / "transformer").is_dir():
        pipe = load_texture_dit_pipeline(EMBEDDED_DIT if args.model == "embedded-dit" else args.model)
        scheduler = None
    else:
        pipe = load_texture_pipeline(EMBEDDED if args.model == "embedded" else args.model)
        scheduler = args.scheduler or "ddim"
    args.running = True
    methods = compression_methods(args.compress) if args.compress else None
    results = run_quality(pipe, args.height, args.width, args.steps, scheduler, args.seeds, args.ranks, methods)
    write_report(results, Path(args.out_dir), args.command_line)
    print(f"wrote {args.out_dir}/quality.md, quality.json and comparison images")
    return 0


def bench(args: argparse.Namespace) -> int:
    import torch

    from ..measure.bench import (
        bench_images,
        bench_step,
        bench_vae,
        count_traffic,
        format_row,
        format_table,
    )
    from ..measure.workload import build_model

    cuda = torch.cuda.is_available()
    args.arch = args.arch or ("sdxl" if cuda else "sd15")
    args.sizes = args.sizes or [(1024, 1024) if cuda else (256, 256)]
    args.repeats = args.repeats or (3 if cuda else 1)
    args.steps = args.steps or 10
    dtype = _dtype(args.dtype)
    graph_choices = [{"auto": None, "on": True, "off": False}[g] for g in dict.fromkeys(args.graphs)]

    def images() -> dict:  # whole images at the first size (--nproc runs use the first --graphs choice)
        (height, width), graphs = args.sizes[0], graph_choices[0]
        return bench_images(
            args.arch,
            height,
            width,
            dtype,
            args.steps,
            args.repeats,
            args.mode,
            graphs,
            text_tokens=args.text_tokens,
            compress=args.compress,
            frames=args.frames,
        )

    args.running = True
    if "LOCAL_RANK" in os.environ:  # a rank launched by the --nproc branch below
        row = images()
        if _rank() == 0:
            Path(os.environ["DISTRIFUSION_BENCH_OUT"]).write_text(json.dumps(row))
        return 0
    rows: list[dict] = []

    def save(rows: list[dict]) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"command": args.command_line, "results": rows}, indent=1))

    if is_vae(args.arch):
        if args.traffic_only or args.nproc > 1:
            raise UsageError("a VAE arch measures the decode alone: --traffic-only and --nproc do not apply")
        for height, width in args.sizes:
            timed = dict(share_only=args.share_only, frames=args.frames)
            for row in bench_vae(args.arch, height, width, dtype, args.simulate, args.repeats, **timed):
                share_only = row["time_vs_full"] is None
                frames = f" x {row['frames']} frames" if "frames" in row else ""
                print(
                    f"{row['arch']} decode {row['height']}x{row['width']}{frames} {row['dtype']} on {row['card']}, "
                    f"{row['ranks']} rank(s): {row['decode_s'] * 1e3:.0f} ms"
                    + ("" if share_only else f" ({row['time_vs_full']:.3f} of the whole decode)")
                    + f", activation memory {row['activation_mb']:.0f} MB"
                    + ("" if row["memory_vs_full"] is None else f" ({row['memory_vs_full']:.3f})")
                    + f", received {row['received_bytes'] / 1e6:.1f} MB"
                    + (
                        f"; whole decode not run (it needs at least {row['full_min_mb'] / 1024:.1f} GiB: "
                        "one layer's input and output)"
                        if share_only
                        else ""
                    ),
                    flush=True,
                )
                rows.append(row)
                save(rows)
        return 0
    if args.memory:
        from ..measure.memory import measure_share_memory

        device = torch.device("cuda" if cuda else "cpu")
        for size in args.sizes:
            for row in measure_share_memory(args.arch, size, size, dtype, args.simulate, device, args.mode):
                print(
                    f"{row['arch']} {size}x{size} {row['dtype']} on {row['device']}, share of {row['ranks']} rank(s): "
                    f"peak {row['measured'] / 1e9:.3f} GB measured, {row['predicted'] / 1e9:.3f} GB planned "
                    f"({row['error']:+.1%}): weights {row['weights'] / 1e9:.3f} GB + a step's activations, exchange "
                    f"and inputs {row['step_measured'] / 1e9:.3f} GB measured, {row['step_planned'] / 1e9:.3f} planned",
                    flush=True,
                )
                rows.append(row)
        save(rows)
        return 0
    if args.traffic_only:
        traffic = count_traffic(
            args.arch,
            args.sizes,
            dtype,
            args.simulate,
            args.mode,
            args.text_tokens,
            args.compress,
            args.frames,
            args.video_split,
        )
        for row in traffic:
            frames = f" x {row['frames']} frames ({row['video_split']} strips)" if row.get("frames") else ""
            print(
                f"{row['arch']} {row['height']}x{row['width']}{frames} {row['dtype']}, {row['ranks']} ranks "
                f"({row['cfg_groups']} CFG groups, {row['text_tokens']} text): received per rank "
                f"{row['step_bytes'] / 1e9:.3f} GB per {row['mode']} step, {row['sync_step_bytes'] / 1e9:.3f} GB per "
                f"synchronous step; Ulysses would receive {row['ulysses_step_bytes'] / 1e9:.3f} GB per step",
                flush=True,
            )
            rows.append(row)
        save(rows)
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(args.arch, dtype, device)
    for height, width in args.sizes:
        for graphs in graph_choices:
            for row in bench_step(
                args.arch,
                height,
                width,
                dtype,
                args.simulate,
                args.repeats,
                args.mode,
                device,
                graphs,
                model,
                text_tokens=args.text_tokens,
                compiled=args.compile,
                compress=args.compress,
                frames=args.frames,
                video_split=args.video_split,
            ):
                print(format_row(row), flush=True)
                rows.append(row)
                save(rows)  # after every row: a later size that runs out of memory keeps the earlier ones
    del model
    print(format_table(rows), flush=True)
    if args.nproc > 1:
        cores = os.cpu_count() or 1
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            row = images()
            print(f"1 process x {threads} thread(s): {row['image_s']:.2f} s per image", flush=True)
            rows.append(row)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rank0.json")
            threads = max(1, cores // args.nproc)
            rank_argv = [*args.argv, "--arch", args.arch, "--repeats", str(args.repeats), "--steps", str(args.steps)]
            rank_env = {"DISTRIFUSION_BENCH_OUT": out, "OMP_NUM_THREADS": str(threads)}
            code = launch(args.nproc, rank_argv, rank_env, verbose=args.verbose)
            if code:
                return code
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


def memory_plan(args: argparse.Namespace) -> int:
    """`plan --memory`: the per-rank memory table (measure.memory), counted on the meta device."""
    from ..measure.memory import CARDS_GB, format_memory_plan, pipeline_parts
    from ..measure.memory import memory_plan as make_memory_plan

    encoders = None if args.text_encoder is None else [t for t in args.text_encoder if t != "none"]
    parts = pipeline_parts(args.arch, _dtype(args.dtype), encoders, args.vae, args.experts)
    args.running = True
    cards = tuple(args.cards or CARDS_GB)
    found = make_memory_plan(parts, args.height, args.width, args.frames, args.ranks, cards_gb=cards)
    print(format_memory_plan(found))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(command=args.command_line, **found), indent=1, default=str))
    return 0


def plan(args: argparse.Namespace) -> int:
    if args.memory:
        return memory_plan(args)
    import torch

    from ..engine.comm import init_runtime
    from ..measure.planner import Choice, choices, format_plan, measure, pixels_per_latent
    from ..measure.planner import plan as make_plan
    from ..measure.workload import build_model, model_inputs

    runtime = init_runtime(args.timeout or 300.0)
    dtype = _dtype(args.dtype)
    scale = None
    if args.model:
        from ..parallel.parallelize import denoiser_of
        from .pipelines import load_pipeline

        pipe = load_pipeline(args.model, dtype)
        model = denoiser_of(pipe).to(runtime.device)
        scale = pixels_per_latent(pipe)
    else:
        model = build_model(args.arch, dtype, runtime.device)
    inputs = model_inputs(model, args.height, args.width, scale=scale)
    args.running = True
    found = make_plan(model, inputs, runtime, choices(runtime.world_size), args.repeats)
    measured = {}
    if args.measure:
        for row in found["rows"]:
            if row["ranks"] == runtime.world_size:
                choice = Choice(row["ranks"], row["mode"], row["compress"])
                row["measured_s"] = measure(model, inputs, runtime, choice, args.repeats)
                measured[(row["ranks"], row["choice"])] = row["measured_s"]
    if runtime.rank == 0:
        device = runtime.device
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        what = args.model or args.arch
        print(f"plan: {what} {args.height}x{args.width} {args.dtype}, {runtime.world_size} ranks on {card}")
        print(format_plan(found, measured))
        if args.json:
            record = dict(command=args.command_line, card=card, threads=torch.get_num_threads(), **found)
            Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
