"""The device check's steps and their runner (started by benchmarks/device_check.sh, which holds the
per-step budget table and the arithmetic behind each limit).

    python benchmarks/device_check.py --out DIR [--small] [--steps NAME ...] [--inject NAME=fail|hang ...]

Every step runs in a process of its own under its own time limit (`Step.limit_s`; `small_limit_s` in
small mode, on a CPU): a step that fails, runs out of memory or hangs is ended and the next one starts.
The moment a step ends, its result is appended to DIR/results.jsonl (one JSON line: status, seconds, its
measurements), its output to DIR/device_check.log, and its files are packed anew into
DIR/artifacts.tar.gz: three files whatever happens (the device tool returns at most 8). The whole run
stays within `BUDGET_S` from the shell script's start: a step never gets more than what is left.

Steps measured in this process's Python (`Step.run`) run in a forked child, so that torch and diffusers
are imported once (this process never touches CUDA: its children each start CUDA themselves); pytest and
the command line run as subprocesses. `--inject` replaces steps by a failing or hanging command (the
test of the runner itself: tests/test_device_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 300.0
"""The whole run on the device, from device_check.sh's start: a machine start and a rerun fit in 15 min."""
SMALL_BUDGET_S = 1000.0
"""Small mode on a 2-core CPU, whose limits are ~2x their times on our loaded machine (tests/test_device_check.py
runs some steps; all of them in its slow test)."""
RESERVE_S = 3.0
"""Kept back from the last step for the final writes."""
INJECTED_HANG_LIMIT_S = 2.0
TINY_UNET = "benchmarks/configs/tiny_sdxl_unet.json"
TINY_VAE = "benchmarks/configs/tiny_vae.json"
FLUX_SMALL = "benchmarks/configs/flux_small.json"
TINY_WAN = "benchmarks/configs/tiny_wan_transformer.json"
TINY_WAN_VAE = "benchmarks/configs/tiny_wan_vae.json"
LOG_TAIL_BYTES = 200_000
"""Of each step's output, at most this much (its end) goes into device_check.log; all of it is in the tarball."""


class Context:
    """What a step's code gets: small mode or not, its folder of artefacts, and `row`, which writes one
    result to disk at once (a step killed later keeps the rows written before)."""

    def __init__(self, name: str, small: bool, work: Path) -> None:
        self.name, self.small, self.work = name, small, work
        self.rows_path = work / f"{name}.jsonl"

    def row(self, record: dict) -> None:
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.row({"note": text})


@dataclass
class Step:
    name: str
    what: str
    limit_s: float
    small_limit_s: float
    run: Callable[[Context], None] | None = None
    command: Callable[[Context], list[str]] | None = None
    env: dict = field(default_factory=dict)


# -- the steps' code (run in a child process) ------------------------------------------------------------


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(small: bool, name: str):
    import torch

    return torch.float32 if small else getattr(torch, name)


def _bench(
    ctx: Context, arch: str, size: int | tuple[int, int], dtype, simulate, repeats: int, model, **options
) -> None:
    """One `bench_step` call (a square `size` or (height, width)); its rows written at once, each printed as
    `distrifusion bench` prints it."""
    from distrifusion.measure.bench import bench_step, format_row

    height, width = size if isinstance(size, tuple) else (size, size)
    start = time.perf_counter()
    rows = bench_step(arch, height, width, dtype, simulate, repeats, device=_device(), model=model, **options)
    for row in rows:
        print(format_row(row), flush=True)
        ctx.row(dict(row, part=f"{size} {options}", part_s=time.perf_counter() - start))


