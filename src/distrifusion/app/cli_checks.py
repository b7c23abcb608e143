"""Every check of a command's input that needs no model weights, and what a model needs of an image size.

`cli.main` runs these before any process is spawned and before any weight is loaded. Nothing here imports
torch or diffusers (PIL and huggingface_hub only inside the checks that need them), so that `--help` and a
refused command answer at once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..engine.config import ParallelConfig
from ..measure.archs import ARCHS, PIPELINES, arch_config_path
from .video import VIDEO_SUFFIXES, is_frame_folder

DATA = Path(__file__).parent.parent / "data"
EMBEDDED = {
    "embedded": DATA / "textures",
    "embedded-dit": DATA / "textures_dit",
    "embedded-video": DATA / "textures_video",
}


class UsageError(ValueError):
    """Bad input, found before any work: one line, exit code 2."""


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
    time_factor: int = 0
    """A video model: frames per latent frame (a Wan VAE: 4, its videos have 1 + 4k frames; a pixel-space
    model: 1, any count); 0: an image model."""
    default_frames: int = 0
    default_width_px: int = 0
    """The default width when it differs from the default height (Wan: 832 x 480); 0: square."""


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
    name = name.replace("embedded", "embedded video") if kind == "embedded-video" else name
    if (folder / "transformer").is_dir():
        config = _read_json(folder / "transformer" / "config.json")
        if config.get("_class_name") == "WanTransformer3DModel":  # a pixel-space video model
            return wan_geometry(name, config, None)
        patch = config.get("patch_size", 1) or 1
        px = 2 * patch
        note = f"2x2 pixels per token{f', {patch}x{patch} tokens per patch' if patch > 1 else ''}"
        return Geometry(name, px, px, f"one token row of {px} px", note, False, 128)
    block = _unet_levels(_read_json(folder / "unet" / "config.json"))
    note = f"the UNet halves the image {block.bit_length() - 1} times"
    return Geometry(name, block, block, note, note, False, 1024)


PIPELINE_CFG = {
    "UNet2DConditionModel": True,
    "SD3Transformer2DModel": True,
    "PixArtTransformer2DModel": True,
    "SanaTransformer2DModel": True,
    "ZImageTransformer2DModel": True,
}
VIDEO_SPLITS_NOTE = "--video-split rows: bands of token rows across all frames; frames: runs of latent frames"


def wan_geometry(name: str, transformer: dict, vae: dict | None) -> Geometry:
    """A Wan transformer behind a Wan VAE (diffusers' `scale_factor_spatial`/`_temporal`, 8 and 4 for Wan
    2.1, 16 and 4 for the Wan 2.2 TI2V VAE; a config without them: Wan 2.1's) or in pixel space (vae None).
    The pipelines call it once per guidance branch: no CFG batch."""
    patch = transformer.get("patch_size") or (1, 2, 2)
    spatial = (vae or {}).get("scale_factor_spatial", 8) if vae is not None else 1
    temporal = (vae or {}).get("scale_factor_temporal", 4) if vae is not None else patch[0]
    px = spatial * patch[1]
    note = f"one token row: {patch[1]} latent rows of {spatial} px" if vae is not None else f"{px} px per token row"
    if vae is None:
        return Geometry(name, px, px, note, note, False, 64, time_factor=temporal, default_frames=17)
    return Geometry(name, px, px, note, note, False, 480, time_factor=temporal, default_frames=81, default_width_px=832)


TOKEN_ROW_MODELS = ("FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel")
"""Transformers split in token rows of 2x2 latent cells, whose pipelines call them with one image per call
(guidance distilled, or true CFG as a second call): no CFG batch."""


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
    if cls == "WanTransformer3DModel":
        vae_config = _read_json(vae_path) if vae_path else {}
        return wan_geometry(f"this {index.get('_class_name', 'pipeline')}", config, vae_config)
    vae_config = _read_json(vae_path) if vae_path else {}
    # AutoencoderKL's levels, or AutoencoderDC's (SANA: 32x)
    vae_levels = vae_config.get("block_out_channels") or vae_config.get("encoder_block_out_channels") or (0,) * 4
    vae = 2 ** (len(vae_levels) - 1)
    pipe = index.get("_class_name", "pipeline")
    name = f"this {pipe}"
    if cls == "UNet2DConditionModel":
        levels = _unet_levels(config)
        block_note, own, own_note = f"{levels} latent rows of {vae} px", vae, f"the VAE's {vae} px per latent row"
    elif cls in TOKEN_ROW_MODELS:  # 2x2 latent cells per token: a token row is 2 latent rows
        levels, own = 2, 2 * vae
        block_note = own_note = f"one token row: 2 latent rows of {vae} px"
    elif cls in ("SD3Transformer2DModel", "PixArtTransformer2DModel", "SanaTransformer2DModel"):
        levels = config.get("patch_size", 2)
        own = levels * vae
        block_note = own_note = f"one patch row: {levels} latent rows of {vae} px"
    elif cls == "ZImageTransformer2DModel":
        levels = config.get("all_patch_size", [2])[0]
        own = levels * vae
        block_note = own_note = f"one token row: {levels} latent rows of {vae} px"
    else:
        return None
    cfg = PIPELINE_CFG.get(cls, False) and (guidance_scale is None or guidance_scale > 1)
    default = (config.get("sample_size") or 128) * vae
    if cls in (*TOKEN_ROW_MODELS, "ZImageTransformer2DModel"):
        default = 1024
    return Geometry(name, own, levels * vae, block_note, own_note, cfg, default)


def bench_geometry(arch: str | None) -> Geometry:
    """A bench architecture: a denoiser config; bench feeds it latents of size // 8."""
    arch = arch or "sd15"  # sdxl on CUDA: the same block
    if arch in ARCHS:
        path = arch_config_path(arch)
    elif arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise UsageError(f"--arch {arch}: no such file")
    else:
        raise UsageError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)} or a config .json path")
    config = _read_json(path)
    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls == "WanTransformer3DModel":  # bench feeds it latents of its VAE's scale (workload.model_inputs)
        spatial = 16 if config.get("in_channels") == 48 else 8  # Wan 2.2 TI2V's VAE, else Wan 2.1's
        return wan_geometry(f"--arch {arch}", config, {"scale_factor_spatial": spatial})
    if cls == "AutoencoderKLWan":  # a video's decode: any whole number of latent rows, 1 + 4k frames
        px, note = config.get("scale_factor_spatial") or 8, "one latent row of {} px"
        time = config.get("scale_factor_temporal") or 4
        name, per_row = f"--arch {arch}", f"{px} px per latent row"
        return Geometry(name, px, px, note.format(px), per_row, False, 256, time_factor=time, default_frames=17)
    if cls in VIDEO_GEOMETRY:  # bench feeds it latents of its VAE's scale (workload.model_inputs)
        return VIDEO_GEOMETRY[cls](f"--arch {arch}", config)
    if cls == "AutoencoderKL":  # a decode: any whole number of latent rows
        return Geometry(f"--arch {arch}", 8, 8, "one latent row of 8 px", "8 px per latent row", False, 1024)
    if cls in TOKEN_ROW_MODELS:  # 2x2 latent cells per token, packed by the pipeline (Qwen-Image: patch_size 2)
        note = "one token row: 2 latent rows of 8 px"
        return Geometry(f"--arch {arch}", 16, 16, note, note, False, 1024)
    if cls in ("SD3Transformer2DModel", "PixArtTransformer2DModel", "SanaTransformer2DModel"):
        vae = 32 if cls == "SanaTransformer2DModel" else 8  # SANA's DC-AE: 32 px per latent cell
        patch = config.get("patch_size", 2)
        note = f"one patch row: {patch} latent row{'s' * (patch > 1)} of {vae} px"
        return Geometry(f"--arch {arch}", vae * patch, vae * patch, note, note, True, 1024)
    if cls == "ZImageTransformer2DModel":  # Z-Image-Turbo: no CFG batch
        patch = config.get("all_patch_size", [2])[0]
        note = f"one token row: {patch} latent rows of 8 px"
        return Geometry(f"--arch {arch}", 8 * patch, 8 * patch, note, note, False, 1024)
    levels = _unet_levels(config)
    return Geometry(f"--arch {arch}", 8, 8 * levels, f"{levels} latent rows of 8 px", "8 px per latent row", True, 1024)


VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLWan")
"""The VAE classes `bench` times a decode of (the Wan VAE's of a video)."""


def is_vae(arch: str) -> bool:
    path = arch_config_path(arch)
    return _read_json(path).get("_class_name") in VAE_CLASSES


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


def _hunyuan_video15_geometry(name: str, config: dict) -> Geometry:
    """HunyuanVideo-1.5 behind its VAE (16 px per latent cell, 4 frames per latent frame; 1 + 4k frames), one
    call per guidance branch; 720p x 121 frames by default."""
    px = 16 * config.get("patch_size", 1)
    note = f"one token row: {px} px"
    return Geometry(name, px, px, note, note, False, 720, time_factor=4, default_frames=121, default_width_px=1280)


def _ltx_video_geometry(name: str, config: dict) -> Geometry:
    """LTX-Video behind its VAE (32 px per latent cell and token, 8 frames per latent frame; 1 + 8k frames),
    the CFG batch in one call; its pipelines' 512 x 704 x 121 frames by default."""
    note = "one token row: 32 px"
    return Geometry(name, 32, 32, note, note, True, 512, time_factor=8, default_frames=121, default_width_px=704)


VIDEO_GEOMETRY = {
    "HunyuanVideo15Transformer3DModel": _hunyuan_video15_geometry,
    "LTXVideoTransformer3DModel": _ltx_video_geometry,
}


