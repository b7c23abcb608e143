r"""Train the small class-conditional texture model with the Flux transformer architecture.

This is the second model embedded in distrifusion (``--model embedded-dit``). It is a tiny
diffusers ``FluxTransformer2DModel`` (about 2.3 M parameters: 2 double-stream and 4
single-stream blocks, 4 heads of 32) working directly in pixel space: an RGB image in
[-1, 1] of shape (B, 3, H, W) is packed 2x2 exactly as ``FluxPipeline._pack_latents`` packs
latents, giving (B, H/2 * W/2, 12) tokens; ``img_ids`` are (0, token_row, token_col) as
``FluxPipeline._prepare_latent_image_ids`` builds them and ``txt_ids`` are zeros.

Data: the same six scikit-image photographs and augmented random crops as the embedded UNet
(``train_texture_model.py``, whose ``CropSampler`` is reused), one class each, label order

    0 brick, 1 grass, 2 gravel, 3 hubble_deep_field, 4 ihc (immunohistochemistry), 5 retina

Class conditioning: each class is a learned sequence of 4 "text" tokens of width
``joint_attention_dim`` (the ``encoder_hidden_states``) and a learned pooled vector (the
``pooled_projections``), trained jointly with the transformer.

Objective: rectified flow as in Flux / SD3. With s ~ logit-normal(0, 1),
x_s = (1 - s) x0 + s noise, and the model, given timestep s (Flux multiplies it by 1000
inside), predicts the velocity noise - x0. Sampling uses ``FlowMatchEulerDiscreteScheduler``
(shift 1). Unlike the UNet's DDPM-epsilon training, no offset noise is needed: at s = 1 the
input is pure noise, so the model has to learn each class's mean colour.

Larger images: the model is trained on small crops but used at 128 and 256 px (64x64 and
128x128 tokens). RoPE only sees relative positions in q.k, but a model trained on positions
0..15 has never seen the rotation angles of large offsets; so every batch gets a random
integer offset (uniform in [0, ``--max-offset``)) added to its token rows and columns. Every
``--big-every``-th batch is drawn at ``--big-crop`` (or any repeating pattern of crop sizes
and batch sizes given with ``--cycle``) so that the model also sees long-range layouts and
softmax over more tokens.

The shipped weights were produced on a 2-core CPU (no GPU; the other core busy with other
work, so iteration rates varied 0.2-1.2 it/s) with one thread, in two phases, from the
repository root (2448 + 528 iterations, 60 + 25 minutes):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python training/train_texture_dit.py \
        --out src/distrifusion/data/textures_dit --threads 1 --max-minutes 60
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python training/train_texture_dit.py \
        --init src/distrifusion/data/textures_dit --out src/distrifusion/data/textures_dit \
        --threads 1 --max-minutes 25 --warmup 50 --cycle 32x16,64x4,32x16,128x1

The first phase (32 px crops, every fourth batch 64 px) gave plausible textures at 32 and
64 px but noise-like grass and gravel at 128 px: a model that has only seen up to 1024 tokens
(relative distances up to 31) spreads its attention over the many unseen far tokens of a
larger grid. The second phase adds 128 px crops (4096 tokens) for that reason; it helped the
star field at 128 px a little, grass and gravel hardly. A third 20-minute phase with
``--cycle 64x4,128x1`` (226 iterations, see train_dit.log) was not better and was discarded.
On --init the EMA restarts with its warm-up, i.e. it averages over only the last ~10% of the
phase's iterations. Longer training (the UNet saw 4x more pixels) is the obvious next step.

The output folder::

    DIR/transformer/                  FluxTransformer2DModel.save_pretrained (safetensors; EMA)
    DIR/scheduler/                    FlowMatchEulerDiscreteScheduler config
    DIR/class_embeddings.safetensors  "tokens" (classes, 4, 64) and "pooled" (classes, 64); EMA
    DIR/classes.json                  {"classes": [...], "trained": {...training metadata...}}

A checkpoint in the same format is written every ``--checkpoint-minutes`` minutes, so a
partially finished run is usable. See ``sample_texture_dit.py`` to look at samples.
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
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_texture_model import CLASSES, CropSampler, ema_update, lr_lambda  # noqa: E402

NUM_TEXT_TOKENS = 4
"""Length of each class's learned token sequence (the ``encoder_hidden_states``)."""

FP32_MAX_BYTES = 16 * 1024 * 1024
"""Limit on the fp32 weights (transformer plus class embeddings)."""


