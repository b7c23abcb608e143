"""`distrifusion bench`: step times of the full model and of one rank's share, and the traffic.

Everything here is measured, never assumed: the full step (plain diffusers, and ours with one
rank), one rank's share of N (`--simulate N`: this process plays the rank with the largest strip,
with loopback collectives of the right sizes), the bytes each rank receives per step, and — with
`--nproc N` — whole images over real processes against one process.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from ..engine.comm import Communicator, PendingGather
from ..engine.config import ParallelConfig
from ..engine.graphs import CudaGraphs
from ..parallel.parallelize import parallelize, remove, reset
from .archs import ARCHS, CONFIGS
from .simulate import loopback_runtime

# Nominal one-direction bandwidths, bytes per second.
LINKS = {
    "NVLink 4 (H100)": 450e9,
    "PCIe 5 x16": 64e9,
    "PCIe 4 x16": 32e9,
    "400 Gb Ethernet": 50e9,
    "100 Gb Ethernet": 12.5e9,
}


def build_model(arch: str, dtype: torch.dtype, device: torch.device):
    """A random-weight denoiser of a published architecture (or a config JSON path; its
    `_class_name` picks the diffusers class, UNet2DConditionModel by default), initialised on
    `device` itself (an SDXL UNet initialised on the CPU takes a minute)."""
    import diffusers

    if arch not in ARCHS and not arch.endswith(".json"):
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)} or a config .json path")
    path = Path(arch) if arch.endswith(".json") else CONFIGS / ARCHS[arch]
    config = json.loads(path.read_text())
    cls = getattr(diffusers, config.pop("_class_name", "UNet2DConditionModel"))
    torch.manual_seed(0)
    with torch.device(device):
        return cls.from_config(config).to(dtype).eval()


def model_inputs(model, height: int, width: int, batch: int | None = None, scale: int | None = None) -> dict:
    """The keyword arguments of one denoising call at a pixel size (latents are 8x smaller), as the
    model's text-to-image pipeline makes them: a CFG batch of 2 for UNets, SD3 and PixArt; one image
    with distilled guidance for Flux-dev; one image for a pixel-space UNet2DModel (no latents). Text
    lengths are the pipelines' defaults (CLIP 77, SD3 333, PixArt 120, Flux 512). `scale`: pixels per
    latent cell (None: 1 for a UNet2DModel, else 8; a pixel-space transformer takes 1)."""
    from diffusers import (
        AutoencoderKL,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DModel,
    )

    cfg, p = model.config, next(model.parameters())
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g) if p.device.type != "meta" else torch.empty(shape)  # noqa: E731
    scale = scale or (1 if isinstance(model, UNet2DModel) else 8)
    h, w = height // scale, width // scale
    if isinstance(model, FluxTransformer2DModel):
        batch = batch or 1
        rows, cols = h // 2, w // 2  # the pipeline packs 2x2 latent cells per token
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        inputs = dict(
            hidden_states=rand(batch, rows * cols, cfg.in_channels),
            encoder_hidden_states=rand(batch, 512, cfg.joint_attention_dim),
            pooled_projections=rand(batch, cfg.pooled_projection_dim),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.cat([torch.zeros(rows * cols, 1), grid.float()], 1),
            txt_ids=torch.zeros(512, 3),
        )
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5)
    elif isinstance(model, SD3Transformer2DModel):
        batch = batch or 2
        inputs = dict(
            hidden_states=rand(batch, cfg.in_channels, h, w),
            encoder_hidden_states=rand(batch, 333, cfg.joint_attention_dim),
            pooled_projections=rand(batch, cfg.pooled_projection_dim),
            timestep=torch.full((batch,), 500.0),
        )
    elif isinstance(model, PixArtTransformer2DModel):
        batch = batch or 2
        inputs = dict(
            hidden_states=rand(batch, cfg.in_channels, h, w),
            encoder_hidden_states=rand(batch, 120, cfg.caption_channels),
            timestep=torch.full((batch,), 500.0),
            added_cond_kwargs=dict(
                resolution=torch.tensor([[height, width]] * batch, dtype=torch.float32),
                aspect_ratio=torch.tensor([[height / width]] * batch, dtype=torch.float32),
            ),
        )
    elif isinstance(model, UNet2DModel):  # pixel space (the embedded texture model): one image, a class label
        batch = batch or 1
        inputs = dict(sample=rand(batch, cfg.in_channels, h, w), timestep=torch.tensor(500))
        if cfg.num_class_embeds:
            inputs["class_labels"] = torch.zeros(batch, dtype=torch.long)
    elif isinstance(model, AutoencoderKL):  # a decode of one image
        inputs = dict(z=rand(batch or 1, cfg.latent_channels, h, w))
    else:
        batch = batch or 2
        inputs = dict(
            sample=rand(batch, cfg.in_channels, h, w),
            timestep=torch.tensor(500),
            encoder_hidden_states=rand(batch, 77, cfg.cross_attention_dim),
        )
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {
                "text_embeds": rand(batch, pooled),
                "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch),
            }
    return _to_model(inputs, p)


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: the CUDA allocator's, or this process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def bench_vae(
    arch: str,
    height: int,
    width: int,
    dtype: torch.dtype,
    simulate: list[int],
    repeats: int,
    device=None,
    share_only: bool = False,
) -> list[dict]:
    """A VAE decode of one image: the whole decode on one device against the largest share of each
    N (loopback collectives), with the bytes each rank receives and the peak activation memory
    (peak minus what was in use before the call: weights and inputs are not activations).

    `share_only` skips the whole decode (for sizes one device cannot hold) and the warm-up call: the
    rows' ratios to the whole decode are then None, and `full_min_mb` says what it needs at least."""
    from ..models import find_denoiser

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        _return_freed_memory()
    vae = build_model(arch, dtype, device)
    if find_denoiser(vae)[1].entries(vae)[0][0] == "forward":
        raise ValueError(f"{arch} is not a VAE; use distrifusion bench without --vae")
    inputs = model_inputs(vae, height, width)
    decode = lambda: vae.decode(**inputs)  # noqa: E731
    base = dict(arch=arch, height=height, width=width, dtype=str(dtype).removeprefix("torch."), device=str(device))
    base["card"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    base["threads"] = torch.get_num_threads()
    if share_only:
        base["full_min_mb"] = largest_call_mb(arch, height, width, dtype)
    rows = []
    with torch.no_grad():
        for ranks in [*([] if share_only else [1]), *[n for n in simulate if n > 1]]:
            counter = {"bytes": 0}
            if ranks > 1:
                parallelize(vae, ParallelConfig(), runtime=counting_loopback_runtime(ranks, device, counter))
            if not share_only:
                decode()  # warm-up (a size that needs --share-only takes minutes a call: none)
            free_cached_memory(device)
            before = current_memory_mb(device)
            reset_peak_memory(device)
            seconds = time_calls(decode, device, repeats, warmup=0)  # the timed calls also give the peak
            activation = peak_memory_mb(device) - before
            received = counter["bytes"] / (repeats + (not share_only))
            remove(vae)
            free_cached_memory(device)
            rows.append(dict(base, ranks=ranks, decode_s=seconds, received_bytes=received, activation_mb=activation))
    full = None if share_only else rows[0]
    for row in rows:  # None: the whole decode was not run
        row["time_vs_full"] = None if full is None else row["decode_s"] / full["decode_s"]
        row["memory_vs_full"] = None if full is None else row["activation_mb"] / full["activation_mb"]
    return rows


def largest_call_mb(arch: str, height: int, width: int, dtype: torch.dtype) -> float:
    """A lower bound on the whole decode's activation memory, from shapes alone (meta device, no
    compute): the largest input plus output of any single layer, which are alive together."""
    vae = build_model(arch, dtype, torch.device("meta"))
    largest = [0]

    def record(module, args, output):
        tensors = [t for t in (*args, output) if isinstance(t, torch.Tensor)]
        largest[0] = max(largest[0], sum(t.numel() * t.element_size() for t in tensors))

    hooks = [m.register_forward_hook(record) for m in vae.decoder.modules() if not list(m.children())]
    with torch.no_grad():
        vae.decode(**model_inputs(vae, height, width))
    for hook in hooks:
        hook.remove()
    return largest[0] / 2**20


def _return_freed_memory() -> None:
    """Make glibc map every allocation over 128 KiB on its own and unmap it when freed, so that this
    process's resident set (what VmHWM measures on a CPU) follows the tensors alive, measurement
    after measurement, instead of keeping the previous one's freed memory."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _to_model(value, p: torch.Tensor):
    """Floating tensors in the model's dtype, every tensor on its device (ids of positions stay float32
    on CPU-like precision rules: Flux casts them itself)."""
    if isinstance(value, dict):
        return {k: _to_model(v, p) for k, v in value.items()}
    if value.is_floating_point():
        return value.to(p.device, p.dtype)
    return value.to(p.device)


class CountingCommunicator:
    """Counts the bytes this rank receives (from the group's other members) through `inner`: in all
    ("bytes"), and split by kind: blocking collectives ("blocking_bytes", "blocking_calls"), which
    the step waits for, and asynchronous ones ("async_bytes", "async_calls"), which run behind it.

    While `counter["recording"]` is set it also logs each collective, for `distrifusion.plan`'s
    timeline: (seconds since `counter["t0"]`, "block" or "send", bytes, id), and each asynchronous one's
    wait: (seconds, "wait", 0, id), in `counter["events"]`. Ids number a step's asynchronous collectives
    in issue order (whoever runs the steps sets `counter["next_id"] = 0` before each), so a wait in one
    step names the collective of the previous step with the same number."""

    def __init__(self, inner: Communicator, counter: dict, device: torch.device | None = None) -> None:
        self.inner, self.counter, self.device = inner, counter, device
        self.rank, self.size = inner.rank, inner.size
        self.capturable = inner.capturable

    def all_gather(self, tensor: torch.Tensor, async_op: bool = False) -> PendingGather:
        return self._issue(lambda: self.inner.all_gather(tensor, async_op), tensor[None], async_op)

    def all_gather_inplace(self, buffer: torch.Tensor, async_op: bool = False) -> PendingGather:
        return self._issue(lambda: self.inner.all_gather_inplace(buffer, async_op), buffer, async_op)

    def _issue(self, gather, buffer: torch.Tensor, async_op: bool) -> PendingGather:
        nbytes = (self.size - 1) * buffer[0].numel() * buffer.element_size()
        kind = "async" if async_op else "blocking"
        for key, value in (("bytes", nbytes), (f"{kind}_bytes", nbytes), (f"{kind}_calls", 1)):
            self.counter[key] = self.counter.get(key, 0) + value
        ident = -1
        if async_op:
            ident = self.counter.get("next_id", 0)
            self.counter["next_id"] = ident + 1
        self.event("send" if async_op else "block", nbytes, ident)
        pending = gather()
        return _LoggedWait(pending, self, ident) if async_op else pending

    def event(self, kind: str, nbytes: int, ident: int) -> None:
        if self.counter.get("recording"):
            if self.device is not None:
                _sync(self.device)
            self.counter["events"].append((time.perf_counter() - self.counter["t0"], kind, nbytes, ident))


class _LoggedWait:
    def __init__(self, pending: PendingGather, comm: CountingCommunicator, ident: int) -> None:
        self.pending, self.comm, self.ident = pending, comm, ident

    def wait(self) -> torch.Tensor:
        self.comm.event("wait", 0, self.ident)
        return self.pending.wait()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def free_cached_memory(device: torch.device) -> None:
    """Hand freed graph pools and cached blocks back between measurements (3840² needs the room)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement (CUDA allocator; on Linux also this process's VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the resident-set high-water mark (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # the high-water mark of this process image (ru_maxrss would carry the launcher's over exec)
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def bench_step(
    arch: str,
    height: int,
    width: int,
    dtype: torch.dtype,
    simulate: list[int],
    repeats: int,
    mode: str = "displaced",
    device: torch.device | None = None,
    graphs: bool | None = None,
    model=None,
    text_tokens: str = "sharded",
    compiled: bool = False,
    compress: str | None = None,
) -> list[dict]:
    """Full-step times for one size, then one rank's share of each N in `simulate` (N > 1): one
    row per N (or one row without a share), with traffic per step and peak memory. With `compress`
    the shares' displaced steps code their exchange (the coding time is in the share's time).

    `graphs` is `ParallelConfig.cuda_graphs` for our runs (None: on where possible, i.e. CUDA);
    plain diffusers is timed eagerly and, on CUDA, also as a CUDA graph. With `compiled`, our runs
    are `torch.compile(model)` after `parallelize` (compilation happens in the untimed warm-up calls).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model or build_model(arch, dtype, device)
    inputs = model_inputs(model, height, width)
    step = lambda: model(**inputs)  # noqa: E731
    row = dict(
        arch=arch,
        height=height,
        width=width,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        threads=torch.get_num_threads(),
        mode=mode,
        compiled=compiled,
        compress=compress,
    )
    reset_peak_memory(device)
    with torch.no_grad():
        row["diffusers_eager_s"] = time_calls(step, device, repeats)
        row["diffusers_graph_s"] = None  # CUDA graphs exist on CUDA only
        if device.type == "cuda":
            graphed = CudaGraphs(device)
            plain = lambda i: (model(**i, return_dict=False)[0], None)  # noqa: E731
            row["diffusers_graph_s"] = time_calls(lambda: graphed("plain", plain, inputs), device, repeats, warmup=2)
            del graphed
            free_cached_memory(device)
        parallelize(model, ParallelConfig(mode="sync", cuda_graphs=graphs), runtime=loopback_runtime(1, device=device))
        row["graphs"] = model._distrifusion_state.graphs is not None
        ours = torch.compile(model) if compiled else model
        row["ours_world1_s"] = time_calls(lambda: ours(**inputs), device, repeats, warmup=2)
        remove(model)
        free_cached_memory(device)
        # Against the fastest way to run the whole step on one device, so that the ratio is honest.
        row["full_step_s"] = min(row[k] for k in ("diffusers_eager_s", "diffusers_graph_s", "ours_world1_s") if row[k])
        row["peak_memory_mb"] = peak_memory_mb(device)
        rows = []
        for ranks in [n for n in simulate if n > 1] or [1]:
            if ranks == 1:
                rows.append(row)
                continue
            reset_peak_memory(device)
            share = dict(
                row,
                **_bench_share(
                    model, inputs, ranks, repeats, mode, device, graphs, text_tokens, compiled, compress=compress
                ),
            )
            share["compute_speedup"] = row["full_step_s"] / share["share_step_s"]
            need = share["step_bytes"] / share["share_step_s"]
            share["bandwidth_needed_GBps"] = need / 1e9
            share["links_that_hide_it"] = [name for name, bw in LINKS.items() if bw >= need]
            share["peak_memory_mb"] = peak_memory_mb(device)
            rows.append(share)
    return rows


def counting_loopback_runtime(ranks: int, device: torch.device, counter: dict):
    """This process as the last rank of `ranks` (loopback), counting the bytes it receives."""
    runtime = loopback_runtime(ranks, device=device)
    runtime.world = CountingCommunicator(runtime.world, counter, device)
    runtime.patch_groups = {k: CountingCommunicator(c, counter, device) for k, c in runtime.patch_groups.items()}
    return runtime


def count_traffic(
    arch: str,
    sizes: list[int],
    dtype: torch.dtype,
    ranks: list[int],
    mode: str = "displaced",
    text_tokens=None,
    compress: str | None = None,
):
    """Bytes each rank receives per synchronous and per displaced step, for every size and N, and
    what Ulysses sequence parallelism would receive for the same attention calls.

    Traffic depends on shapes only, so the model runs on the meta device: no weights, no compute,
    any image size in seconds on any machine. Counted at the communicator, like `bench_step`.
    """
    device = torch.device("meta")
    model = build_model(arch, dtype, device)
    rows = []
    for size in sizes:
        inputs = model_inputs(model, size, size)
        attention_calls = _attention_calls(model, inputs)
        for n in ranks:
            counter = {"bytes": 0}
            config = ParallelConfig(
                mode=mode,
                warmup_steps=0,
                split_cfg=True,
                cuda_graphs=False,
                text_tokens=text_tokens or "sharded",
                compress=compress,
            )
            parallelize(model, config, runtime=counting_loopback_runtime(n, device, counter))
            with torch.no_grad():
                traffic = _first_steps_traffic(model, inputs, counter, mode)
            remove(model)
            groups = traffic["cfg_groups"]
            dtype_name = str(dtype).removeprefix("torch.")
            ulysses = ulysses_bytes(attention_calls, n // groups, groups, torch.finfo(dtype).bits // 8)
            rows.append(
                dict(arch=arch, height=size, width=size, dtype=dtype_name, mode=mode, ranks=n, **traffic)
                | dict(text_tokens=config.text_tokens, compress=compress, ulysses_step_bytes=ulysses)
            )
    return rows


def _attention_calls(model, inputs: dict) -> list[tuple[int, int, int]]:
    """(batch, tokens, width) of every attention call of one step that mixes tokens across the image
    (self- and joint attention; cross-attention to text is local under any split)."""
    calls = []

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if text is not None and getattr(module, "is_cross_attention", False):
            return  # cross-attention: local
        tokens = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[2] * hidden.shape[3]
        calls.append((hidden.shape[0], tokens + (0 if text is None else text.shape[1]), module.inner_dim))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if hasattr(m, "processor")]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def ulysses_bytes(calls: list[tuple[int, int, int]], patch_ranks: int, cfg_groups: int, element: int) -> int:
    """Bytes one rank receives per step under Ulysses sequence parallelism over `patch_ranks`: each
    attention call all-to-alls its queries, keys, values and output; each of the four moves leaves a
    rank with (n-1)/n^2 of the call's (tokens x width) elements from the others."""
    n = patch_ranks
    if n == 1:
        return 0
    return sum(4 * (batch // cfg_groups) * tokens * width * (n - 1) // n**2 * element for batch, tokens, width in calls)


def _first_steps_traffic(model, inputs: dict, counter: dict, mode: str) -> dict:
    """Bytes received in step 0 (synchronous) and step 1 of a freshly parallelised model, and its split.

    Both run eagerly (a graph is captured at a phase's second use) so the communicator sees them; with
    mode="sync" step 1 would be the synchronous graph's first replay, so the synchronous figure stands.
    """
    counter.clear()
    model(**inputs)
    sync = dict(counter)
    counter.clear()
    model(**inputs)
    step = dict(counter) if mode != "sync" else sync
    partition = model._distrifusion_state.partition
    return dict(
        cfg_groups=partition.cfg_groups,
        largest_strip_rows=max(partition.rows),
        sync_step_bytes=sync.get("bytes", 0),
        step_bytes=step.get("bytes", 0),
        # What a step waits for, and what runs behind it: distrifusion.plan's link model needs both.
        **{f"step_{k}": step.get(k, 0) for k in ("blocking_bytes", "blocking_calls", "async_bytes", "async_calls")},
    )


def _bench_share(
    model,
    inputs: dict,
    ranks,
    repeats,
    mode,
    device,
    graphs,
    text_tokens="sharded",
    compiled=False,
    compress=None,
    split_cfg=True,
) -> dict:
    """One rank's share of `ranks`: this process plays the largest strip with loopback collectives
    (a displaced step with `compress` encodes its row and decodes the others', as a real rank does)."""
    counter = {"bytes": 0}
    runtime = counting_loopback_runtime(ranks, device, counter)
    config = ParallelConfig(
        mode=mode, warmup_steps=0, split_cfg=split_cfg, cuda_graphs=graphs, text_tokens=text_tokens, compress=compress
    )
    parallelize(model, config, runtime=runtime)
    state = model._distrifusion_state
    ours = torch.compile(model) if compiled else model
    step = lambda: ours(**inputs)  # noqa: E731

    def sync_step() -> None:
        state.reset()  # step 0: synchronous
        step()

    row = dict(ranks=ranks, **_first_steps_traffic(model, inputs, counter, mode))
    row["sync_step_s"] = time_calls(sync_step, device, repeats, warmup=2)
    sync_step()  # from here on displaced steps (or sync, with mode="sync")
    row["share_step_s"] = time_calls(step, device, repeats, warmup=2)
    remove(model)
    free_cached_memory(device)
    return row


def format_row(row: dict) -> str:
    text = (
        f"{row['arch']} {row['height']}x{row['width']} {row['dtype']} on {row['card']}, {row['threads']} threads: "
        f"diffusers eager {row['diffusers_eager_s'] * 1e3:.0f} ms, "
        + (f"diffusers CUDA graph {row['diffusers_graph_s'] * 1e3:.0f} ms, " if row["diffusers_graph_s"] else "")
        + f"ours (1 rank{', graphs' if row['graphs'] else ''}{', compiled' if row.get('compiled') else ''}) "
        f"{row['ours_world1_s'] * 1e3:.0f} ms"
    )
    if "ranks" in row:
        text += (
            f"\n  one rank's share of {row['ranks']} ({row['cfg_groups']} CFG groups, strip of "
            f"{row['largest_strip_rows']} rows): {row['share_step_s'] * 1e3:.0f} ms per step"
            + (f" (exchange coded {row['compress']})" if row.get("compress") else "")
            + f" -> compute-bound speedup {row['compute_speedup']:.2f}x over the fastest full step; "
            f"sync step {row['sync_step_s'] * 1e3:.0f} ms"
            f"\n  received per rank: {row['step_bytes'] / 1e9:.3f} GB per displaced step, "
            f"{row['sync_step_bytes'] / 1e9:.3f} GB per synchronous step; hiding it needs "
            f"{row['bandwidth_needed_GBps']:.2f} GB/s: " + (", ".join(row["links_that_hide_it"]) or "no listed link")
        )
    return text + f"\n  peak memory {row['peak_memory_mb']:.0f} MB"


def format_table(rows: list[dict]) -> str:
    """The step rows as one markdown table (what BENCHMARKS.md holds)."""
    ms = lambda v: "–" if v is None else f"{v * 1e3:.0f} ms"  # noqa: E731
    lines = [
        "| size | dtype | graphs | diffusers eager | diffusers graph | ours, 1 rank | N | one rank's share "
        "| compute-bound speedup | GB received per displaced step | peak memory per rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "diffusers_eager_s" not in r:
            continue
        share = "ranks" in r
        speedup = f"{r['compute_speedup']:.2f}x" if share else "–"
        received = f"{r['step_bytes'] / 1e9:.3f}" if share else "–"
        compiled = ", compiled" if r.get("compiled") else ""
        lines.append(
            f"| {r['height']}x{r['width']} | {r['dtype']} | {'on' if r['graphs'] else 'off'}{compiled} "
            f"| {ms(r['diffusers_eager_s'])} | {ms(r['diffusers_graph_s'])} | {ms(r['ours_world1_s'])} "
            f"| {r['ranks'] if share else 1} | {ms(r['share_step_s']) if share else '–'} "
            f"| {speedup} | {received} | {r['peak_memory_mb'] / 1024:.1f} GB |"
        )
    return "\n".join(lines)


def bench_images(
    arch: str,
    height: int,
    width: int,
    dtype: torch.dtype,
    steps: int,
    images: int,
    mode: str,
    graphs: bool | None = None,
    text_tokens: str = "sharded",
    compress: str | None = None,
) -> dict:
    """Whole-image latency (every denoising step of one image, with the pipeline's batch: CFG for
    UNets, SD3 and PixArt) in this process or under torchrun. The update between steps is a plain
    Euler step on the model output: its cost is negligible next to the model's, whatever the scheduler."""
    from ..models import find_denoiser

    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = ParallelConfig(mode=mode, cuda_graphs=graphs, text_tokens=text_tokens, compress=compress)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(arch, dtype, device)
    parallelize(model, config)  # one process: the original model (as a CUDA graph where graphs are on)
    inputs = model_inputs(model, height, width)
    key = find_denoiser(model)[1].sample_arg
    reset_peak_memory(device)

    def image():
        reset(model)
        x = inputs[key][:1]
        for _ in range(steps):
            out = model(**{**inputs, key: x.expand(inputs[key].shape)}, return_dict=False)[0]
            x = x - (1 / steps) * out[-1:, : x.shape[1]]

    with torch.no_grad():
        seconds = time_calls(image, device, images)
    row = dict(
        arch=arch,
        height=height,
        width=width,
        steps=steps,
        mode=mode,
        compress=compress,
        world_size=world,
        threads=torch.get_num_threads(),
        graphs=model._distrifusion_state.graphs is not None,
        image_s=seconds,
        peak_memory_mb=peak_memory_mb(device),
    )
    remove(model)  # breaks the model <-> wrapper reference cycles, so the next row starts without this model
    return row
