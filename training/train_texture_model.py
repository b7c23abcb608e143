r"""Train the small class-conditional texture diffusion model embedded in distrifusion.

The model is a tiny diffusers ``UNet2DModel`` (about 3.7 M parameters) trained with
the standard DDPM epsilon-prediction loss on random crops of six photographs that ship
inside the scikit-image wheel, one class each (label order):

    0 brick, 1 grass, 2 gravel, 3 hubble_deep_field, 4 ihc (immunohistochemistry), 5 retina

Self-attention is used only at the coarsest UNet level (plus the mid block) so that the
model can sample 1024x1024 images on a small CPU in a few minutes.

The shipped weights were produced on a 2-core CPU (no GPU), with one thread, in two
phases (run from the repository root):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python training/train_texture_model.py \
        --out src/distrifusion/data/textures --threads 1 --max-minutes 60 --offset-noise 0
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python training/train_texture_model.py \
        --init src/distrifusion/data/textures --out src/distrifusion/data/textures \
        --threads 1 --max-minutes 20 --offset-noise 0.1 --warmup 50

(The first phase was started with ``--max-minutes 80`` and stopped by hand right after
its 60-minute checkpoint, which is what ``--max-minutes 60`` does.) A single 80-minute run
with the default ``--offset-noise 0.1`` is the simpler recipe, but it has not been run.

Why offset noise: with epsilon prediction and this noise schedule the model can read each
image's mean colour off the input even at the noisiest sampled timestep, so it never
learns to produce it; sampled from zero-mean noise, trained without offset noise, it
gave mid-grey star fields and brown retinas. Offset noise hides the mean at high noise
levels and makes the model learn it per class.

The output folder is a diffusers-style pipeline folder::

    DIR/unet/          UNet2DModel.save_pretrained (safetensors; EMA weights)
    DIR/scheduler/     DDIMScheduler config derived from the training DDPMScheduler
    DIR/classes.json   {"classes": [...], "trained": {...training metadata...}}

A checkpoint in the same format is written every ``--checkpoint-minutes`` minutes, so a
partially finished run is usable. See ``sample_texture_model.py`` to look at samples.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

CLASSES: list[str] = ["brick", "grass", "gravel", "hubble_deep_field", "ihc", "retina"]
"""Class names in label order."""

SKIMAGE_NAMES: dict[str, str] = {"ihc": "immunohistochemistry"}
"""Class name -> ``skimage.data`` function name, where they differ."""

# Downscale factor applied to an image before cropping (retina is 1411 px wide and
# mostly smooth at native scale; halving it puts more vessels in a 64 px crop).
DOWNSCALE: dict[str, int] = {"retina": 2}

# Classes whose orientation matters: no 90-degree rotations for them.
NO_ROT90: frozenset[str] = frozenset({"brick"})

FP32_MAX_BYTES = 16 * 1024 * 1024
"""Weights above this size (in fp32) are saved as fp16."""


def build_unet() -> UNet2DModel:
    """Return the (untrained) texture UNet with the project's fixed architecture."""
    return UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 96, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
        num_class_embeds=len(CLASSES),
    )


