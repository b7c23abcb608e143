"""`distrifusion` command line: generate an image over several local ranks or under torchrun.

Every command first checks all of its input (`check`), before any process is spawned and before
any weight is loaded; torch and diffusers are imported inside the commands only, so that `--help`
and a refused command answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .config import GROUPNORM_MODES, MODES, TEXT_TOKEN_MODES, ParallelConfig

DTYPE_NAMES = ("float32", "float16", "bfloat16")
DATA = Path(__file__).parent / "data"
EMBEDDED = {"embedded": DATA / "textures", "embedded-dit": DATA / "textures_dit"}
BENCH_ARCHS = {  # as bench.ARCHS (which imports torch)
    "sd15": "sd15_unet.json",
    "sd21": "sd21_unet.json",
    "sdxl": "sdxl_unet.json",
    "flux_dev": "flux_dev_transformer.json",
    "sd3_medium": "sd3_medium_transformer.json",
    "pixart_alpha": "pixart_alpha_transformer.json",
    "sd_vae": "sd_vae.json",
    "sdxl_vae": "sdxl_vae.json",
}
RUN_DIR = "DISTRIFUSION_RUN_DIR"
"""Set by `launch` for its ranks: where a rank leaves its error for the launcher to report once."""


class UsageError(ValueError):
    """Bad input, found before any work: one line, exit code 2."""


# -- the parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message, as one line
        if os.environ.get("RANK", "0") == "0":
            print(f"distrifusion: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distrifusion", description=__doc__.split("\n\n")[0])
    _add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate one image, its rows split over the ranks")
    gen.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (the built-in texture UNet, no download), 'embedded-dit' (the built-in texture "
        "model with the Flux transformer architecture), or a diffusers pipeline folder or hub id (SD 1.5 / 2.1, "
        "SDXL, SD3, Flux.1, PixArt)",
    )
    gen.add_argument(
        "--prompt", default=None, help="text prompt; for the embedded models, the texture class (default: gravel)"
    )
    gen.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height in pixels (default: 1024; embedded-dit: 256; a pipeline: its model's size)",
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
    gen.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: float16 on CUDA, float32 on CPU")
    gen.add_argument("--out", default="image.png", help="output image path (written by rank 0)")
    gen.add_argument(
        "--show-strips",
        action="store_true",
        help="also write a copy of the image with thin lines at the strip boundaries (OUT's name + .strips)",
    )
    _add_parallel_args(gen)
    _add_verbose(gen)

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
    _add_verbose(qual)

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
        help=f"{' | '.join(BENCH_ARCHS)} | PATH.json (random weights; a JSON's _class_name picks the diffusers "
        "model class). Default: sdxl on CUDA, sd15 on a CPU (an SDXL UNet takes ~10 GB and a minute to build there)",
    )
    every.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="square image sizes in pixels (default: 1024 on CUDA, 256 on a CPU); --nproc uses the first",
    )
    every.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: float16 on CUDA, float32 on CPU")
    every.add_argument("--mode", choices=MODES, default="displaced")
    every.add_argument(
        "--text-tokens",
        choices=TEXT_TOKEN_MODES,
        default="replicated",
        help="Flux/SD3: every rank computes all text tokens, or a share each (ParallelConfig.text_tokens)",
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
    bench.add_argument("--json", default=None, help="write all results to this JSON file")
    _add_verbose(bench)
    return parser


# -- what a model needs of an image size ---------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What a model needs of the image size, in pixels, and whether its calls carry a CFG batch."""

    name: str
    """The model, as an error message names it ("the embedded model", "this SDXL pipeline")."""
    own_px: int
    """Height and width must be multiples of this to run at all, on one rank."""
    block_px: int
    """With several ranks, the height must be a multiple of this: the engine's block, in pixels."""
    block_note: str
    """What the block is, in the model's own units (for messages: "8 latent rows of 8 px")."""
    own_note: str
    cfg: bool
    """Whether every model call carries a CFG batch (unconditional and conditional halves)."""
    default_px: int


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def _unet_levels(config: dict) -> int:
    """A diffusers UNet downsamples after every down block but the last."""
    return 2 ** (len(config.get("down_block_types", ())) - 1)


