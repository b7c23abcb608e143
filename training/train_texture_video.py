r"""Train the small class-conditional video model with the Wan transformer architecture.

How the committed weights (``src/distrifusion/data/textures_video``, 4.6 MiB, 1.2 M parameters) were
trained, on the 2-core development CPU, three runs, each log in ``training/train_video.log``::

    # 1. 216 iterations in 63.6 min (one thread, the machine shared with ~8 other jobs: load 20-30;
    #    the session ended before its 120 min, its last 10-minute checkpoint is what phase 2 started from)
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python training/train_texture_video.py \
        --out src/distrifusion/data/textures_video --threads 1 --max-minutes 120
    # 2. 292 iterations in 84.1 min (same load)
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python training/train_texture_video.py \
        --init src/distrifusion/data/textures_video --out src/distrifusion/data/textures_video \
        --threads 1 --max-minutes 84 --warmup 20 --big-every 48
    # 3. 2160 iterations in 95.1 min (2026-12-06, two threads on the otherwise idle machine: 0.4 it/s,
    #    final loss EMA 0.062). Run with a copy of the folder as --init and a temporary --out (then
    #    copied in, so the committed model stayed usable meanwhile) -- the same as:
    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python training/train_texture_video.py \
        --init src/distrifusion/data/textures_video --out src/distrifusion/data/textures_video \
        --threads 2 --max-minutes 95 --decay-minutes 35

Four hours of wall clock, but phases 1 and 2 ran on a fraction of a core: phase 3 (two cores for 95
minutes) did 81% of the 2668 iterations. The first two phases alone left a weak model (QUALITY.md, the
video section: "brick" was a grey grain); phase 3 made the classes distinguishable (brick's vertical
mortar lines, ihc's brown patches, the dark Hubble field with specks) though still blotchy at 64 px.

Model: a tiny diffusers ``WanTransformer3DModel`` working directly in pixel space: an RGB
clip in [-1, 1] of shape (B, 3, frames, H, W) is patchified by the model's own Conv3d with
patch (1, 2, 2), so any frame count and any even height and width work. Every frame is one
token slice of (H/2) x (W/2) tokens and self-attention runs over all frames' tokens at once
(3-D RoPE over frame, row, column; positions always start at 0, the model has no offset).

Data: the six scikit-image photographs of the embedded image models (``train_texture_model.py``,
whose ``load_image`` is reused), one class each, label order

    0 brick, 1 grass, 2 gravel, 3 hubble_deep_field, 4 ihc (immunohistochemistry), 5 retina

Each training clip is a texture *moving*: a camera over the photograph that pans (random
direction, 0.25-1.5 px per frame), zooms (in or out, 1-3 % per frame) or rotates slowly
(0.5-2 degrees per frame), with the motion centred on the middle frame. Every frame is
resampled from the photograph with ``grid_sample`` (bicubic) under its own affine map, so the
motion is sub-pixel and smooth. Flips and 90-degree turns (not for brick) are applied to the
whole clip. Retina clips that see more than 2 % of the black background are drawn again.

Training mixes shapes (``--cycle``): single-frame 64 px "clips" (images; cheap, they teach the
spatial layout of a 32x32-token frame), 17-frame clips of 32 and 16 px (they teach the motion
over the full 17 frames) and now and then a full 17-frame 64 px clip (17408 tokens, so that
attention has seen the token count it is used at).

Class conditioning: each class is a learned sequence of 4 "text" tokens of width ``text_dim``
(64), given as ``encoder_hidden_states`` and read by the cross-attention of every block. Wan
has no pooled/class vector in its time modulation, so cross-attention is the only way in.

Objective: rectified flow as the embedded DiT: x_s = (1 - s) x0 + s noise, the model predicts
the velocity noise - x0. s is logit-normal(0, 1) mapped through the scheduler's time shift
(``--shift``, s' = shift s / (1 + (shift - 1) s)): a clip is 17 near copies of the same
texture, so its content is still readable at noise levels that would hide a single image, and
the shift moves training (and the sampling steps) towards high noise. The timestep given to
the transformer is 1000 s' as a float, exactly as ``WanPipeline`` passes the
``FlowMatchEulerDiscreteScheduler`` timesteps (Wan multiplies nothing inside). Sampling uses
``FlowMatchEulerDiscreteScheduler`` with the same shift.

The output folder (same layout as ``textures_dit``)::

    DIR/transformer/                  WanTransformer3DModel.save_pretrained (safetensors; EMA)
    DIR/scheduler/                    FlowMatchEulerDiscreteScheduler config
    DIR/class_embeddings.safetensors  "tokens" (classes, 4, 64); EMA
    DIR/classes.json                  {"classes": [...], "trained": {...training metadata...}}

A checkpoint in the same format is written every ``--checkpoint-minutes`` minutes, so a
partially finished run is usable. See ``sample_texture_video.py`` to look at samples and
``distrifusion.app.pipelines.TextureVideoPipeline`` for the pipeline class.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_texture_model import CLASSES, NO_ROT90, ema_update, load_image  # noqa: E402

NUM_TEXT_TOKENS = 4
"""Length of each class's learned token sequence (the ``encoder_hidden_states``)."""