def check_video(geo: Geometry, frames: int, height: int, width: int, ranks: int, split: str, what: str = "") -> None:
    """Refuse a frame count the model cannot take, and a video that does not split into the ranks' strips:
    bands of token rows (`split` "rows": as an image's height) or runs of latent frames ("frames")."""
    factor = geo.time_factor
    if frames < 1:
        raise UsageError(f"--frames must be >= 1, got {frames}{what}")
    if factor > 1 and (frames - 1) % factor:
        below = max(1, (frames - 1) // factor * factor + 1)
        raise UsageError(
            f"--frames {frames}: {geo.name} makes 1 + {factor}k frames (its VAE compresses time {factor}x); "
            f"use {below} or {below + factor}{what}"
        )
    if split == "rows":
        check_image_size(geo, height, width, ranks, what=what)
        return
    check_image_size(geo, height, width, 1, what=what)  # the sizes alone; the split is in frames
    latent = (frames - 1) // max(factor, 1) + 1
    if latent < ranks:
        most = 1 + (ranks - 1) * max(factor, 1)
        raise UsageError(
            f"--frames {frames} are {latent} latent frame(s), too few to split over {ranks} ranks (a run of whole "
            f"latent frames each); use --frames {most} or more, fewer ranks, or --video-split rows{what}"
        )


# -- the checks of each command -------------------------------------------------------------------


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


def _check_video_path(out: str) -> None:
    path = Path(out)
    if is_frame_folder(out):  # written as frame_00000.png, ... (the folder is made if its parent exists)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--out {out} is a file, not a folder")
        _writable_folder(path if path.exists() else path.parent, f"--out {out}")
        return
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(f"--out {out}: unknown video format {path.suffix!r}; use .mp4, .webp, .gif or a folder/")
    _writable_folder(path.parent if str(path.parent) else Path("."), f"--out {out}")


def _check_output(args, geo: Geometry | None) -> None:
    """A video model writes a video (.mp4, animated .webp/.gif, a folder of PNG frames), an image model an
    image; --frames, --fps and --video-split are for videos only. Sets args.video and the default --out."""
    video = geo.time_factor > 0 if geo is not None else args.frames is not None
    name = geo.name if geo is not None else args.model
    args.video = video
    if args.out is None:
        args.out = "video.mp4" if video else "image.png"
    if not video:
        if args.frames is not None:
            raise UsageError(f"--frames: {name} makes images, not videos; leave --frames out")
        if Path(args.out).suffix.lower() == ".mp4" or is_frame_folder(args.out):
            raise UsageError(f"--out {args.out}: {name} makes images; name an image file (.png, .jpg, .webp, ...)")
        _check_image_path(args.out)
        return
    if args.show_strips:
        raise UsageError("--show-strips draws strips on an image; it does not apply to videos")
    _finite("--fps", args.fps, positive=True)
    _check_video_path(args.out)
    args.frames = args.frames if args.frames is not None else (geo.default_frames if geo is not None else 81)


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
            for k in ("mode", "groupnorm", "text_tokens", "cuda_graphs", "video_split")
            if getattr(args, k, None) is not None
        }
    )