def embedded_geometry(kind: str, folder: Path) -> Geometry:
    """The texture models: a pixel-space UNet2DModel, or a Flux transformer on 2x2-packed pixels."""
    name = "the embedded model" if folder == EMBEDDED.get(kind) else f"the texture model in {folder}"
    if (folder / "transformer").is_dir():
        patch = _read_json(folder / "transformer" / "config.json").get("patch_size", 1) or 1
        px = 2 * patch
        note = f"2x2 pixels per token{f', {patch}x{patch} tokens per patch' if patch > 1 else ''}"
        return Geometry(name, px, px, f"one token row of {px} px", note, False, 256)
    block = _unet_levels(_read_json(folder / "unet" / "config.json"))
    note = f"the UNet halves the image {block.bit_length() - 1} times"
    return Geometry(name, block, block, note, note, False, 1024)


PIPELINE_CFG = {"UNet2DConditionModel": True, "SD3Transformer2DModel": True, "PixArtTransformer2DModel": True}


def pipeline_geometry(model: str, guidance_scale: float | None) -> Geometry | None:
    """A diffusers pipeline's needs, from its config files alone (a local folder, or a hub id already in
    the local cache); None when they cannot be read cheaply: the first call checks them then."""
    path = Path(model)
    if path.is_dir():
        read = lambda name: path / name if (path / name).is_file() else None  # noqa: E731
        if read("model_index.json") is None:
            raise UsageError(f"{model} is not a diffusers pipeline folder (it has no model_index.json)")
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not a hub id
        raise UsageError(f"model folder {model} does not exist")
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None

        def read(name: str) -> Path | None:
            found = try_to_load_from_cache(model, name)
            return Path(found) if isinstance(found, str) else None

        if read("model_index.json") is None:
            return None
    index = _read_json(read("model_index.json"))
    kind = "transformer" if "transformer" in index else "unet" if "unet" in index else None
    config_path = read(f"{kind}/config.json") if kind else None
    if config_path is None:
        return None
    config = _read_json(config_path)
    cls = (index.get(kind) or [None, None])[1]
    vae_path = read("vae/config.json")
    vae = 2 ** (len(_read_json(vae_path).get("block_out_channels", (0,) * 4)) - 1) if vae_path else 8
    pipe = index.get("_class_name", "pipeline")
    name = f"this {pipe}"
    if cls == "UNet2DConditionModel":
        levels = _unet_levels(config)
        block_note, own, own_note = f"{levels} latent rows of {vae} px", vae, f"the VAE's {vae} px per latent row"
    elif cls == "FluxTransformer2DModel":  # 2x2 latent cells per token: a token row is 2 latent rows
        levels, own = 2, 2 * vae
        block_note = own_note = f"one token row: 2 latent rows of {vae} px"
    elif cls in ("SD3Transformer2DModel", "PixArtTransformer2DModel"):
        levels = config.get("patch_size", 2)
        own = levels * vae
        block_note = own_note = f"one patch row: {levels} latent rows of {vae} px"
    else:
        return None
    cfg = PIPELINE_CFG.get(cls, False) and (guidance_scale is None or guidance_scale > 1)
    default = (config.get("sample_size") or 128) * vae
    if cls == "FluxTransformer2DModel":
        default = 1024
    return Geometry(name, own, levels * vae, block_note, own_note, cfg, default)