def build_transformer() -> FluxTransformer2DModel:
    """Return the (untrained) texture transformer with the project's fixed architecture."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=12,
        out_channels=None,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Return the sampling scheduler saved with the model."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h_tokens: int, w_tokens: int, row0: int = 0, col0: int = 0) -> torch.Tensor:
    """``img_ids`` (h*w, 3): columns (0, row0 + row, col0 + col), as FluxPipeline builds them."""
    ids = torch.zeros(h_tokens, w_tokens, 3)
    ids[..., 1] = torch.arange(row0, row0 + h_tokens)[:, None]
    ids[..., 2] = torch.arange(col0, col0 + w_tokens)[None, :]
    return ids.reshape(h_tokens * w_tokens, 3)


class TextureDiT(torch.nn.Module):
    """The transformer plus the learned per-class tokens and pooled vectors."""

    def __init__(self, transformer: FluxTransformer2DModel, num_classes: int) -> None:
        super().__init__()
        self.transformer = transformer
        width = transformer.config.joint_attention_dim
        pooled = transformer.config.pooled_projection_dim
        self.tokens = torch.nn.Parameter(torch.randn(num_classes, NUM_TEXT_TOKENS, width))
        self.pooled = torch.nn.Parameter(torch.randn(num_classes, pooled))

    def forward(self, tokens: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Velocity prediction for packed ``tokens`` at noise level ``s`` (B,) in [0, 1]."""
        return self.transformer(
            hidden_states=tokens,
            timestep=s,
            encoder_hidden_states=self.tokens[labels],
            pooled_projections=self.pooled[labels],
            txt_ids=torch.zeros(NUM_TEXT_TOKENS, 3),
            img_ids=ids,
            return_dict=False,
        )[0]