def build_ddpm() -> DDPMScheduler:
    """Return the DDPM noise scheduler used for training."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
    )


def load_image(name: str) -> torch.Tensor:
    """Load class ``name`` from ``skimage.data`` as a float tensor (3, H, W) in [-1, 1]."""
    import skimage.data

    func = getattr(skimage.data, SKIMAGE_NAMES.get(name, name), None)
    if func is None:
        raise ValueError(f"skimage.data has no image for class {name!r}")
    img = np.asarray(func())
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image for {name!r}, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = img[:, :, :3]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 127.5 - 1.0
    factor = DOWNSCALE.get(name, 1)
    if factor > 1:
        size = (x.shape[1] // factor, x.shape[2] // factor)
        x = F.interpolate(x[None], size=size, mode="area")[0]
    return x


def valid_corners(img: torch.Tensor, crop: int, max_dark: float = 0.02) -> torch.Tensor:
    """Top-left corners (N, 2) of crops with at most ``max_dark`` near-black pixels.

    Only used for the retina, whose disc sits on a black background; a crop of that
    background would teach the model nothing about the class.
    """
    dark = (img.mean(0) < -0.85).float()[None, None]
    frac = F.avg_pool2d(dark, crop, stride=1)[0, 0]
    corners = torch.nonzero(frac <= max_dark)
    if len(corners) == 0:
        raise ValueError("no crop position avoids the dark background")
    return corners


class CropSampler:
    """Draws class-balanced, augmented random crops from the six training images."""

    def __init__(self, crop: int, generator: torch.Generator) -> None:
        self.crop = crop
        self.gen = generator
        self.images = [load_image(name) for name in CLASSES]
        for name, img in zip(CLASSES, self.images):
            if min(img.shape[1:]) < crop:
                raise ValueError(f"image {name!r} {tuple(img.shape)} is smaller than crop {crop}")
        self.corners = {CLASSES.index("retina"): valid_corners(self.images[CLASSES.index("retina")], crop)}

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.gen))

    def crop_one(self, label: int) -> torch.Tensor:
        """Return one augmented (3, crop, crop) crop of class ``label``."""
        img, c = self.images[label], self.crop
        if label in self.corners:
            corners = self.corners[label]
            y, x = corners[self._randint(len(corners))].tolist()
        else:
            y, x = self._randint(img.shape[1] - c + 1), self._randint(img.shape[2] - c + 1)
        out = img[:, y : y + c, x : x + c]
        if self._randint(2):
            out = out.flip(2)
        if self._randint(2):
            out = out.flip(1)
        if CLASSES[label] not in NO_ROT90:
            out = torch.rot90(out, self._randint(4), dims=(1, 2))
        return out

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a batch of crops (B, 3, c, c) and their labels (B,)."""
        labels = torch.randint(len(CLASSES), (size,), generator=self.gen)
        crops = torch.stack([self.crop_one(int(lab)) for lab in labels])
        return crops, labels


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """In-place exponential moving average of ``model``'s parameters into ``ema``."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def save_pipeline(out: Path, unet: UNet2DModel, ddpm: DDPMScheduler, trained: dict) -> int:
    """Write ``unet``, the DDIM scheduler and classes.json to ``out``; return weight bytes.

    The folder is written next to ``out`` first and then swapped in, so a reader never
    sees a half-written checkpoint.
    """
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    unet = copy.deepcopy(unet).eval()
    n_bytes = sum(p.numel() * 4 for p in unet.parameters())
    if n_bytes > FP32_MAX_BYTES:
        unet = unet.half()
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    DDIMScheduler.from_config(ddpm.config).save_pretrained(tmp / "scheduler")
    with open(tmp / "classes.json", "w") as f:
        json.dump({"classes": CLASSES, "trained": trained}, f, indent=2)
        f.write("\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            _rmtree(old)
        out.rename(old)
        tmp.rename(out)
        _rmtree(old)
    else:
        tmp.rename(out)
    return (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def lr_lambda(warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then constant."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output pipeline folder")
    p.add_argument("--iters", type=int, default=100_000, help="maximum training iterations")
    p.add_argument("--max-minutes", type=float, default=80.0, help="wall-clock budget; stop and save when reached")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=64, help="training crop size (multiple of 8)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up iterations")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--offset-noise",
        type=float,
        default=0.1,
        help="std of a per-image, per-channel constant added to the training noise (0 disables)",
    )
    p.add_argument("--init", type=Path, default=None, help="start from the weights of this pipeline folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.iters < 1 or args.batch_size < 1 or args.threads < 1:
        raise ValueError("--iters, --batch-size and --threads must be positive")
    if args.crop < 8 or args.crop % 8:
        raise ValueError(f"--crop must be a positive multiple of 8, got {args.crop}")
    if args.max_minutes <= 0:
        raise ValueError("--max-minutes must be positive")
    if args.offset_noise < 0:
        raise ValueError("--offset-noise must be non-negative")
    if args.init is not None and not (args.init / "classes.json").is_file():
        raise ValueError(f"--init {args.init} is not a pipeline folder (no classes.json)")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError("--ema-decay must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Train the model and write the pipeline folder."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    command = " ".join(filter(None, [env, "python", shlex.join(sys.argv)]))

    sampler = CropSampler(args.crop, gen)
    unet = build_unet().train()
    prior: dict = {}  # training metadata of --init, if any
    if args.init is not None:
        unet.load_state_dict(UNet2DModel.from_pretrained(args.init, subfolder="unet").float().state_dict())
        prior = json.loads((args.init / "classes.json").read_text())["trained"]
        if prior.get("batch_size") != args.batch_size or prior.get("crop") != args.crop:
            raise ValueError("--init model was trained with a different --batch-size or --crop")
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ddpm = build_ddpm()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup))
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"params {n_params / 1e6:.2f} M, threads {torch.get_num_threads()}, command: {command}", flush=True)

    start = time.time()
    last_ckpt, last_log = start, start
    loss_ema = float("nan")
    step = 0

    def trained_meta() -> dict:
        # With --init, iterations, minutes and commands accumulate over both phases.
        return {
            "iters": prior.get("iters", 0) + step,
            "batch_size": args.batch_size,
            "crop": args.crop,
            "minutes": round(prior.get("minutes", 0) + (time.time() - start) / 60, 1),
            "threads": args.threads,
            "machine": "2-core CPU, no GPU",
            "command": " && ".join(filter(None, [prior.get("command"), command])),
            "seed": args.seed,
            "final_loss_ema": round(loss_ema, 5),
            "offset_noise": args.offset_noise,
        }

    while step < args.iters and (time.time() - start) < args.max_minutes * 60:
        x0, labels = sampler.batch(args.batch_size)
        noise = torch.randn(x0.shape, generator=gen)
        if args.offset_noise > 0:
            # Offset noise: hides the image mean from the model at high noise levels, so
            # it must learn each class's colour instead of reading it off the input.
            noise = noise + args.offset_noise * torch.randn((x0.shape[0], 3, 1, 1), generator=gen)
        t = torch.randint(ddpm.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        xt = ddpm.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, class_labels=labels).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        # EMA warm-up: average more aggressively early on, when weights change fastest.
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()

        now = time.time()
        if step % args.log_every == 0:
            print(
                f"it {step} loss {loss.item():.4f} loss_ema {loss_ema:.4f} "
                f"{args.log_every / (now - last_log):.3f} it/s elapsed {(now - start) / 60:.1f} min",
                flush=True,
            )
            last_log = now
        if now - last_ckpt >= args.checkpoint_minutes * 60:
            size = save_pipeline(args.out, ema, ddpm, trained_meta())
            print(f"checkpoint at it {step}: {args.out} ({size / 2**20:.1f} MiB)", flush=True)
            last_ckpt = time.time()

    size = save_pipeline(args.out, ema, ddpm, trained_meta())
    print(
        f"done: {step} iters in {(time.time() - start) / 60:.1f} min, loss_ema {loss_ema:.4f}, "
        f"saved {args.out} ({size / 2**20:.1f} MiB)",
        flush=True,
    )


if __name__ == "__main__":
    main()