def bench_geometry(arch: str | None) -> Geometry:
    """A bench architecture: a denoiser config; bench feeds it latents of size // 8."""
    arch = arch or "sd15"  # sdxl on CUDA: the same block
    if arch in BENCH_ARCHS:
        path = DATA / "configs" / BENCH_ARCHS[arch]
    elif arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise UsageError(f"--arch {arch}: no such file")
    else:
        raise UsageError(f"unknown architecture {arch!r}; use one of {', '.join(BENCH_ARCHS)} or a config .json path")
    config = _read_json(path)
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls == "AutoencoderKL":  # a decode: any whole number of latent rows
        return Geometry(f"--arch {arch}", 8, 8, "one latent row of 8 px", "8 px per latent row", False, 1024)
    if cls == "FluxTransformer2DModel":
        note = "one token row: 2 latent rows of 8 px"
        return Geometry(f"--arch {arch}", 16, 16, note, note, False, 1024)
    if cls in ("SD3Transformer2DModel", "PixArtTransformer2DModel"):
        patch = config.get("patch_size", 2)
        note = f"one patch row: {patch} latent rows of 8 px"
        return Geometry(f"--arch {arch}", 8 * patch, 8 * patch, note, note, True, 1024)
    levels = _unet_levels(config)
    return Geometry(f"--arch {arch}", 8, 8 * levels, f"{levels} latent rows of 8 px", "8 px per latent row", True, 1024)


def _is_vae(arch: str) -> bool:
    path = DATA / "configs" / BENCH_ARCHS[arch] if arch in BENCH_ARCHS else Path(arch)
    return _read_json(path).get("_class_name") == "AutoencoderKL"


def _nearest(value: int, multiple: int) -> str:
    below = value // multiple * multiple
    return f"{below} or {below + multiple}" if below > 0 else f"{multiple}"


def check_image_size(geo: Geometry, height: int, width: int, ranks: int, split_cfg: bool = True, what: str = "") -> int:
    """Refuse a size the model or the split cannot take; return the patch group size (ranks that share rows).

    The messages are the engine's (`parallelize`: "image height of N ... must be a multiple of the model's
    block of ...", "... is too small to split over N ranks; the minimum is ..."), in pixels."""
    for side, value in (("height", height), ("width", width)):
        if value <= 0:
            raise UsageError(f"image {side} must be positive, got {value} px{what}")
        if value % geo.own_px:
            block = "the model's block of " if geo.own_px == geo.block_px else ""
            raise UsageError(
                f"image {side} of {value} px must be a multiple of {block}{geo.own_px} px ({geo.name}: "
                f"{geo.own_note}); use {_nearest(value, geo.own_px)}{what}"
            )
    cfg_groups = 2 if geo.cfg and split_cfg and ranks % 2 == 0 else 1
    patch = ranks // cfg_groups
    if ranks > 1 and height % geo.block_px:
        raise UsageError(
            f"image height of {height} px must be a multiple of the model's block of {geo.block_px} px "
            f"({geo.block_note}) to be split over ranks; use {_nearest(height, geo.block_px)}{what}"
        )
    if height < patch * geo.block_px:
        most = height // geo.block_px
        split = f"{patch} ranks" + (f" ({ranks} ranks, CFG halves on 2 groups)" if cfg_groups == 2 else "")
        raise UsageError(
            f"image height of {height} px is too small to split over {split}; the minimum is {patch * geo.block_px} "
            f"px ({geo.block_px} px per rank). Use a larger height or fewer ranks (at most {most * cfg_groups}){what}"
        )
    return patch


def _positive(name: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")


def _finite(name: str, value: float | None, positive: bool = False) -> None:
    if value is None:
        return
    if positive and value <= 0:
        raise UsageError(f"{name} must be > 0, got {value:g}")
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")


def _writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist ({what})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder} is not writable ({what})")


def _check_image_path(out: str, flag: str = "--out") -> None:
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"{flag} {out} is a folder; name an image file in it, e.g. {path / 'image.png'}")
    from PIL import Image

    Image.init()
    known = Image.registered_extensions()
    if path.suffix.lower() not in known or known[path.suffix.lower()] not in Image.SAVE:
        raise UsageError(f"{flag} {out}: unknown image format {path.suffix!r}; use .png, .jpg, .webp, ...")
    _writable_folder(path.parent if str(path.parent) else Path("."), f"{flag} {out}")


