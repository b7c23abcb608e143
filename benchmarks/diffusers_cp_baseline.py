"""Baseline: diffusers' own (exact) context parallelism against DistriFusion, on CPU processes with gloo.

diffusers ships `model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N | ring_degree=N))`
(Ulysses all-to-all and ring attention). This script runs it, and DistriFusion (`mode="sync"`, exact patch
parallelism, and `mode="displaced"`), on a random-weight Flux-like `FluxTransformer2DModel` with N real
processes on this machine (spawned here, gloo over 127.0.0.1, `--threads` CPU threads per rank), and measures:

* exactness: a tiny float64 Flux (the `TINY` dims below), N ranks against one process: the max over steps of
  max|out - ref| / max|ref|;
* speed: one transformer step of a mid-size float32 model (`--width`, `--double`, `--single`, `--tokens` image
  tokens, `--text-tokens` text tokens): median over `--steps` timed steps after `--warmup` steps, each step's
  time being the slowest rank's (the minimum too: on a shared machine it is the less noisy one); the error
  against one process on the same inputs is reported too.

Every rank is called with the full inputs of a fake sampler (x_t = t * noise + (1 - t) * data, t going 1 -> 0.84
over the calls), so that DistriFusion's displaced steps (other strips' context from the previous call) see a
realistic small change between steps: their error is the displacement approximation, not a bug. DistriFusion's
first call after `reset` is synchronous; with `--warmup 2` the timed displaced steps are all displaced.

Workarounds that diffusers 0.42 needs on a CPU-only torch (no diffusers file is modified):

* `ModelMixin._resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, which is 0 on a
  CPU-only build (ZeroDivisionError): `torch.accelerator.device_count` is made to return 1 during
  `enable_parallelism` only. The device mesh is then `init_device_mesh("cpu", ...)` on the gloo group; funcol's
  all_to_all_single / all_gather_tensor work on gloo.
* Ring attention (`TemplatedRingAttention`) needs an attention op that returns the log-sum-exp. The only
  context-parallel backend with a CPU kernel is "native", whose forward op raises "Native attention does not
  support return_lse=True"; the LSE-returning ones ("_native_flash", "_native_cudnn", "flash", "sage", ...) call
  CUDA-only kernels or packages. So "diffusers ring" fails as shipped, and the row records the error. The extra
  method "diffusers ring+lse-shim" (not diffusers as shipped) swaps, at run time, the native backend's
  forward op for one that returns the LSE from `aten._scaled_dot_product_flash_attention_for_cpu`, and turns
  `convert_to_fp32` off for float64, to show what the ring algorithm itself costs and whether it is exact.

Command (writes benchmarks/cpu_cp_baseline.json, prints a markdown table; several minutes on 2 cores):

    python benchmarks/diffusers_cp_baseline.py --nproc 2 --tokens 1024 4096 --width 384 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

ONE = "one process"
ULYSSES = "diffusers ulysses"
RING = "diffusers ring"
RING_SHIM = "diffusers ring+lse-shim"
DF_SYNC = "distrifusion sync"
DF_DISPLACED = "distrifusion displaced"
METHODS = (ULYSSES, RING, RING_SHIM, DF_SYNC, DF_DISPLACED)

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)


def mid_dims(width: int, heads: int, double: int, single: int, text_dim: int) -> dict:
    """A Flux-like transformer of `width` = heads * head_dim; RoPE axes split head_dim like Flux (1/4, 3/8, 3/8)."""
    head_dim = width // heads
    if head_dim * heads != width or head_dim % 4:
        raise SystemExit(f"--width {width} must be --heads {heads} times a head dim divisible by 4")
    side = head_dim * 3 // 8 // 2 * 2
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=128,
        guidance_embeds=False,
        axes_dims_rope=(head_dim - 2 * side, side, side),
    )


def build_model(dims: dict, dtype: torch.dtype):
    """Random weights (same seed on every rank); constant parameters (norm scales, zero biases) perturbed."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dims).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or p.std() == 0:
                p.add_(0.1 * torch.randn_like(p))
    return model