def check(args) -> list[str]:
    """Every check of a command's input that needs no model weights: raise UsageError, or return notes."""
    checks = {
        "generate": check_generate,
        "quality": check_quality,
        "bench": check_bench,
        "serve": check_serve,
        "plan": check_plan,
    }
    return checks[args.command](args)


def check_generate(args) -> list[str]:
    notes = []
    _common_parallel_checks(args)
    _positive("--steps", args.steps)
    _positive("--warmup-steps", args.warmup_steps, 0)
    _finite("--guidance-scale", args.guidance_scale)
    if not -(2**63) <= args.seed < 2**64:
        raise UsageError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
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
    _check_output(args, geo)
    if args.height is None:
        args.height = geo.default_px if geo else 1024
        args.width = args.width or (geo.default_width_px if geo else 0) or None
    if args.width is None:
        args.width = args.height
    world = _world(args)
    if geo is not None and args.video:
        check_video(geo, args.frames, args.height, args.width, world, args.video_split)
    elif geo is not None:
        check_image_size(geo, args.height, args.width, world, args.split_cfg)
    else:
        for side, value in (("height", args.height), ("width", args.width)):
            if value <= 0:
                raise UsageError(f"image {side} must be positive, got {value} px")
    return notes + _cores_note(args.nproc)


