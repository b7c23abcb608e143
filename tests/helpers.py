"""Tiny random-weight models, a denoising loop, and a launcher for several gloo ranks on CPU."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

TEXT_LEN, TEXT_DIM, POOLED_DIM = 7, 16, 16

# Small versions of the published architectures: same block types and options, fewer channels.
CONFIGS = {
    "sd15": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
    ),
    "sd21": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4, 4),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        use_linear_projection=True,
        upcast_attention=True,
    ),
    "sdxl": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * 8,
    ),
    "unet2d": dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
}
BLOCK = 4  # three levels: two downsamplers


def tiny_model(kind: str, dtype=torch.float64, seed: int = 0):
    """A random-weight model of `kind`; constant parameters (norm affines, zero-inits) are perturbed
    so that every path contributes to the output."""
    torch.manual_seed(seed)
    cls = UNet2DModel if kind == "unet2d" else UNet2DConditionModel
    model = cls(sample_size=16, **CONFIGS[kind]).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or torch.all(p == p.flatten()[0]):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def model_inputs(model, kind: str, height: int, width: int, seed: int = 1, dtype=torch.float64):
    """The initial latent and the conditioning of a classifier-free-guidance loop (batch 2)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, model.config.in_channels, height, width, generator=g, dtype=dtype)
    kwargs = {}
    if kind == "unet2d":
        kwargs["class_labels"] = torch.tensor([0, 2])
    else:
        kwargs["encoder_hidden_states"] = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g, dtype=dtype)
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, POOLED_DIM, generator=g, dtype=dtype),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2, dtype=dtype),
        }
    device = next(model.parameters()).device
    return latent.to(device), {k: _to(v, device) for k, v in kwargs.items()}


def denoise(
    model,
    kind: str,
    height: int,
    width: int,
    steps: int = 6,
    seed: int = 1,
    dtype=torch.float64,
    trace: list | None = None,
    replay: list | None = None,
):
    """A classifier-free-guidance DDIM loop (batch 2: unconditional + conditional), as pipelines do.

    `trace` collects each step's (input latent, noise prediction). With `replay`, a list of input
    latents, every step takes the given latent instead of the previous step's result (teacher
    forcing): a step's error is then measured without the errors of the steps before it.
    """
    latent, kwargs = model_inputs(model, kind, height, width, seed, dtype)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if replay is not None:
                latent = replay[i].to(latent.device)
            pred = model(torch.cat([latent, latent]), t, **kwargs).sample
            if trace is not None:
                trace.append((latent.cpu(), pred.cpu()))
            uncond, cond = pred.chunk(2)
            latent = scheduler.step(uncond + 3.0 * (cond - uncond), t, latent).prev_sample
    return latent.cpu()


def _to(v, device):
    return {k: x.to(device) for k, x in v.items()} if isinstance(v, dict) else v.to(device)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB over the reference's peak-to-peak range."""
    peak = (b.max() - b.min()).item()
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        result = fn(*args)
        # On the CPU, so that the test process can compare results from ranks that ran on a GPU.
        torch.save(_cpu(result), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


class PerWorld(dict):
    """`run_ranks(n, job, n)` for each world size `n` when a test first asks for it (`results[n]`), then kept:
    a module fixture of this runs only the world sizes the selected tests use (CI leaves out the slow ones)."""

    def __init__(self, job) -> None:
        super().__init__()
        self.job = job

    def __missing__(self, world: int):
        self[world] = run_ranks(world, self.job, world)
        return self[world]


SLOW_WORLDS = [2, 3, pytest.param(4, marks=pytest.mark.slow)]
"""World sizes of the heavier multi-rank parity files: 2 and 3 ranks (3: uneven strips) in every CI run, 4 ranks
(the costliest on CI's 2 cores) with `-m slow`."""


def run_ranks(world_size: int, fn, *args):
    """Run `fn(*args)` on `world_size` gloo ranks (spawned processes); return every rank's result.

    `fn` must be importable (module level). Processes are joined before returning; an exception in
    any rank is raised here. A rank that exited without a result (status 0) gives None.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _rank_main,
            args=(world_size, free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world_size)]
        return [torch.load(p) if os.path.exists(p) else None for p in paths]  # None: the rank left no result


class NoCollectives:
    """A communicator that fails the test if any collective is issued."""

    capturable = False

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank

    def all_gather(self, tensor, async_op=False):
        raise AssertionError("a collective was issued before the error")

    all_gather_inplace = all_gather


def errors_on_every_rank(world: int, make, call, config=None) -> set[str]:
    """The error each of `world` ranks raises when `make()` is parallelised with `config` and `call`ed (none may
    issue a collective first); every message one line."""
    import pytest

    import distrifusion
    from distrifusion.engine.comm import Runtime

    messages = set()
    for rank in range(world):
        comm = NoCollectives(world, rank)
        runtime = Runtime(rank, world, torch.device("cpu"), comm, {1: comm, 2: NoCollectives(world // 2, rank)})
        target = make()
        with pytest.raises((ValueError, TypeError)) as info:
            distrifusion.parallelize(target, config or distrifusion.ParallelConfig(), runtime=runtime)
            call(target)
        messages.add(str(info.value))
        assert "\n" not in str(info.value)
    return messages