def environment(ctx: Context) -> None:
    import platform

    import diffusers
    import torch

    record = dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__)
    record["cuda"] = torch.cuda.is_available()
    record["cpu_cores"] = os.cpu_count()
    if record["cuda"]:
        props = torch.cuda.get_device_properties(0)
        record.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count)
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        record.update(
            cuda_version=torch.version.cuda, nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        )
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        record["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        record["nvidia_smi"] = f"not run: {e}"
    print(json.dumps(record), flush=True)
    ctx.row(record)


def sdxl(ctx: Context) -> None:
    """SDXL UNet, fp16: full step (diffusers eager, diffusers graph, ours 1 rank) and shares of 2, 4, 8 (CFG
    split) with graphs at 1024² and 2048², the shares without graphs at 1024²; at 3840² the eager full step
    and the share of 8, without graphs (a 3840² graph may not fit beside the other graphs)."""
    from distrifusion.measure.workload import build_model

    arch = TINY_UNET if ctx.small else "sdxl"
    dtype = _dtype(ctx.small, "float16")
    model = build_model(arch, dtype, _device())
    sizes = [(128, 1)] if ctx.small else [(1024, 5), (2048, 3)]
    for size, repeats in sizes:
        _bench(ctx, arch, size, dtype, [2, 4, 8], repeats, model)
        if size == sizes[0][0]:
            _bench(ctx, arch, size, dtype, [2, 4, 8], repeats, model, graphs=False, full_step="none")
    big = 128 if ctx.small else 3840
    _bench(ctx, arch, big, dtype, [8], 1, model, graphs=False, full_step="eager")


def flux(ctx: Context) -> None:
    """Flux-dev, bf16, one image (no CFG batch): full step and the share of 8 with sharded and replicated
    text at 1024² (graphs where possible) and 2048² (eager: compute-bound); at 4096² the share of 8 alone.
    Between them, at 1024², the memory plan's peak against the allocator's (the whole step)."""
    from distrifusion.measure.workload import build_model

    arch = FLUX_SMALL if ctx.small else "flux_dev"
    dtype = _dtype(ctx.small, "bfloat16")
    model = build_model(arch, dtype, _device())
    a, b, big = (128, 128, 128) if ctx.small else (1024, 2048, 4096)
    _bench(ctx, arch, a, dtype, [8], 1 if ctx.small else 3, model, text_tokens="sharded")
    _bench(ctx, arch, a, dtype, [8], 1 if ctx.small else 3, model, text_tokens="replicated", full_step="none")
    _memory(ctx, arch, a, dtype, [1], model)
    _bench(ctx, arch, b, dtype, [8], 1, model, graphs=False, text_tokens="sharded", full_step="eager")
    _bench(ctx, arch, b, dtype, [8], 1, model, graphs=False, text_tokens="replicated", full_step="none")
    ctx.note(
        f"flux {big}x{big}: full step left out: ~3.9 PFLOP, ~10 s a call on an H100 at 400 TFLOP/s, at least 2 "
        "calls; the share of 8 alone (1/8 of it), one timed call, its synchronous step untimed"
    )
    _bench(ctx, arch, big, dtype, [8], 1, model, graphs=False, full_step="none", time_sync_step=False)


def fbcache(ctx: Context) -> None:
    """Flux-dev, bf16, 1024², one device (issue 26): 20 Euler flow-matching steps on the bare model, fixed noise
    and text, without and then with diffusers' first-block cache (threshold 0.12): calls computed and seconds.
    Random weights: the calls the cache skips are this untrained model's, not Flux-dev's; the seconds of a
    computed and of a skipped call are the device's."""
    import torch
    from diffusers import FirstBlockCacheConfig

    from distrifusion.measure.caching import ComputedCalls
    from distrifusion.measure.timing import sync_device
    from distrifusion.measure.workload import build_model, model_inputs

    arch = FLUX_SMALL if ctx.small else "flux_dev"
    dtype, device = _dtype(ctx.small, "bfloat16"), _device()
    model = build_model(arch, dtype, device)
    size, steps, threshold = (128, 4, 0.12) if ctx.small else (1024, 20, 0.12)
    inputs = model_inputs(model, size, size)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()

    def denoise(n: int) -> None:
        x = inputs["hidden_states"]
        with torch.no_grad(), model.cache_context("cond"):
            for s, s_next in zip(sigmas[:n], sigmas[1 : n + 1]):
                t = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
                v = model(**{**inputs, "hidden_states": x, "timestep": t}, return_dict=False)[0]
                x = x + (s_next - s) * v

    denoise(1)  # first-call costs (kernels, allocator) outside the timed runs
    for cache in (None, threshold):
        if cache is not None:
            model.enable_cache(FirstBlockCacheConfig(threshold=cache))
        counter = ComputedCalls(model)
        sync_device(device)
        start = time.perf_counter()
        denoise(steps)
        sync_device(device)
        seconds = time.perf_counter() - start
        counter.remove()
        row = dict(arch=arch, size=size, steps=steps, fbcache=cache, calls=counter.calls, computed=counter.computed)
        ctx.row(dict(row, seconds=seconds))
        print(
            f"{arch} {size}² {steps} steps, fbcache {cache}: {counter.computed}/{counter.calls} computed, "
            f"{seconds:.2f} s"
        )


def _memory(ctx: Context, arch: str, size: int, dtype, ranks: list[int], model) -> None:
    """The memory plan (issue 25) against the measured peak: the whole step and one rank's share of each N
    (loopback collectives), `bench --memory`'s rows. On the GPU the allocator's peak; within 10% passes (a
    row's `ok`; the step goes on either way). In small mode on a CPU the resident set, too coarse at 128²
    to judge: recorded only."""
    from distrifusion.measure.memory import measure_share_memory

    for row in measure_share_memory(arch, size, size, dtype, ranks, _device(), model=model):
        step_error = (row["step_planned"] - row["step_measured"]) / max(row["step_measured"], 1)
        ok = abs(row["error"]) <= 0.10 and abs(step_error) <= 0.10
        row.update(part=f"memory {size}", step_error=step_error, ok=ok)
        print(
            f"memory {row['arch']} {size}^2 {row['dtype']}, share of {row['ranks']}: peak {row['measured'] / 1e9:.2f} "
            f"GB measured, {row['predicted'] / 1e9:.2f} GB planned ({row['error']:+.1%}); above the weights "
            f"{row['step_measured'] / 1e9:.3f} GB measured, {row['step_planned'] / 1e9:.3f} planned "
            f"({step_error:+.1%})",
            flush=True,
        )
        ctx.row(row)


def _bench_vae(ctx: Context, arch: str, height: int, width: int, dtype, simulate, repeats: int, **options) -> None:
    """One `bench_vae` call; its rows printed and written at once."""
    from distrifusion.measure.bench import bench_vae

    for row in bench_vae(arch, height, width, dtype, simulate, repeats, device=_device(), **options):
        print(json.dumps(row, default=str), flush=True)
        ctx.row(row)


def vae(ctx: Context) -> None:
    """SDXL VAE decode, fp16: whole and shares at 1024² (2, 4, 8) and 2048² (8); at 3840² the share of 8
    alone (a whole 3840² decode costs ~2.9 s a call)."""
    arch = TINY_VAE if ctx.small else "sdxl_vae"
    dtype = _dtype(ctx.small, "float16")
    parts = [(64, [2, 4, 8], 1, False), (128, [8], 1, True)] if ctx.small else []
    parts = parts or [(1024, [2, 4, 8], 3, False), (2048, [8], 2, False), (3840, [8], 1, True)]
    for size, simulate, repeats, share_only in parts:
        _bench_vae(ctx, arch, size, size, dtype, simulate, repeats, share_only=share_only)


def wan(ctx: Context) -> None:
    """Video (issue 23): Wan2.1-T2V-1.3B, bf16, 480x832 x 81 frames (21 x 30 x 52 = 32,760 tokens): the full
    step eagerly and the largest share of 2, 4 and 8 (strips of token rows, displaced, eager: its synchronous
    step untimed); then the Wan VAE's decode of 480x832 x 17 frames, whole and the largest share of 2, 4, 8."""
    from distrifusion.measure.workload import build_model

    arch, vae_arch = (TINY_WAN, TINY_WAN_VAE) if ctx.small else ("wan21_t2v_1_3b", "wan21_vae")
    dtype = _dtype(ctx.small, "bfloat16")
    (height, width), frames = ((128, 64), 9) if ctx.small else ((480, 832), 81)
    model = build_model(arch, dtype, _device())
    options = dict(graphs=False, frames=frames, full_step="eager", time_sync_step=False)
    _bench(ctx, arch, (height, width), dtype, [2, 4, 8], 1, model, **options)
    del model
    _bench_vae(ctx, vae_arch, height, width, dtype, [2, 4, 8], 1, frames=5 if ctx.small else 17)


def codec(ctx: Context) -> None:
    """The codec's cost (issue 14): the share of 8 at 2048², graphs where possible, uncompressed and with its
    displaced exchange coded residual-int2, in one process."""
    from distrifusion.measure.workload import build_model

    arch = TINY_UNET if ctx.small else "sdxl"
    dtype = _dtype(ctx.small, "float16")
    model = build_model(arch, dtype, _device())
    size, repeats = (128, 1) if ctx.small else (2048, 5)
    for compress in (None, "residual-int2"):
        _bench(ctx, arch, size, dtype, [8], repeats, model, compress=compress, full_step="none")


def compile_step(ctx: Context) -> None:
    """`bench --compile` on CUDA with graphs left to their default (which now means off): a tiny SDXL-like
    UNet's share of 2 eager, then compiled (inductor; small mode: dynamo alone), graph breaks at every
    exchange."""
    from distrifusion.measure.workload import build_model

    dtype = _dtype(ctx.small, "float16")
    model = build_model(TINY_UNET, dtype, _device())
    size = 64 if ctx.small else 256
    _bench(ctx, TINY_UNET, size, dtype, [2], 3, model, graphs=False, full_step="none")
    _bench(ctx, TINY_UNET, size, dtype, [2], 3, model, compiled="eager" if ctx.small else "inductor", full_step="none")


def _pytest(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *args]


def _generate(ctx: Context, nproc: int, size: int, steps: int, out: str) -> list[str]:
    size, steps = (32, 2) if ctx.small else (size, steps)
    return [
        *(sys.executable, "-m", "distrifusion", "generate", "--nproc", str(nproc)),
        *("--height", str(size), "--width", str(size), "--steps", str(steps), "--out", str(ctx.work / out)),
    ]


# The budget table in device_check.sh gives each limit's arithmetic; tests/test_device_check.py checks that
# the table and these limits agree and that they fit in BUDGET_S.
STEPS = [
    Step("environment", "versions, GPU, driver", 5, 30, run=environment),
    Step(
        "graphs",
        "real CUDA graphs against eager steps (tiny float64 models; FreeU captured; watchdog)",
        20,
        150,
        command=lambda ctx: _pytest("-k", "real_cuda", "tests/test_cuda_paths.py", "tests/test_exchange_and_graphs.py"),
    ),
    Step(
        "parity",
        "4 processes on one GPU over gloo, CUDA tensors, against one process (UNets and transformers)",
        70,
        150,
        command=lambda ctx: _pytest(
            *(["--collect-only"] if ctx.small else []),
            *("-k", "not fused_qkv and not lora_scale and not more_ranks"),
            *("tests/test_parity.py", "tests/test_transformers.py"),
        ),
        env={"DISTRIFUSION_BACKEND": "gloo", "DISTRIFUSION_TEST_WORLDS": "4"},
    ),
    Step("sdxl", "SDXL full step and shares, 1024², 2048², 3840²", 30, 60, run=sdxl),
    Step(
        "flux",
        "Flux-dev full step and shares of 8, 1024², 2048²; 4096² share only; memory plan vs peak at 1024²",
        35,
        60,
        run=flux,
    ),
    Step(
        "fbcache", "Flux-dev 1024², 20 steps, one device, without and with the first-block cache", 15, 40, run=fbcache
    ),
    Step("vae", "SDXL VAE decode, whole and shares, 1024², 2048²; 3840² share only", 15, 40, run=vae),
    Step(
        "wan",
        "Wan2.1-1.3B 480x832 x 81 frames, full step and shares of 2/4/8; Wan VAE decode x 17 frames, whole and shares",
        25,
        60,
        run=wan,
    ),
    Step("codec", "SDXL share of 8 at 2048², uncompressed and residual-int2", 10, 30, run=codec),
    Step(
        "compile",
        "torch.compile of a parallelised tiny UNet (share of 2), graphs left at auto",
        35,
        220,
        run=compile_step,
    ),
    Step(
        "generate",
        "the CLI, 2 ranks (gloo) on one GPU, embedded model 512², 20 steps",
        15,
        120,
        command=lambda ctx: _generate(ctx, 2, 512, 20, "gravel_512_nproc2.png"),
        env={"DISTRIFUSION_BACKEND": "gloo"},
    ),
    Step(
        "generate_graphs",
        "the CLI, 1 rank with CUDA graphs, embedded model 1024², 20 steps",
        15,
        90,
        command=lambda ctx: _generate(ctx, 1, 1024, 20, "gravel_1024_graphs.png"),
    ),
]


# -- the runner -----------------------------------------------------------------------------------------


def _injected(kind: str) -> list[str]:
    if kind == "fail":
        return ["sh", "-c", "echo 'injected failure'; exit 3"]
    return ["sh", "-c", "echo 'injected hang'; exec sleep 600"]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(pid: int, limit_s: float) -> tuple[int | None, bool]:
    """(exit code, timed out) of a child whose process group is `pid`; past `limit_s` the group is killed."""
    deadline = time.monotonic() + limit_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _kill_group(pid)  # what it left running (a rank, a compile worker) goes with it
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() >= deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            return None, True
        time.sleep(0.05)


def _forked(step: Step, ctx: Context, log_path: Path, limit_s: float) -> tuple[int | None, bool]:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: its own process group (killed whole at the limit), output to its log
        code = 1
        try:
            os.setsid()
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            step.run(ctx)
            code = 0
        except BaseException:  # noqa: BLE001 - reported in the step's log and result
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return _wait(pid, limit_s)


def _subprocess(argv: list[str], env: dict, log_path: Path, limit_s: float) -> tuple[int | None, bool]:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
    return _wait(proc.pid, limit_s)


def _summary(log_path: Path) -> dict:
    """What a command's output says in its last lines: pytest's verdict and failures, generate's line."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20]
    return {"last_line": lines[-1] if lines else "", **({"failures": failures} if failures else {})}


def run_step(step: Step, small: bool, work: Path, limit_s: float, inject: str | None, fork: bool) -> dict:
    """Run one step within `limit_s`; its result (never raises)."""
    ctx = Context(step.name, small, work)
    log_path = work / f"{step.name}.log"
    start, cpu = time.time(), _children_cpu()
    if inject:
        limit_s = min(limit_s, INJECTED_HANG_LIMIT_S) if inject == "hang" else limit_s
        code, timed_out = _subprocess(_injected(inject), {}, log_path, limit_s)
    elif step.run is not None and fork:
        code, timed_out = _forked(step, ctx, log_path, limit_s)
    elif step.run is not None:  # a fresh interpreter (DEVICE_CHECK_FORK=0)
        argv = [sys.executable, __file__, "--out", str(work), "--child", step.name, *(["--small"] if small else [])]
        code, timed_out = _subprocess(argv, step.env, log_path, limit_s)
    else:
        code, timed_out = _subprocess(step.command(ctx), step.env, log_path, limit_s)
    status = "timed out" if timed_out else "ok" if code == 0 else "failed"
    record = dict(step=step.name, status=status, rc=code, seconds=round(time.time() - start, 2))
    record["limit_s"] = round(limit_s, 1)
    record["cpu_s"] = round(_children_cpu() - cpu, 2)  # of its processes, once reaped (a killed one: up to then)
    record.update(what=step.what, started=start, ended=time.time(), **({"injected": inject} if inject else {}))
    if ctx.rows_path.exists():
        record["rows"] = [json.loads(line) for line in ctx.rows_path.read_text().splitlines() if line.strip()]
    if log_path.exists():
        record.update(_summary(log_path))
    return record


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _pack(work: Path, tarball: Path) -> None:
    """Every file of the steps so far, in one tarball, replaced whole (never half-written)."""
    tmp = tarball.with_name(tarball.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.iterdir()):
            tar.add(path, arcname=path.name)
    os.replace(tmp, tarball)


def _log_tail(path: Path) -> str:
    if not path.exists():
        return ""
    data = path.read_bytes()
    cut = len(data) > LOG_TAIL_BYTES
    text = data[-LOG_TAIL_BYTES:].decode(errors="replace")
    return ("[... earlier output in artifacts.tar.gz]\n" if cut else "") + text


def run(out: Path, small: bool, names: list[str] | None, inject: dict[str, str], fork: bool, t0: float) -> int:
    """All steps (or `names`), in order, each within its limit and what is left of the budget."""
    budget = SMALL_BUDGET_S if small else BUDGET_S
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device_check_"))
    results, log, tarball = out / "results.jsonl", out / "device_check.log", out / "artifacts.tar.gz"
    results.write_text("")
    unknown = sorted(set(names or []) - {s.name for s in STEPS})
    if unknown:
        raise SystemExit(f"device_check: unknown steps {unknown}; the steps: {[s.name for s in STEPS]}")
    failed = 0
    for step in [s for s in STEPS if not names or s.name in names]:
        left = budget - (time.time() - t0) - RESERVE_S
        limit = min(step.small_limit_s if small else step.limit_s, left)
        if limit < 1.0:
            record = dict(step=step.name, status="skipped", reason=f"budget of {budget:g} s spent", what=step.what)
        else:
            record = run_step(step, small, work, limit, inject.get(step.name), fork)
        failed += record["status"] != "ok"
        _append(results, json.dumps(record, default=str) + "\n")
        _append(log, f"=== {step.name}: {record['status']} ({record.get('seconds', 0):g} s)\n")
        _append(log, _log_tail(work / f"{step.name}.log"))
        _pack(work, tarball)
        line = f"device_check: {step.name:<16}{record['status']:<10}{record.get('seconds', 0):>7.1f} s"
        print(line + f" of {record.get('limit_s', 0):.0f}  {record.get('last_line', '')[:90]}", flush=True)
        if record["status"] in ("failed", "timed out"):
            print(_log_tail(work / f"{step.name}.log")[-1500:], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"device_check: {time.time() - t0:.0f} s in all; results in {results}, logs in {log}, files in {tarball}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder that comes back (the device tool's $OUT)")
    parser.add_argument("--small", action="store_true", help="tiny sizes on a CPU (the same steps)")
    parser.add_argument("--steps", nargs="+", help="only these steps (e.g. a rerun of the failed ones)")
    parser.add_argument("--inject", nargs="+", default=[], help="NAME=fail or NAME=hang (tests of the runner)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one step's code here (no fork)
    args = parser.parse_args(argv)
    if args.child:
        step = next(s for s in STEPS if s.name == args.child)
        step.run(Context(step.name, args.small, Path(args.out)))
        return 0
    inject = dict(item.split("=", 1) for item in args.inject)
    if any(kind not in ("fail", "hang") for kind in inject.values()):
        parser.error("--inject takes NAME=fail or NAME=hang")
    if args.small:  # tiny models gain nothing from more threads, and a shared CPU loses much to their spinning
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    fork = os.environ.get("DEVICE_CHECK_FORK", "1") != "0"
    # torch.cuda.is_available() through NVML: it does not start CUDA here (a forked child could not use it).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if fork:  # imported once here, inherited by every forked step (CUDA stays untouched in this process)
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel  # noqa: F401

        import distrifusion.measure.bench  # noqa: F401

        if torch.cuda.is_initialized():
            fork = False  # a CUDA context cannot cross a fork: fresh interpreters instead
    t0 = float(os.environ.get("DEVICE_CHECK_T0") or time.time())
    return run(Path(args.out), args.small, args.steps, inject, fork, t0)


if __name__ == "__main__":
    sys.exit(main())