def sample_s(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Noise levels s in (0, 1): logit-normal(0, 1) (as SD3) or uniform."""
    if kind == "uniform":
        return torch.rand(n, generator=gen)
    return torch.sigmoid(torch.randn(n, generator=gen))


def save_pipeline(out: Path, model: TextureDiT, trained: dict) -> int:
    """Write the model folder to ``out`` (written beside it, then swapped in); return weight bytes."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model = copy.deepcopy(model).eval()
    model.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    build_scheduler().save_pretrained(tmp / "scheduler")
    emb = {"tokens": model.tokens.detach().contiguous(), "pooled": model.pooled.detach().contiguous()}
    save_file(emb, tmp / "class_embeddings.safetensors")
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


def load_model(path: Path) -> TextureDiT:
    """Load a folder written by :func:`save_pipeline` as a trainable :class:`TextureDiT`."""
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer").float()
    emb = load_file(path / "class_embeddings.safetensors")
    model = TextureDiT(transformer, emb["tokens"].shape[0])
    with torch.no_grad():
        model.tokens.copy_(emb["tokens"])
        model.pooled.copy_(emb["pooled"])
    return model


@torch.no_grad()
def class_mean_rgb(sampler: CropSampler, n: int = 64) -> list[list[float]]:
    """Mean RGB colour in [0, 1] of ``n`` training crops of each class (used by the tests)."""
    out = []
    for label in range(len(CLASSES)):
        crops = torch.stack([sampler.crop_one(label) for _ in range(n)])
        out.append([round(float(v), 4) for v in (crops.mean((0, 2, 3)) / 2 + 0.5)])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output pipeline folder")
    p.add_argument("--iters", type=int, default=1_000_000, help="maximum training iterations")
    p.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock budget; stop and save when reached")
    p.add_argument("--batch", type=int, default=16, help="batch size of the ordinary (--crop) batches")
    p.add_argument("--crop", type=int, default=32, help="training crop size in pixels (even)")
    p.add_argument("--big-crop", type=int, default=64, help="crop of every --big-every-th batch (0 disables)")
    p.add_argument("--big-batch", type=int, default=4, help="batch size of the --big-crop batches")
    p.add_argument("--big-every", type=int, default=4, help="every this many iterations is a --big-crop batch")
    p.add_argument(
        "--cycle",
        default=None,
        help="repeating batch pattern CROPxBATCH,... (e.g. 32x16,32x16,64x4,128x1); overrides the four options above",
    )
    p.add_argument("--max-offset", type=int, default=128, help="random token-position offset in [0, this)")
    p.add_argument("--s-sampling", choices=["logit-normal", "uniform"], default="logit-normal")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up iterations")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--init", type=Path, default=None, help="start from the weights of this pipeline folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--log", type=Path, default=Path(__file__).resolve().parent / "train_dit.log", help="log file")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    args = p.parse_args(argv)
    if min(args.iters, args.batch, args.threads, args.big_batch, args.big_every) < 1:
        raise ValueError("--iters, --batch, --big-batch, --big-every and --threads must be positive")
    for name in ("crop", "big_crop"):
        value = getattr(args, name)
        if value % 2 or value < (0 if name == "big_crop" else 2):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive even number, got {value}")
    if args.cycle is None:
        big = [(args.big_crop, args.big_batch)] if args.big_crop else []
        args.cycle_list = [(args.crop, args.batch)] * ((args.big_every - 1) if big else 1) + big
    else:
        try:
            args.cycle_list = [tuple(int(v) for v in item.split("x")) for item in args.cycle.split(",")]
        except ValueError:
            args.cycle_list = []
        if not args.cycle_list or any(len(c) != 2 or c[0] < 2 or c[0] % 2 or c[1] < 1 for c in args.cycle_list):
            raise ValueError(f"--cycle must be CROPxBATCH,... with even crops and positive batches, got {args.cycle!r}")
    if args.max_minutes <= 0 or args.max_offset < 1:
        raise ValueError("--max-minutes and --max-offset must be positive")
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

    samplers = {crop: CropSampler(crop, gen) for crop in sorted({c for c, _ in args.cycle_list})}
    prior: dict = {}  # training metadata of --init, if any
    if args.init is not None:
        model = load_model(args.init).train()
        prior = json.loads((args.init / "classes.json").read_text())["trained"]
    else:
        model = TextureDiT(build_transformer(), len(CLASSES)).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup))
    n_params = sum(p.numel() for p in model.parameters())
    if n_params * 4 > FP32_MAX_BYTES:
        raise ValueError(f"{n_params} parameters exceed the {FP32_MAX_BYTES // 2**20} MiB fp32 limit")
    log(f"params {n_params / 1e6:.3f} M, threads {torch.get_num_threads()}, command: {command}")
    mean_rgb = class_mean_rgb(samplers[args.cycle_list[0][0]])

    cycle = ",".join(f"{c}x{b}" for c, b in args.cycle_list)
    prior_cycle = prior.get("cycle")
    if prior and not prior_cycle:  # metadata of the first run, written before --cycle existed
        first = [f"{prior['crop']}x{prior['batch']}"] * (prior["big_every"] - 1)
        prior_cycle = ",".join(first + [f"{prior['big_crop']}x{prior['big_batch']}"]) + f" ({prior['iters']} iters)"

    start = time.time()
    last_ckpt, last_log = start, start
    loss_ema = float("nan")
    step = 0

    def trained_meta() -> dict:
        # With --init, iterations, minutes and commands accumulate over the runs.
        return {
            "iters": prior.get("iters", 0) + step,
            "crop": args.cycle_list[0][0],
            "batch": args.cycle_list[0][1],
            "cycle": " then ".join(filter(None, [prior_cycle, f"{cycle} ({step} iters)"])),
            "max_offset": args.max_offset,
            "objective": f"rectified flow, velocity (noise - x0), s ~ {args.s_sampling}",
            "minutes": round(prior.get("minutes", 0) + (time.time() - start) / 60, 1),
            "threads": args.threads,
            "machine": "2-core CPU, no GPU",
            "command": " && ".join(filter(None, [prior.get("command"), command])),
            "seed": args.seed,
            "lr": args.lr,
            "ema_decay": args.ema_decay,
            "final_loss_ema": round(loss_ema, 5),
            "class_mean_rgb": mean_rgb,
        }

    while step < args.iters and (time.time() - start) < args.max_minutes * 60:
        crop, batch = args.cycle_list[step % len(args.cycle_list)]
        x0, labels = samplers[crop].batch(batch)
        x0 = pack(x0)
        noise = torch.randn(x0.shape, generator=gen)
        s = sample_s(batch, args.s_sampling, gen)
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        row0, col0 = torch.randint(args.max_offset, (2,), generator=gen).tolist()
        ids = image_ids(crop // 2, crop // 2, row0, col0)
        loss = F.mse_loss(model(xs, s, labels, ids), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        # EMA warm-up: average more aggressively early on, when weights change fastest.
        ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()

        now = time.time()
        if step % args.log_every == 0:
            log(
                f"it {step} loss {loss.item():.4f} loss_ema {loss_ema:.4f} "
                f"{args.log_every / (now - last_log):.3f} it/s elapsed {(now - start) / 60:.1f} min"
            )
            last_log = now
        if now - last_ckpt >= args.checkpoint_minutes * 60:
            size = save_pipeline(args.out, ema, trained_meta())
            log(f"checkpoint at it {step}: {args.out} ({size / 2**20:.1f} MiB)")
            last_ckpt = time.time()

    size = save_pipeline(args.out, ema, trained_meta())
    log(
        f"done: {step} iters in {(time.time() - start) / 60:.1f} min, loss_ema {loss_ema:.4f}, "
        f"saved {args.out} ({size / 2**20:.1f} MiB)"
    )
    log_file.close()


if __name__ == "__main__":
    main()