def strips_path(out: str) -> Path:
    path = Path(out)
    return path.with_name(f"{path.stem}.strips{path.suffix}")


def _world(args) -> int:
    """Ranks of this run: torchrun's (or our launcher's) world size, else --nproc."""
    return int(os.environ["WORLD_SIZE"]) if "LOCAL_RANK" in os.environ else args.nproc


def _cuda_likely() -> bool:
    """Whether an NVIDIA driver is present (checked without importing torch)."""
    return Path("/proc/driver/nvidia/version").exists() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""


def _common_parallel_checks(args) -> None:
    _positive("--nproc", args.nproc)
    _finite("--timeout", args.timeout, positive=True)
    ParallelConfig(  # its own checks (warmup_steps >= 0, ...), named by their flags
        **{
            k: getattr(args, k)
            for k in ("mode", "groupnorm", "text_tokens", "cuda_graphs")
            if getattr(args, k, None) is not None
        }
    )


def check(args) -> list[str]:
    """Every check of a command's input that needs no model weights: raise UsageError, or return notes."""
    return {"generate": check_generate, "quality": check_quality, "bench": check_bench}[args.command](args)


def check_generate(args) -> list[str]:
    notes = []
    _common_parallel_checks(args)
    _positive("--steps", args.steps)
    _positive("--warmup-steps", args.warmup_steps, 0)
    _finite("--guidance-scale", args.guidance_scale)
    if not -(2**63) <= args.seed < 2**64:
        raise UsageError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    _check_image_path(args.out)
    if args.model in EMBEDDED:
        folder = EMBEDDED[args.model]
        geo = embedded_geometry(args.model, folder)
        classes = _read_json(folder / "classes.json")["classes"]
        prompt = args.prompt or ("gravel" if "gravel" in classes else classes[0])
        if not (prompt in classes or prompt.isdigit() and int(prompt) < len(classes)):
            raise UsageError(f"unknown class {prompt!r}; the embedded model knows: {', '.join(classes)}")
        if args.guidance_scale is not None:
            notes.append("--guidance-scale has no effect on the embedded models (they have no CFG)")
    else:
        geo = pipeline_geometry(args.model, args.guidance_scale)
    args.geometry = geo
    if args.height is None:
        args.height = geo.default_px if geo else 1024
    if args.width is None:
        args.width = args.height
    world = _world(args)
    if geo is not None:
        check_image_size(geo, args.height, args.width, world, args.split_cfg)
    else:
        for side, value in (("height", args.height), ("width", args.width)):
            if value <= 0:
                raise UsageError(f"image {side} must be positive, got {value} px")
    return notes + _cores_note(args.nproc)


def _cores_note(nproc: int) -> list[str]:
    """More local ranks than cores on a CPU run: allowed, but worth a word."""
    cores = os.cpu_count() or 1
    if nproc > cores and "LOCAL_RANK" not in os.environ and not _cuda_likely():
        return [f"{nproc} ranks on {cores} CPU cores: they share the cores, expect it to be slower"]
    return []


def check_quality(args) -> list[str]:
    _positive("--steps", args.steps)
    _positive("--seeds", args.seeds)
    _positive("--threads", args.threads)
    for n in args.ranks:
        _positive("--ranks", n)
    if args.model in EMBEDDED:
        folder = EMBEDDED[args.model]
    else:
        folder = Path(args.model)
        if not ((folder / "unet").is_dir() or (folder / "transformer").is_dir()):
            raise UsageError(f"{args.model} is not a texture model folder (no unet/ or transformer/ in it)")
    geo = embedded_geometry(args.model, folder)
    for side, value in (("height", args.height), ("width", args.width)):
        if 0 < value < 7:
            raise UsageError(f"image {side} of {value} px is too small for SSIM's 7x7 window; use at least 8")
    for n in sorted(set(args.ranks), reverse=True):
        check_image_size(geo, args.height, args.width, n, what=f" (--ranks {n})")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {args.out_dir} is a file, not a folder")
    _writable_folder(out if out.exists() else out.parent, f"--out-dir {args.out_dir}")
    return []


