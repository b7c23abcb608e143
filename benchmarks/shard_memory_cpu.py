"""Sharded weights (ParallelConfig.shard_weights) on CPU processes: per-rank resident memory and step time,
sharded against unsharded, with the memory plan's figures beside them.

Each configuration is N real processes (gloo) that build the same random-weight model whole (as a user
loads one), parallelize it, and run denoising steps of one image. Per rank: the resident set before the
model (imports, process group), after parallelize (the weights part: whole, or 1/N and the weights no
unit holds), its peak during the steps (the gathered units, activations, exchange), the median step.
glibc is told to unmap every freed allocation over 128 KiB at once (`timing.return_freed_memory`), so the
resident set follows the tensors alive.

    python benchmarks/shard_memory_cpu.py --json benchmarks/cpu_shard_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import run_ranks  # noqa: E402 - tests/ holds the gloo launcher

CONFIG = str(Path(__file__).parent / "configs" / "flux_200m.json")


def rank_main(setting: dict) -> dict:
    """One rank (launched by `run_ranks`: its environment set, one thread): build, parallelize, step."""
    import torch.distributed as dist

    import distrifusion
    from distrifusion.engine.comm import init_runtime
    from distrifusion.measure.timing import current_memory_mb, peak_memory_mb, reset_peak_memory, return_freed_memory
    from distrifusion.measure.workload import build_model

    cpu = torch.device("cpu")
    return_freed_memory()
    init_runtime()
    base = current_memory_mb(cpu)
    model = build_model(CONFIG, torch.float32, cpu)
    built = current_memory_mb(cpu) - base
    config = distrifusion.ParallelConfig(
        mode="displaced", warmup_steps=1, shard_weights=setting["shard"], shard_group=setting["group"]
    )
    distrifusion.parallelize(model, config)
    weights = current_memory_mb(cpu) - base
    inputs = _inputs(model, setting)
    reset_peak_memory(cpu)
    times = []
    with torch.no_grad():
        for _ in range(setting["steps"]):
            dist.barrier()
            start = time.perf_counter()
            out = model(**inputs).sample
            times.append(time.perf_counter() - start)
    peak = peak_memory_mb(cpu) - base
    state = model._distrifusion_state
    units = 0 if state.sharding is None else len(state.sharding.units)
    distrifusion.remove(model)
    return dict(
        rank=dist.get_rank(),
        built_mb=built,
        weights_mb=weights,
        peak_mb=peak,
        step_s=times,
        units=units,
        out_sum=float(out.double().sum()),
    )


def _inputs(model, setting: dict) -> dict:
    """One call's inputs: `batch` images, fewer text tokens than the pipeline's 512 (a CPU step in seconds)."""
    from distrifusion.measure.workload import model_inputs

    inputs = model_inputs(model, setting["size"], setting["size"], batch=setting["batch"])
    text = setting["text"]
    inputs.update(encoder_hidden_states=inputs["encoder_hidden_states"][:, :text], txt_ids=inputs["txt_ids"][:text])
    return inputs


def planned(setting: dict) -> dict:
    """The memory plan's count of the same setting (its denoiser only, float32, counted on the meta device
    with the same inputs): the weights part, and the peak (weights kept, exchange, activations with the
    gathered units, inputs)."""
    from distrifusion.measure.memory import denoise_share, load_config, meta_model, sharded_layout, weight_bytes

    model = meta_model(load_config(CONFIG), torch.float32)
    whole = weight_bytes(model)
    parts = setting["ranks"] // (2 if setting["group"] == "cfg_group" else 1)
    layout = sharded_layout(model, parts) if setting["shard"] else None
    size, ranks = setting["size"], setting["ranks"]
    share = denoise_share(model, size, size, None, ranks, "displaced", setting["text"], layout, _inputs(model, setting))
    kept = layout["kept"] if layout else whole
    found = dict(
        weights_mb=kept / 2**20,
        largest_unit_mb=layout["largest"] / 2**20 if layout else 0.0,
        whole_mb=whole / 2**20,
        peak_mb=(kept + share["exchange"] + share["activations"] + share["inputs"]) / 2**20,
        exchange_mb=share["exchange"] / 2**20,
        activations_mb=share["activations"] / 2**20,
    )
    if layout:
        found["gathered_per_call_mb"] = sum(layout["unit_bytes"].values()) * (parts - 1) / parts / 2**20
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="pixels (square)")
    parser.add_argument("--text", type=int, default=64, help="text tokens")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plan-only", action="store_true", help="recount the plan's figures of --json's rows")
    args = parser.parse_args()
    if args.plan_only:
        record = json.loads(Path(args.json).read_text())
        for row in record["results"]:
            row["plan"] = planned(row["setting"])
            print(f"{row['setting']}: measured peak {row['peak_mb']:.0f} MB, planned {row['plan']['peak_mb']:.0f} MB")
        Path(args.json).write_text(json.dumps(record, indent=1))
        return 0
    settings = [
        dict(ranks=2, shard=False, group="world", batch=1),
        dict(ranks=2, shard=True, group="world", batch=1),
        dict(ranks=4, shard=False, group="world", batch=1),
        dict(ranks=4, shard=True, group="world", batch=1),
        dict(ranks=4, shard=False, group="world", batch=2),
        dict(ranks=4, shard=True, group="world", batch=2),
        dict(ranks=4, shard=True, group="cfg_group", batch=2),
    ]
    results = []
    for setting in settings:
        setting.update(size=args.size, text=args.text, steps=args.steps)
        ranks = run_ranks(setting["ranks"], rank_main, setting)
        plan = planned(setting)
        row = dict(
            setting=setting,
            ranks=ranks,
            plan=plan,
            weights_mb=max(r["weights_mb"] for r in ranks),
            peak_mb=max(r["peak_mb"] for r in ranks),
            step_s=statistics.median(max(r["step_s"][i] for r in ranks) for i in range(1, args.steps)),
        )
        results.append(row)
        print(
            f"N={setting['ranks']} batch {setting['batch']} "
            f"{'sharded over ' + setting['group'] if setting['shard'] else 'unsharded'}: weights part "
            f"{row['weights_mb']:.0f} MB (planned {plan['weights_mb']:.0f}), peak above the start "
            f"{row['peak_mb']:.0f} MB, step {row['step_s']:.2f} s (max over ranks, median of steps 2..{args.steps})",
            flush=True,
        )
        if args.json:
            record = dict(command=" ".join(["python", *sys.argv]), cpu=os.cpu_count(), results=results)
            Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