def grid_ids(tokens: int) -> torch.Tensor:
    """(tokens, 3) row-major positions (0, row, col) of the most square grid with `tokens` cells."""
    rows = int(tokens**0.5)
    while tokens % rows:
        rows -= 1
    cols = tokens // rows
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    return torch.cat([torch.zeros(tokens, 1), grid.float()], 1)


def make_inputs(dims: dict, tokens: int, text: int, dtype: torch.dtype, step: int) -> dict:
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, tokens, dims["in_channels"], generator=g)
    data = torch.randn(1, tokens, dims["in_channels"], generator=g)
    t = 1.0 - 0.02 * step
    return dict(
        hidden_states=(t * noise + (1 - t) * data).to(dtype),
        encoder_hidden_states=torch.randn(1, text, dims["joint_attention_dim"], generator=g).to(dtype),
        pooled_projections=torch.randn(1, dims["pooled_projection_dim"], generator=g).to(dtype),
        timestep=torch.tensor([t], dtype=dtype),
        img_ids=grid_ids(tokens).to(dtype),
        txt_ids=torch.zeros(text, 3, dtype=dtype),
        return_dict=False,
    )


def install_ring_lse_shim() -> None:
    """Not diffusers as shipped: let the native backend's CP forward op return the LSE (CPU flash kernel)."""
    from diffusers.models import attention_dispatch as ad

    original = ad._native_attention_forward_op

    def forward_op(
        ctx,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _save_ctx=True,
        _parallel_config=None,
    ):
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        return out.transpose(1, 2), lse.transpose(1, 2)

    ad._native_attention_forward_op = forward_op


def enable_diffusers_cp(model, method: str, world: int, dtype: torch.dtype) -> None:
    from diffusers import ContextParallelConfig

    if method == ULYSSES:
        config = ContextParallelConfig(ulysses_degree=world)
    else:
        if method == RING_SHIM:
            install_ring_lse_shim()
        config = ContextParallelConfig(ring_degree=world, convert_to_fp32=dtype != torch.float64)
    # diffusers computes `rank % torch.accelerator.device_count()`: 0 on a CPU-only torch.
    device_count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, device_count())
    try:
        model.enable_parallelism(config=config)
    finally:
        torch.accelerator.device_count = device_count


def _ready(out: torch.Tensor) -> torch.Tensor:
    """diffusers' output gather is a lazy functional collective: wait for it inside the timed region."""
    out = out.wait() if hasattr(out, "wait") else out
    return out.clone()