def check_serve(args) -> list[str]:
    _common_parallel_checks(args)
    _positive("--warmup-steps", args.warmup_steps, 0)
    for flag in ("queue_size", "max_pixels", "max_steps", "max_images", "max_frames"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    _positive("--max-restarts", args.max_restarts, 0)
    for flag in ("request_timeout", "fps", "clip_store_mb", "clip_ttl"):
        _finite("--" + flag.replace("_", "-"), getattr(args, flag), positive=True)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.model in EMBEDDED:
        args.geometry = embedded_geometry(args.model, EMBEDDED[args.model])
    else:
        args.geometry = pipeline_geometry(args.model, None)
    if args.default_size is not None:
        _positive("--default-size", args.default_size)
        if args.geometry is not None:
            check_image_size(args.geometry, args.default_size, args.default_size, _world(args), args.split_cfg)
    return _cores_note(args.nproc)


def _images_only(geo: Geometry | None, command: str, instead: str) -> None:
    """Refuse a video model for a command that makes or measures images only."""
    if geo is not None and geo.time_factor > 0:
        raise UsageError(f"{command} is for image models; {geo.name} makes videos ({instead})")


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
    _images_only(geo, "quality", "its table is made by benchmarks/quality_video.py")
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
    sizes = args.sizes or [(1024, 1024) if _cuda_likely() else (256, 256)]
    if geo.time_factor:
        args.frames = args.frames if args.frames is not None else geo.default_frames
    elif args.frames is not None:
        raise UsageError(f"--frames: {geo.name} is an image model; leave --frames out")
    for i, (height, width) in enumerate(sizes):
        for n in sorted({*args.simulate, args.nproc if i == 0 else 1}, reverse=True):
            what = f" (--sizes {height}x{width})"
            if geo.time_factor:
                check_video(geo, args.frames, height, width, n, args.video_split, what=what)
            else:
                check_image_size(geo, height, width, n, what=what)
    if args.share_only and not (args.arch and is_vae(args.arch) and any(n > 1 for n in args.simulate)):
        raise UsageError("--share-only needs a VAE arch and --simulate N with N > 1")
    if args.json:
        _writable_folder(Path(args.json).parent, f"--json {args.json}")
    if "LOCAL_RANK" not in os.environ:
        if args.steps is not None and args.nproc == 1:
            notes.append("--steps applies to --nproc's whole images only; the other timings are of single steps")
        if args.traffic_only and (args.repeats or args.nproc > 1 or args.graphs != ["auto"]):
            notes.append("--traffic-only times nothing: --repeats, --graphs and --nproc are ignored")
    if args.compile:  # a compiled model cannot also run as distrifusion's CUDA graphs (see bench_step)
        if "on" in args.graphs:
            raise UsageError(
                "--compile times torch.compile(model) without distrifusion's CUDA graphs (the two do not compose); "
                "use --graphs off or auto"
            )
        if "auto" in args.graphs:
            args.graphs = list(dict.fromkeys("off" if g == "auto" else g for g in args.graphs))
            if _cuda_likely() and "LOCAL_RANK" not in os.environ:
                notes.append("--compile: our runs are timed without distrifusion's CUDA graphs (--graphs off)")
    return notes + _cores_note(args.nproc if not args.traffic_only else 1)


def check_memory_plan(args) -> list[str]:
    """`plan --memory`: shapes only (any architecture config, any size); no launch, no weights."""
    if args.model:
        raise UsageError("plan --memory counts an architecture: give --arch NAME or --arch PATH.json, not --model")
    args.arch = args.arch or "sdxl"
    path = arch_config_path(args.arch)
    if args.arch not in ARCHS and not (args.arch.endswith(".json") and path.is_file()):
        raise UsageError(f"--arch {args.arch}: not a known architecture ({', '.join(ARCHS)}) nor a config .json file")
    for name in [*(t for t in args.text_encoder or [] if t != "none"), *([args.vae] if args.vae else [])]:
        if not Path(name).is_file():
            raise UsageError(f"{name}: no such config file")
    try:
        kind = json.loads(path.read_text()).get("_class_name", "UNet2DConditionModel")
    except (OSError, ValueError) as e:
        raise UsageError(f"--arch {args.arch}: cannot read it as a JSON config ({e})") from e
    pipeline = PIPELINES.get(args.arch) or PIPELINES.get(kind)
    for n in args.ranks:
        _positive("--ranks", n)
    _positive("--frames", args.frames)
    _positive("--experts", args.experts)
    for gb in args.cards or []:
        _finite("--cards", gb, positive=True)
    default = pipeline.size if pipeline else (1024, 1024)
    _positive("--height", args.height)
    _positive("--width", args.width)
    args.height = args.height or default[0]
    args.width = args.width or (default[1] if args.height == default[0] else args.height)
    for side, value in (("height", args.height), ("width", args.width)):
        if value % 16:
            raise UsageError(f"--{side} {value} is not a multiple of 16 px (8 px latent cells, 2x2 per token)")
    args.frames = args.frames or (pipeline.frames if pipeline else None)
    args.dtype = args.dtype or "bfloat16"
    if args.json:
        _writable_folder(Path(args.json).parent, f"--json {args.json}")
    return []


def check_plan(args) -> list[str]:
    if args.memory:
        return check_memory_plan(args)
    _positive("--nproc", args.nproc)
    _positive("--repeats", args.repeats)
    _finite("--timeout", args.timeout, positive=True)
    cuda = _cuda_likely()
    if args.model and args.arch:
        raise UsageError("--model and --arch name the same thing: give one")
    if args.model in EMBEDDED:
        geo = embedded_geometry(args.model, EMBEDDED[args.model])
    elif args.model:
        geo = pipeline_geometry(args.model, None)
    else:
        args.arch = args.arch or ("sdxl" if cuda else "sd15")
        geo = bench_geometry(args.arch)  # first: it names the known architectures
        if is_vae(args.arch):
            raise UsageError("plan is for denoisers; a VAE is always split synchronously (bench --arch times it)")
    if args.model:
        _images_only(geo, "plan --model", "bench --arch wan21_t2v_1_3b --frames 17 times a Wan denoiser")
    _positive("--height", args.height)
    _positive("--width", args.width)
    args.height = args.height or (geo.default_px if args.model and geo else 1024 if cuda else 256)
    args.width = args.width or args.height
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    if geo is not None:
        check_image_size(geo, args.height, args.width, _world(args))
    if args.json:
        _writable_folder(Path(args.json).parent, f"--json {args.json}")
    return _cores_note(args.nproc)