TEXT_DIM = 64
"""Width of the learned class tokens (the transformer's ``text_dim``)."""

FP32_MAX_BYTES = 16 * 1024 * 1024
"""Limit on the fp32 weights (transformer plus class embeddings)."""

MOTIONS: dict[str, float] = {"pan": 0.5, "zoom": 0.25, "rotate": 0.25}
"""Kinds of camera motion in the training clips and how often each is drawn."""

DEFAULT_CYCLE = "64x1x4,32x17x2,64x1x4,16x17x8"
"""Default repeating batch pattern SIZExFRAMESxBATCH (see the module docstring)."""


def build_transformer() -> WanTransformer3DModel:
    """Return the (untrained) video transformer with the project's fixed architecture."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,  # RoPE splits each head into 12 frame + 10 row + 10 column channels
        in_channels=3,
        out_channels=3,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=512,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,  # positions per axis: up to 1024 frames and 2048 px
    )


def build_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """Return the sampling scheduler saved with the model."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class ClipSampler:
    """Draws class-balanced clips of a texture under a smooth camera motion.

    Every clip is made from one photograph: a square window of ``size`` pixels whose centre,
    scale and angle follow a per-frame affine path (pan, zoom or rotation), resampled with
    bicubic ``grid_sample`` so that sub-pixel motion stays smooth.
    """

    def __init__(
        self,
        generator: torch.Generator,
        max_pan: float = 1.5,
        max_zoom: float = 0.03,
        max_rotate_deg: float = 2.0,
    ) -> None:
        self.gen = generator
        self.max_pan, self.max_zoom, self.max_rotate = max_pan, max_zoom, math.radians(max_rotate_deg)
        self.images = [load_image(name) for name in CLASSES]
        self.retina = CLASSES.index("retina")

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.gen))

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.gen))

    def _motion(self, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-frame (offset (F, 2) in px, scale (F,), angle (F,) in radians), centred on the middle frame."""
        t = torch.arange(frames, dtype=torch.float64) - (frames - 1) / 2
        offset = torch.zeros(frames, 2, dtype=torch.float64)
        scale = torch.ones(frames, dtype=torch.float64)
        angle = torch.zeros(frames, dtype=torch.float64)
        kinds, weights = list(MOTIONS), torch.tensor(list(MOTIONS.values()))
        kind = kinds[int(torch.multinomial(weights, 1, generator=self.gen))]
        sign = 1.0 if self._randint(2) else -1.0
        if kind == "pan":
            direction = self._uniform(0.0, 2 * math.pi)
            speed = self._uniform(0.25, self.max_pan)
            offset = speed * t[:, None] * torch.tensor([math.cos(direction), math.sin(direction)], dtype=torch.float64)
        elif kind == "zoom":
            scale = torch.exp(sign * self._uniform(0.01, self.max_zoom) * t)
        else:
            angle = sign * self._uniform(math.radians(0.5), self.max_rotate) * t
        return offset, scale, angle

    def clip_one(self, label: int, size: int, frames: int) -> torch.Tensor:
        """Return one augmented clip (3, frames, size, size) of class ``label`` in [-1, 1]."""
        img = self.images[label]
        _, height, width = img.shape
        u = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        uu, vv = u[None, :].expand(size, size), u[:, None].expand(size, size)  # x (column), y (row)
        for _ in range(100):
            offset, scale, angle = self._motion(frames)
            cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
            s = scale[:, None, None]
            dx = offset[:, 0, None, None] + s * (cos * uu - sin * vv)
            dy = offset[:, 1, None, None] + s * (sin * uu + cos * vv)
            # The centre is drawn so that every frame's window (plus the bicubic margin) is inside the photo.
            margin = 2.0
            lo_x, hi_x = -float(dx.min()) + margin, width - 1 - float(dx.max()) - margin
            lo_y, hi_y = -float(dy.min()) + margin, height - 1 - float(dy.max()) - margin
            if hi_x < lo_x or hi_y < lo_y:
                continue
            cx, cy = self._uniform(lo_x, hi_x), self._uniform(lo_y, hi_y)
            # grid_sample with align_corners=False: pixel centre x maps to (2x + 1) / W - 1.
            grid = torch.stack([(2 * (cx + dx) + 1) / width - 1, (2 * (cy + dy) + 1) / height - 1], dim=-1)
            clip = F.grid_sample(
                img[None].expand(frames, -1, -1, -1),
                grid.float(),
                mode="bicubic",
                padding_mode="border",
                align_corners=False,
            ).clamp(-1, 1)
            # The retina sits on a black background that teaches nothing about the class.
            if label == self.retina and float((clip.mean(1) < -0.85).float().mean()) > 0.02:
                continue
            break
        else:
            raise ValueError(f"no {size} px, {frames}-frame clip of {CLASSES[label]!r} fits in 100 tries")
        clip = clip.permute(1, 0, 2, 3)  # (3, F, H, W), the Wan layout
        if self._randint(2):
            clip = clip.flip(3)
        if self._randint(2):
            clip = clip.flip(2)
        if CLASSES[label] not in NO_ROT90:
            clip = torch.rot90(clip, self._randint(4), dims=(2, 3))
        return clip.contiguous()

    def batch(self, size: int, frames: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return clips (B, 3, frames, size, size) and their labels (B,)."""
        labels = torch.randint(len(CLASSES), (batch,), generator=self.gen)
        clips = torch.stack([self.clip_one(int(lab), size, frames) for lab in labels])
        return clips, labels


class TextureVideo(torch.nn.Module):
    """The transformer plus the learned per-class token sequences."""

    def __init__(self, transformer: WanTransformer3DModel, num_classes: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokens = torch.nn.Parameter(torch.randn(num_classes, NUM_TEXT_TOKENS, transformer.config.text_dim))

    def forward(self, clips: torch.Tensor, s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity prediction for ``clips`` (B, 3, F, H, W) at noise level ``s`` (B,) in [0, 1]."""
        return self.transformer(
            hidden_states=clips,
            timestep=s * 1000,  # what WanPipeline passes: the scheduler's timestep, a float in [0, 1000]
            encoder_hidden_states=self.tokens[labels],
            return_dict=False,
        )[0]


def sample_s(n: int, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Noise levels s in (0, 1): logit-normal(0, 1) through the scheduler's time shift."""
    s = torch.sigmoid(torch.randn(n, generator=gen))
    return shift * s / (1 + (shift - 1) * s)


def save_pipeline(out: Path, model: TextureVideo, shift: float, trained: dict) -> int:
    """Write the model folder to ``out`` (written beside it, then swapped in); return weight bytes."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model = copy.deepcopy(model).eval()
    model.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    build_scheduler(shift).save_pretrained(tmp / "scheduler")
    save_file({"tokens": model.tokens.detach().contiguous()}, tmp / "class_embeddings.safetensors")
    with open(tmp / "classes.json", "w") as f:
        json.dump({"classes": CLASSES, "trained": trained}, f, indent=2)
        f.write("\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    files = [out / "transformer" / "diffusion_pytorch_model.safetensors", out / "class_embeddings.safetensors"]
    return sum(f.stat().st_size for f in files)


def load_model(path: Path) -> TextureVideo:
    """Load a folder written by :func:`save_pipeline` as a trainable :class:`TextureVideo`."""
    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer").float()
    emb = load_file(path / "class_embeddings.safetensors")
    model = TextureVideo(transformer, emb["tokens"].shape[0])
    with torch.no_grad():
        model.tokens.copy_(emb["tokens"])
    return model


def parse_cycle(text: str) -> list[tuple[int, int, int]]:
    """Parse ``SIZExFRAMESxBATCH,...`` into (size, frames, batch) triples."""
    try:
        cycle = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        cycle = []
    if not cycle or any(len(c) != 3 or c[0] < 2 or c[0] % 2 or c[1] < 1 or c[2] < 1 for c in cycle):
        raise ValueError(f"--cycle must be SIZExFRAMESxBATCH,... with even sizes, got {text!r}")
    return cycle  # type: ignore[return-value]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output pipeline folder")
    p.add_argument("--iters", type=int, default=1_000_000, help="maximum training iterations")
    p.add_argument("--max-minutes", type=float, default=120.0, help="wall-clock budget; stop and save when reached")
    p.add_argument("--cycle", default=DEFAULT_CYCLE, help="repeating batch pattern SIZExFRAMESxBATCH,...")
    p.add_argument("--big", default="64x17x1", help="shape SIZExFRAMESxBATCH of every --big-every-th batch")
    p.add_argument("--big-every", type=int, default=24, help="every this many iterations is a --big batch (0: never)")
    p.add_argument("--shift", type=float, default=2.0, help="time shift of training noise levels and the scheduler")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up iterations")
    p.add_argument(
        "--decay-minutes",
        type=float,
        default=30.0,
        help="the learning rate falls linearly to 10%% over the last this many minutes of --max-minutes",
    )
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--init", type=Path, default=None, help="start from the weights of this pipeline folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--log-every", type=int, default=24)
    p.add_argument("--log", type=Path, default=Path(__file__).resolve().parent / "train_video.log", help="log file")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    args = p.parse_args(argv)
    if min(args.iters, args.threads, args.warmup, args.log_every) < 1:
        raise ValueError("--iters, --threads, --warmup and --log-every must be positive")
    args.cycle_list = parse_cycle(args.cycle)
    big = parse_cycle(args.big)
    if len(big) != 1 or args.big_every < 0:
        raise ValueError("--big must be one SIZExFRAMESxBATCH and --big-every non-negative")
    args.big_shape = big[0]
    if args.max_minutes <= 0 or args.checkpoint_minutes <= 0 or args.decay_minutes < 0:
        raise ValueError("--max-minutes and --checkpoint-minutes must be positive, --decay-minutes non-negative")
    if args.shift <= 0:
        raise ValueError("--shift must be positive")
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
    args.log.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(args.log, "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    command = " ".join(filter(None, [env, "python", shlex.join(sys.argv)]))

    sampler = ClipSampler(gen)
    prior: dict = {}  # training metadata of --init, if any
    if args.init is not None:
        model = load_model(args.init).train()
        prior = json.loads((args.init / "classes.json").read_text())["trained"]
    else:
        model = TextureVideo(build_transformer(), len(CLASSES)).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params * 4 > FP32_MAX_BYTES:
        raise ValueError(f"{n_params} parameters exceed the {FP32_MAX_BYTES // 2**20} MiB fp32 limit")
    log(f"params {n_params / 1e6:.3f} M, threads {torch.get_num_threads()}, command: {command}")

    start = time.time()
    last_ckpt, last_log = start, start
    loss_ema = float("nan")
    step = 0
    shape_seconds: dict[str, list[float]] = {}  # per batch shape: [total seconds, count], for the log
    budget = args.max_minutes * 60
    cycle_text = args.cycle + (f", every {args.big_every}th batch {args.big}" if args.big_every else "")

    def trained_meta() -> dict:
        # With --init, iterations, minutes and commands accumulate over the runs.
        return {
            "iters": prior.get("iters", 0) + step,
            "cycle": " then ".join(filter(None, [prior.get("cycle"), f"{cycle_text} ({step} iters)"])),
            "clip_sizes": "SIZExFRAMESxBATCH, pixels x frames x clips per batch",
            "motions": {
                "pan_px_per_frame": [0.25, sampler.max_pan],
                "zoom_per_frame": [0.01, sampler.max_zoom],
                "rotate_deg_per_frame": [0.5, round(math.degrees(sampler.max_rotate), 3)],
                "probabilities": MOTIONS,
            },
            "objective": "rectified flow, velocity (noise - x0), s ~ logit-normal(0, 1) through the time shift",
            "shift": args.shift,
            "minutes": round(prior.get("minutes", 0) + (time.time() - start) / 60, 1),
            "threads": args.threads,
            "machine": "2-core CPU, no GPU",
            "command": " && ".join(filter(None, [prior.get("command"), command])),
            "seed": args.seed,
            "lr": args.lr,
            "ema_decay": args.ema_decay,
            "final_loss_ema": round(loss_ema, 5),
        }

    while step < args.iters and (time.time() - start) < budget:
        t_iter = time.time()
        if args.big_every and (step + 1) % args.big_every == 0:
            size, frames, batch = args.big_shape
        else:
            size, frames, batch = args.cycle_list[step % len(args.cycle_list)]
        # Linear warm-up, then constant, then a linear fall to 10% over the last --decay-minutes
        # (by wall time, since the budget is wall time).
        elapsed = t_iter - start
        decay = 1.0
        if args.decay_minutes > 0:
            into_decay = (elapsed - budget + args.decay_minutes * 60) / (args.decay_minutes * 60)
            decay = 1.0 - 0.9 * min(1.0, max(0.0, into_decay))
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) * decay
        x0, labels = sampler.batch(size, frames, batch)
        noise = torch.randn(x0.shape, generator=gen)
        s = sample_s(batch, args.shift, gen)
        sv = s[:, None, None, None, None]
        xs = (1 - sv) * x0 + sv * noise
        loss = F.mse_loss(model(xs, s, labels), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        # EMA warm-up: average more aggressively early on, when weights change fastest.
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()
        record = shape_seconds.setdefault(f"{size}x{frames}x{batch}", [0.0, 0])
        record[0] += time.time() - t_iter
        record[1] += 1

        now = time.time()
        if step % args.log_every == 0:
            per_shape = ", ".join(f"{k} {v[0] / v[1]:.1f}s" for k, v in shape_seconds.items())
            log(
                f"it {step} loss {loss.item():.4f} loss_ema {loss_ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{args.log_every / (now - last_log):.3f} it/s elapsed {(now - start) / 60:.1f} min [{per_shape}]"
            )
            last_log = now
        if now - last_ckpt >= args.checkpoint_minutes * 60:
            size_bytes = save_pipeline(args.out, ema, args.shift, trained_meta())
            log(f"checkpoint at it {step}: {args.out} ({size_bytes / 2**20:.1f} MiB)")
            last_ckpt = time.time()

    size_bytes = save_pipeline(args.out, ema, args.shift, trained_meta())
    log(
        f"done: {step} iters in {(time.time() - start) / 60:.1f} min, loss_ema {loss_ema:.4f}, "
        f"saved {args.out} ({size_bytes / 2**20:.1f} MiB)"
    )
    log_file.close()


if __name__ == "__main__":
    main()
