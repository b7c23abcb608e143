"""`distrifusion bench`: step times of the full model and of one rank's share, and the traffic.

Everything here is measured, never assumed: the full step (plain diffusers, and ours with one
rank), one rank's share of N (`--simulate N`: this process plays the rank with the largest strip,
with loopback collectives of the right sizes), the bytes each rank receives per step, and — with
`--nproc N` — whole images over real processes against one process.
"""

from __future__ import annotations

import os

import torch

from ..engine.config import ParallelConfig
from ..engine.graphs import CudaGraphs
from ..parallel.parallelize import parallelize, remove, reset, use_cuda_graphs
from .simulate import loopback_runtime
from .timing import (
    current_memory_mb,
    free_cached_memory,
    peak_memory_mb,
    reset_peak_memory,
    return_freed_memory,
    time_calls,
)
from .traffic import count_traffic, counting_loopback_runtime, first_steps_traffic
from .workload import build_model, model_inputs

__all__ = [
    "bench_step",
    "bench_vae",
    "graphs_with_compile",
    "bench_images",
    "count_traffic",
    "format_row",
    "format_table",
    "LINKS",
]

# Nominal one-direction bandwidths, bytes per second.
LINKS = {
    "NVLink 4 (H100)": 450e9,
    "PCIe 5 x16": 64e9,
    "PCIe 4 x16": 32e9,
    "400 Gb Ethernet": 50e9,
    "100 Gb Ethernet": 12.5e9,
}


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
        return_freed_memory()
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
        # (a whole decode too small for the CPU's page-granular gauge reads 0 MB: no ratio then)
        row["memory_vs_full"] = row["activation_mb"] / full["activation_mb"] if full and full["activation_mb"] else None
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
    compiled: bool | str = False,
    compress: str | None = None,
    frames: int | None = None,
    video_split: str = "rows",
    full_step: str = "all",
    time_sync_step: bool = True,
) -> list[dict]:
    """Full-step times for one size, then one rank's share of each N in `simulate` (N > 1): one
    row per N (or one row without a share), with traffic per step and peak memory. With `compress`
    the shares' displaced steps code their exchange (the coding time is in the share's time).

    `graphs` is `ParallelConfig.cuda_graphs` for our runs (None: on where possible, i.e. CUDA);
    plain diffusers is timed eagerly and, on CUDA, also as a CUDA graph. With `compiled`, our runs
    are `torch.compile(model)` after `parallelize` (compilation happens in the untimed warm-up calls;
    a string names the backend) and never distrifusion's CUDA graphs (`graphs_with_compile`).
    `full_step`: "all" (the three full steps above), "eager" (plain diffusers eagerly only: a size whose
    graphs may not fit, or whose other variants would only repeat it) or "none" (the shares alone, for
    sizes whose full step costs too much: the rows' full-step figures and speedups are None).
    `time_sync_step=False` leaves a share's synchronous step untimed (None), for sizes where each call
    costs seconds.
    """
    if full_step not in ("all", "eager", "none"):
        raise ValueError(f"full_step must be 'all', 'eager' or 'none', got {full_step!r}")
    graphs = graphs_with_compile(graphs, compiled)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model or build_model(arch, dtype, device)
    inputs = model_inputs(model, height, width, frames=frames)
    step = lambda: model(**inputs)  # noqa: E731
    row = dict(
        arch=arch,
        height=height,
        width=width,
        **({"frames": frames, "video_split": video_split} if frames else {}),
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
        row.update(dict.fromkeys(("diffusers_eager_s", "diffusers_graph_s", "ours_world1_s", "full_step_s")))
        row["graphs"] = use_cuda_graphs(ParallelConfig(cuda_graphs=graphs), loopback_runtime(1, device=device))
        if full_step == "all":
            _time_full_step(row, model, inputs, step, repeats, device, graphs, compiled)
        elif full_step == "eager":
            row["diffusers_eager_s"] = row["full_step_s"] = time_calls(step, device, repeats)
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
                    model,
                    inputs,
                    ranks,
                    repeats,
                    mode,
                    device,
                    graphs,
                    text_tokens,
                    compiled,
                    compress=compress,
                    video_split=video_split,
                    time_sync_step=time_sync_step,
                ),
            )
            full = row["full_step_s"]
            share["compute_speedup"] = full / share["share_step_s"] if full else None
            need = share["step_bytes"] / share["share_step_s"]
            share["bandwidth_needed_GBps"] = need / 1e9
            share["links_that_hide_it"] = [name for name, bw in LINKS.items() if bw >= need]
            share["peak_memory_mb"] = peak_memory_mb(device)
            rows.append(share)
    return rows


def graphs_with_compile(graphs: bool | None, compiled: bool | str) -> bool | None:
    """`graphs` for a compiled run: distrifusion's CUDA graphs do not compose with a compiled model (the
    wrapper refuses it), so "where possible" (None) means off; asking for both is refused."""
    if not compiled:
        return graphs
    if graphs:
        raise ValueError(
            "distrifusion: a compiled model cannot also run as distrifusion's CUDA graphs; time it with graphs off "
            "(None picks off)"
        )
    return False