def check_bench(args) -> list[str]:
    notes = []
    _positive("--nproc", args.nproc)
    _positive("--repeats", args.repeats)
    _positive("--steps", args.steps)
    for n in args.simulate:
        _positive("--simulate", n)
    geo = bench_geometry(args.arch)
    sizes = args.sizes or [1024 if _cuda_likely() else 256]
    for i, size in enumerate(sizes):
        for n in sorted({*args.simulate, args.nproc if i == 0 else 1}, reverse=True):
            check_image_size(geo, size, size, n, what=f" (--sizes {size})")
    if args.json:
        _writable_folder(Path(args.json).parent, f"--json {args.json}")
    if "LOCAL_RANK" not in os.environ:
        if args.steps is not None and args.nproc == 1:
            notes.append("--steps applies to --nproc's whole images only; the other timings are of single steps")
        if args.traffic_only and (args.repeats or args.nproc > 1 or args.graphs != ["auto"]):
            notes.append("--traffic-only times nothing: --repeats, --graphs and --nproc are ignored")
    return notes + _cores_note(args.nproc if not args.traffic_only else 1)


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


def report_error(e: BaseException, code: int, verbose: bool) -> None:
    """One line, once: by the launcher (our ranks leave it in the run folder), by rank 0 under torchrun
    for bad input (which every rank finds alike), by each failing rank for a failure."""
    message = _one_line(e)
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


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise _Interrupted(signum)