def worker(rank: int, world: int, port: int, job: dict, result_path: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(job["threads"])
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(env, WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    dtype = getattr(torch, job["dtype"])
    method = job["method"]
    result = dict(job["row"])
    try:
        model = build_model(job["dims"], dtype)
        if method in (ULYSSES, RING, RING_SHIM):
            enable_diffusers_cp(model, method, world, dtype)
        elif method in (DF_SYNC, DF_DISPLACED):
            import distrifusion

            mode = "sync" if method == DF_SYNC else "displaced"
            distrifusion.parallelize(model, distrifusion.ParallelConfig(mode=mode, warmup_steps=0))
            distrifusion.reset(model)
        times, outs = [], []
        with torch.no_grad():
            for step in range(job["warmup"] + job["steps"]):
                inputs = make_inputs(job["dims"], job["tokens"], job["text"], dtype, step)
                if world > 1:
                    dist.barrier()
                start = time.perf_counter()
                out = _ready(model(**inputs)[0])
                times.append(time.perf_counter() - start)
                outs.append(out)
        timed = slice(job["warmup"], None)
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, times)
            times = [max(ts) for ts in zip(*every)]
        result["step_ms"] = 1e3 * statistics.median(times[timed])
        result["step_ms_min"] = 1e3 * min(times[timed])
        result["step_ms_all"] = [round(1e3 * t, 1) for t in times]
        if method == ONE:
            torch.save(outs, job["ref_path"])
        elif rank == 0:
            refs = torch.load(job["ref_path"])
            errs = [float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, refs)]
            result["rel_err"] = max(errs[timed])
            result["rel_err_per_step"] = errs
        result["status"] = "ok"
    except Exception as e:  # recorded in the table: e.g. diffusers ring without an LSE-returning CPU kernel
        if rank == 0:
            traceback.print_exc()
        result["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, job: dict, tries: int = 2) -> dict:
    """Spawn `world` ranks for one method, wait for (reap) them all, and return rank 0's row.

    A run whose ranks die (a crash, not a Python exception: those are recorded by the ranks) is retried once;
    a crash after rank 0 wrote its row (at teardown) keeps the row and says so.
    """
    failure = ""
    for _ in range(tries):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        try:
            mp.start_processes(worker, args=(world, free_port(), job, path), nprocs=world, start_method="spawn")
        except ProcessException as e:
            failure = f"{type(e).__name__}: {e}"
        try:
            with open(path) as f:
                row = json.load(f)
            if failure:
                row["note"] = f"a rank crashed after finishing: {failure}"
            return row
        except (OSError, ValueError):
            pass
        finally:
            os.unlink(path)
    return dict(job["row"], status=f"error: ranks crashed twice: {failure}"[:200])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_case(case: str, dims: dict, dtype: str, tokens: int, text: int, args, tmp: str) -> list[dict]:
    dims_row = dict(case=case, dtype=dtype, tokens=tokens, text_tokens=text, dims=dims)
    job = dict(dims=dims, dtype=dtype, tokens=tokens, text=text, threads=args.threads)
    job.update(warmup=args.warmup, steps=args.steps, ref_path=os.path.join(tmp, f"{case}_{tokens}.pt"))
    rows = []
    for world, method in [(1, ONE)] + [(n, m) for n in args.nproc for m in args.methods]:
        job.update(method=method, row=dict(dims_row, nproc=world, method=method))
        row = launch(world, job)
        rows.append(row)
        err = row.get("rel_err")
        print(
            f"[{case} {tokens} tok] N={world} {method}: {row.get('step_ms', float('nan')):.1f} ms"
            + (f", rel err {err:.2e}" if err is not None else "")
            + ("" if row["status"] == "ok" else f"  ({row['status']})"),
            flush=True,
        )
    return rows


def table(rows: list[dict]) -> str:
    head = "| case | dtype | image+text tokens | N | method | step ms (median) | min | vs 1 proc | rel err vs 1 proc "
    head += "| status |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["case"], r["tokens"]): r.get("step_ms") for r in rows if r["method"] == ONE}
    for r in rows:
        ms, one = r.get("step_ms"), base.get((r["case"], r["tokens"]))
        median = f"{ms:.1f}" if ms else "-"
        low = f"{r['step_ms_min']:.1f}" if ms else "-"
        speed = f"{one / ms:.2f}x" if ms and one else "-"
        err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "-"
        status = r["status"] if len(r["status"]) < 90 else r["status"][:87] + "..."
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['tokens']}+{r['text_tokens']} | {r['nproc']} | {r['method']} | "
            f"{median} | {low} | {speed} | {err} | {status} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[2], help="rank counts to run (besides one process)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024], help="image tokens of the timed model")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--width", type=int, default=384, help="hidden size = heads * head_dim")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--double", type=int, default=2, help="double-stream (MMDiT) blocks")
    p.add_argument("--single", type=int, default=4, help="single-stream blocks")
    p.add_argument("--text-dim", type=int, default=256, help="joint_attention_dim (text encoder width)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--skip-exactness", action="store_true", help="skip the tiny float64 check")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_cp_baseline.json"))
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import diffusers

    started = time.time()
    load_before = os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_exactness:
            rows += run_case("exactness (tiny)", TINY, "float64", 64, 8, args, tmp)
        dims = mid_dims(args.width, args.heads, args.double, args.single, args.text_dim)
        for tokens in args.tokens:
            rows += run_case("timing (mid)", dims, "float32", tokens, args.text_tokens, args, tmp)
    md = table(rows)
    print("\n" + md)
    report = dict(
        command="python benchmarks/diffusers_cp_baseline.py " + " ".join(sys.argv[1:]),
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        card="none (CPU only)",
        threads_per_rank=args.threads,
        backend="gloo over 127.0.0.1, spawned processes",
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        steps=dict(warmup=args.warmup, timed=args.steps, statistic="median (and min) of the slowest rank's step time"),
        loadavg_before_after=[load_before, os.getloadavg()],
        wall_s=round(time.time() - started, 1),
        rows=rows,
        markdown=md,
    )
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