def _compiled(model, compiled: bool | str):
    if not compiled:
        return model
    return torch.compile(model, backend=compiled) if isinstance(compiled, str) else torch.compile(model)


def _time_full_step(row: dict, model, inputs: dict, step, repeats: int, device, graphs, compiled) -> None:
    """The full step on one device: plain diffusers eagerly and (CUDA) as a CUDA graph, ours with one rank."""
    row["diffusers_eager_s"] = time_calls(step, device, repeats)
    row["diffusers_graph_s"] = None  # CUDA graphs exist on CUDA only
    if device.type == "cuda":
        graphed = CudaGraphs(device)
        plain = lambda i: (model(**i, return_dict=False)[0], None)  # noqa: E731
        row["diffusers_graph_s"] = time_calls(lambda: graphed("plain", plain, inputs), device, repeats, warmup=2)
        graphed.clear()
        del graphed
        free_cached_memory(device)
    parallelize(model, ParallelConfig(mode="sync", cuda_graphs=graphs), runtime=loopback_runtime(1, device=device))
    row["graphs"] = model._distrifusion_state.graphs is not None
    ours = _compiled(model, compiled)
    row["ours_world1_s"] = time_calls(lambda: ours(**inputs), device, repeats, warmup=2)
    remove(model)
    free_cached_memory(device)
    # Against the fastest way to run the whole step on one device, so that the ratio is honest.
    row["full_step_s"] = min(row[k] for k in ("diffusers_eager_s", "diffusers_graph_s", "ours_world1_s") if row[k])


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
    video_split="rows",
    time_sync_step=True,
) -> dict:
    """One rank's share of `ranks`: this process plays the largest strip with loopback collectives
    (a displaced step with `compress` encodes its row and decodes the others', as a real rank does)."""
    counter = {"bytes": 0}
    runtime = counting_loopback_runtime(ranks, device, counter)
    config = ParallelConfig(
        mode=mode,
        warmup_steps=0,
        split_cfg=split_cfg,
        cuda_graphs=graphs,
        text_tokens=text_tokens,
        compress=compress,
        video_split=video_split,
    )
    parallelize(model, config, runtime=runtime)
    state = model._distrifusion_state
    ours = _compiled(model, compiled)
    step = lambda: ours(**inputs)  # noqa: E731

    def sync_step() -> None:
        state.reset()  # step 0: synchronous
        step()

    row = dict(ranks=ranks, **first_steps_traffic(model, inputs, counter, mode))
    # A graph: its eager use, then its capture; compiled: compilation, then a check of its guards; eager: one.
    warmup = 2 if state.graphs is not None or compiled else 1
    row["sync_step_s"] = None
    if time_sync_step:
        row["sync_step_s"] = time_calls(sync_step, device, repeats, warmup=warmup)
        sync_step()  # from here on displaced steps (or sync, with mode="sync"); the traffic's step 1 was one
    row["share_step_s"] = time_calls(step, device, repeats, warmup=warmup)
    remove(model)
    free_cached_memory(device)
    return row


def format_row(row: dict) -> str:
    how = f"{', graphs' if row['graphs'] else ''}{', compiled' if row.get('compiled') else ''}"
    frames = f" x {row['frames']} frames" if row.get("frames") else ""
    text = (
        f"{row['arch']} {row['height']}x{row['width']}{frames} {row['dtype']} on {row['card']}, "
        f"{row['threads']} threads: "
    )
    if row["diffusers_eager_s"] is None:
        text += f"full step not timed (shares only{how})"
    else:
        text += (
            f"diffusers eager {row['diffusers_eager_s'] * 1e3:.0f} ms, "
            + (f"diffusers CUDA graph {row['diffusers_graph_s'] * 1e3:.0f} ms, " if row["diffusers_graph_s"] else "")
            + (f"ours (1 rank{how}) {row['ours_world1_s'] * 1e3:.0f} ms" if row["ours_world1_s"] else "ours not timed")
        )
    if "ranks" in row:
        speedup = row["compute_speedup"]
        text += (
            f"\n  one rank's share of {row['ranks']} ({row['cfg_groups']} CFG groups, strip of "
            f"{row['largest_strip_rows']} rows): {row['share_step_s'] * 1e3:.0f} ms per step"
            + (f" (exchange coded {row['compress']})" if row.get("compress") else "")
            + (f" -> compute-bound speedup {speedup:.2f}x over the fastest full step" if speedup else "")
            + (f"; sync step {row['sync_step_s'] * 1e3:.0f} ms" if row["sync_step_s"] is not None else "")
            + f"\n  received per rank: {row['step_bytes'] / 1e9:.3f} GB per displaced step, "
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
        speedup = f"{r['compute_speedup']:.2f}x" if share and r["compute_speedup"] else "–"
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
    frames: int | None = None,
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
    inputs = model_inputs(model, height, width, frames=frames)
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