def _as_rank() -> None:
    """A rank of our launcher ends at once and silently on SIGINT/SIGTERM (the launcher reports), and
    with the launcher if that dies."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if str(os.getppid()) != os.environ.get("DISTRIFUSION_LAUNCHER_PID", str(os.getppid())):
        os._exit(143)  # the launcher is already gone


def main(argv: list[str] | None = None) -> int:
    t0 = float(os.environ.get("DISTRIFUSION_T0") or time.time())
    argv = sys.argv[1:] if argv is None else list(argv)
    launched = RUN_DIR in os.environ and "LOCAL_RANK" in os.environ
    if launched:
        _as_rank()
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
    if args.command == "generate" and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch(args.nproc, argv, t0=t0, verbose=args.verbose)
    if not launched and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
    args.running = False
    try:
        return {"generate": generate, "quality": quality, "bench": bench}[args.command](args)
    except (KeyboardInterrupt, _Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if _rank() == 0:
            print(f"distrifusion: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # noqa: BLE001 - every failure ends as one line and an exit code
        code = _exit_code(e, args.running)
        report_error(e, code, args.verbose)
        return code


# -- the launcher --------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def launch(nproc: int, argv: list[str], env: dict | None = None, t0: float | None = None, verbose: bool = False) -> int:
    """Run this command as `nproc` local ranks (gloo on CPU, nccl on CUDA) and wait for them.

    A rank's error is reported once, by this launcher (the first rank to fail names the cause; the
    others are stopped after a moment). SIGINT/SIGTERM stop every rank within seconds: one line,
    exit 130/143. Ranks other than 0 keep their output in a log unless `verbose`.
    """
    run_dir = tempfile.mkdtemp(prefix="distrifusion-")
    cores = os.cpu_count() or 1
    base = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        DISTRIFUSION_T0=str(t0 or time.time()),
        DISTRIFUSION_LAUNCHER_PID=str(os.getpid()),
        **{RUN_DIR: run_dir},
    )
    base.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # ranks share the cores instead of fighting
    base.update(env or {})
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda s, f: received.append(s))
        for sig in (signal.SIGINT, signal.SIGTERM)
        # Not where SIGINT is ignored (as nohup or a background job asked), nor off the main thread (Python refuses).
        if signal.getsignal(sig) is not signal.SIG_IGN and threading.current_thread() is threading.main_thread()
    }
    procs: list[subprocess.Popen] = []
    logs = []
    relay = None
    try:
        for rank in range(nproc):
            log = None
            if rank > 0 and not verbose:
                log = open(os.path.join(run_dir, f"rank{rank}.log"), "wb")  # noqa: SIM115 - closed below
                logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distrifusion", *argv],
                    env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=log,
                    stderr=subprocess.STDOUT if log else subprocess.PIPE if rank == 0 else None,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only, which stops the ranks
                )
            )
            if rank == 0:
                relay = _Relay(procs[0].stderr)
                relay.start()
        failed_at = None
        while True:
            if received:
                stopped = _stop(procs)
                relay.say(f"distrifusion: interrupted; {stopped} rank{'s' * (stopped != 1)} stopped")
                return 128 + received[0]
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                return 0
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()
                first = next(r for r, c in enumerate(codes) if c not in (None, 0))
            if failed_at is not None and (all(c is not None for c in codes) or time.monotonic() - failed_at > 2):
                _stop(procs)  # the others had a moment to fail by themselves (with the same error, often)
                return _report_failure(procs, run_dir, relay, first)
            time.sleep(0.05)
    finally:
        _stop(procs)
        if relay is not None:
            relay.join(timeout=2)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for log in logs:
            log.close()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


class _Relay(threading.Thread):
    """Copies rank 0's stderr (its progress bar) to ours and knows whether it was left mid-line, so that
    the launcher's own message starts on a line of its own."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self.pipe, self.mid_line = pipe, False

    def run(self) -> None:
        with self.pipe:
            while chunk := os.read(self.pipe.fileno(), 65536):
                os.write(2, chunk)
                self.mid_line = not chunk.endswith(b"\n")

    def say(self, line: str) -> None:
        self.join(timeout=2)  # the ranks have ended: their last words first
        sys.stderr.write(("\n" if self.mid_line else "") + line + "\n")
        sys.stderr.flush()


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> int:
    """SIGTERM every running rank (SIGCONT too, in case it is stopped), SIGKILL what is left after `grace`
    seconds, reap all; return how many were stopped or had died by a signal."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return sum(1 for p in procs if p.returncode is not None and p.returncode < 0)


def _report_failure(procs: list[subprocess.Popen], run_dir: str, relay: _Relay, first: int) -> int:
    """One line for the rank that failed first (`first`, as the launcher saw it); its code (2 bad input,
    1 a failure). Ranks that all failed with the same message are not named."""
    errors = {}
    for rank in range(len(procs)):
        path = Path(run_dir, f"error.{rank}")
        if path.exists():
            try:
                errors[rank] = json.loads(path.read_text())
            except ValueError:
                pass
    if first in errors:
        message, code = errors[first]["message"], errors[first]["code"]
        everywhere = len(errors) == len(procs) and len({e["message"] for e in errors.values()}) == 1
        relay.say(f"distrifusion: error{'' if everywhere else f' on rank {first}'}: {message}")
        return code
    # It ended without a message of its own (killed, crashed): say how, and show its last words.
    relay.say(f"distrifusion: rank {first} failed ({_describe_exit(procs[first].returncode)}); the others were stopped")
    log = Path(run_dir, f"rank{first}.log")
    if log.exists():
        for line in log.read_text(errors="replace").strip().splitlines()[-5:]:
            print(f"  rank {first}: {line}", file=sys.stderr)
    return 1


# -- the commands --------------------------------------------------------------------------------


def _dtype(name: str | None):
    import torch

    if name:
        return getattr(torch, name)
    return torch.float16 if torch.cuda.is_available() else torch.float32


class _TimedCommunicator:
    """Counts the seconds this rank spends in (or waiting for) its collectives: the exchange's cost
    that the computation did not hide. Host-side timing: meaningful where collectives block the host
    (gloo on CPU), not for NCCL's asynchronous stream waits."""

    def __init__(self, inner, clock: list[float]) -> None:
        self.inner, self.clock = inner, clock
        self.rank, self.size = inner.rank, inner.size
        self.capturable = getattr(inner, "capturable", False)

    def _timed(self, fn, tensor, async_op):
        start = time.perf_counter()
        pending = fn(tensor, async_op)
        self.clock[0] += time.perf_counter() - start
        return _TimedWait(pending, self.clock)

    def all_gather(self, tensor, async_op: bool = False):
        return self._timed(self.inner.all_gather, tensor, async_op)

    def all_gather_inplace(self, buffer, async_op: bool = False):
        return self._timed(self.inner.all_gather_inplace, buffer, async_op)


class _TimedWait:
    def __init__(self, pending, clock: list[float]) -> None:
        self.pending, self.clock = pending, clock

    def wait(self):
        start = time.perf_counter()
        out = self.pending.wait()
        self.clock[0] += time.perf_counter() - start
        return out


def _time_calls(obj, attr: str, times: dict, phase: str) -> None:
    """Add the seconds of every call of `obj.attr` to `times[phase]`."""
    original = getattr(obj, attr)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - start

    setattr(obj, attr, timed)


def generate(args: argparse.Namespace) -> int:
    import torch

    import distrifusion

    from .bench import peak_memory_mb

    if not args.verbose:  # loading bars; the denoising bar (rank 0's) stays
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    geo: Geometry | None = args.geometry
    uses_cfg = geo.cfg if geo is not None else True
    config = ParallelConfig(
        mode=args.mode,
        warmup_steps=args.warmup_steps,
        groupnorm=args.groupnorm,
        text_tokens=args.text_tokens,
        split_cfg=args.split_cfg and uses_cfg,  # no CFG batch, nothing to split (and no notice saying so)
        cuda_graphs=args.cuda_graphs,
        **({"timeout_s": args.timeout} if args.timeout else {}),
    )
    height, width = args.height, args.width
    dtype = _dtype(args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    times: dict[str, float] = {}
    if args.model in EMBEDDED:
        from .pipelines import load_texture_dit_pipeline, load_texture_pipeline

        load = load_texture_pipeline if args.model == "embedded" else load_texture_dit_pipeline
        pipe = load(torch_dtype=dtype)
        default_class = "gravel" if "gravel" in pipe.classes else pipe.classes[0]
        label = pipe.class_index(args.prompt or default_class)
        pipe = distrifusion.parallelize(pipe, config)
        run = lambda: pipe(label, height=height, width=width, num_inference_steps=args.steps, generator=generator)  # noqa: E731
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)
        pipe = distrifusion.parallelize(pipe, config)
        if hasattr(pipe, "encode_prompt"):
            _time_calls(pipe, "encode_prompt", times, "text encoding")
        if getattr(pipe, "vae", None) is not None:
            _time_calls(pipe.vae, "decode", times, "VAE decoding")
        extra = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
        prompt = args.prompt or "a photograph of a lighthouse at dusk"
        run = lambda: pipe(  # noqa: E731
            prompt=prompt, height=height, width=width, num_inference_steps=args.steps, generator=generator, **extra
        )
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    state = denoiser._distrifusion_state
    runtime = state.runtime
    clock = [0.0]
    timed_exchange = runtime.world_size > 1 and runtime.device.type == "cpu"
    if timed_exchange:  # before the first call, which builds the exchange from these communicators
        runtime.world = _TimedCommunicator(runtime.world, clock)
        runtime.patch_groups = {k: _TimedCommunicator(c, clock) for k, c in runtime.patch_groups.items()}
    marks: dict[str, float] = {}
    calls = [0]

    def before(module, inputs):
        if "first" not in marks:
            marks["first"], marks["waited_before"] = time.perf_counter(), clock[0]

    def after(module, inputs, output):
        calls[0] += 1
        if runtime.device.type == "cuda" and calls[0] == args.steps:
            torch.cuda.synchronize(runtime.device)
        marks["last"], marks["waited"] = time.perf_counter(), clock[0]  # the denoising's waits (not a split VAE's)

    hooks = [denoiser.register_forward_pre_hook(before), denoiser.register_forward_hook(after)]
    args.running = True
    start = time.perf_counter()
    startup = time.time() - args.t0
    image = run().images[0]
    seconds = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    denoising = marks.get("last", start + seconds) - marks.get("first", start)
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
    print(
        f"wrote {args.out} ({width}x{height}, {args.steps} steps, {args.mode}, {world} rank{'s' * (world > 1)}) "
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


def strip_boundaries(image_height: int, plan) -> list[int]:
    """Pixel rows where a strip of the engine's split (`Plan.rows`, in the model's rows) begins, but the first."""
    if plan is None or plan.patch_size < 2:
        return []
    px = image_height // plan.height
    starts, row = [], 0
    for rows in plan.rows[:-1]:
        row += rows
        starts.append(row * px)
    return starts


def _save_strips(image, path: Path, state, world: int) -> str | None:
    """A copy of the image with a thin red line where each strip begins; a note when there are none."""
    from PIL import ImageDraw

    plan = state.plan if world > 1 else None
    copy = image.convert("RGB")
    draw = ImageDraw.Draw(copy)
    for y in strip_boundaries(copy.height, plan):
        draw.line([(0, y), (copy.width - 1, y)], fill=(255, 0, 0), width=1)
    _save(copy, path)
    if world == 1:
        return f"--show-strips: 1 rank, one strip; wrote {path} without lines"
    if plan is not None and plan.patch_size == 1:
        return (
            f"--show-strips: each of the {world} ranks computes one CFG branch of the whole image, no strips "
            f"(use 4 ranks or --no-split-cfg to see patches); wrote {path} without lines"
        )
    return None


def quality(args: argparse.Namespace) -> int:
    import torch

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
    args.running = True
    results = run_quality(pipe, args.height, args.width, args.steps, scheduler, args.seeds, args.ranks)
    write_report(results, Path(args.out_dir), args.command_line)
    print(f"wrote {args.out_dir}/quality.md, quality.json and comparison images")
    return 0


def bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_images, bench_step, bench_vae, build_model, count_traffic, format_row, format_table

    cuda = torch.cuda.is_available()
    args.arch = args.arch or ("sdxl" if cuda else "sd15")
    args.sizes = args.sizes or [1024 if cuda else 256]
    args.repeats = args.repeats or (3 if cuda else 1)
    args.steps = args.steps or 10
    dtype = _dtype(args.dtype)
    graph_choices = [{"auto": None, "on": True, "off": False}[g] for g in dict.fromkeys(args.graphs)]
    graphs = graph_choices[0]
    args.running = True
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

    if _is_vae(args.arch):
        if args.traffic_only or args.nproc > 1:
            raise UsageError("a VAE arch measures the decode alone: --traffic-only and --nproc do not apply")
        for size in args.sizes:
            for row in bench_vae(args.arch, size, size, dtype, args.simulate, args.repeats):
                print(
                    f"{row['arch']} decode {row['height']}x{row['width']} {row['dtype']} on {row['card']}, "
                    f"{row['ranks']} rank(s): {row['decode_s'] * 1e3:.0f} ms ({row['time_vs_full']:.3f} of the whole "
                    f"decode), activation memory {row['activation_mb']:.0f} MB ({row['memory_vs_full']:.3f}), "
                    f"received {row['received_bytes'] / 1e6:.1f} MB",
                    flush=True,
                )
                rows.append(row)
                save(rows)
        return 0
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
    device = torch.device("cuda" if cuda else "cpu")
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


if __name__ == "__main__":
    sys.exit(main())
