"""Where a text encoder lives beside a parallelised denoiser (ParallelConfig.text_encoders): memory and
time on CPU processes, for a T5-XXL-shaped encoder (its published config, data/configs/text_encoders/
t5_xxl.json: d_model 4096, d_ff 10240, 64 heads, 32128 tokens; 2 of its 24 layers, random weights,
float32).

Per placement, N gloo processes; per rank: the resident set the encoder adds (its weights part), the peak
while encoding, and the time of one encoding of `--tokens` tokens (median of `--repeats`, after one):
- replicated: every rank holds it whole and encodes;
- sharded: FSDP2 over the ranks (distrifusion.engine.shard.Sharding, what text_encoders="sharded" uses):
  1/N each, every rank encodes, gathering the layers as they run;
- rank0 + broadcast: rank 0 holds it and encodes, the embeddings are broadcast (the others hold none);
- cpu: on a CPU-only machine the same as replicated (its cost on a GPU machine is this encoding time on
  the host, against the device's).

    python benchmarks/text_encoder_placement_cpu.py --json benchmarks/cpu_text_encoders.json
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

LAYERS = 2
"""Of T5-XXL's 24: the per-layer figures are the same, the whole would not fit this machine twice."""


def rank_main(setting: dict) -> dict:
    """One rank (launched by `run_ranks`: its environment set, one thread)."""
    import torch.distributed as dist

    from distrifusion.engine.comm import init_runtime, shard_group
    from distrifusion.engine.shard import Sharding
    from distrifusion.measure.archs import TEXT_ENCODERS
    from distrifusion.measure.memory import load_config, meta_model
    from distrifusion.measure.timing import current_memory_mb, peak_memory_mb, reset_peak_memory, return_freed_memory

    cpu = torch.device("cpu")
    return_freed_memory()
    runtime = init_runtime()
    rank = runtime.rank
    base = current_memory_mb(cpu)
    placement = setting["placement"]
    config = {**load_config(TEXT_ENCODERS / "t5_xxl.json"), "num_layers": LAYERS}
    holds = placement != "rank0 + broadcast" or rank == 0
    encoder = meta_model(config, torch.float32)  # the shapes; weights below where this rank holds them
    if holds:
        torch.manual_seed(0)
        encoder = encoder.to_empty(device=cpu)
        with torch.no_grad():
            for p in encoder.parameters():
                p.normal_(0, 0.02)
    if placement == "sharded":
        Sharding(encoder, shard_group(runtime, "world"), cpu)
    weights = current_memory_mb(cpu) - base
    vocab, width = encoder.config.vocab_size, encoder.config.d_model
    ids = torch.randint(0, vocab, (1, setting["tokens"]), generator=torch.Generator().manual_seed(1))

    def encode() -> torch.Tensor:
        if placement != "rank0 + broadcast":
            return encoder(ids).last_hidden_state
        out = encoder(ids).last_hidden_state if rank == 0 else torch.empty(1, setting["tokens"], width)
        dist.broadcast(out, 0)
        return out

    reset_peak_memory(cpu)
    times = []
    with torch.no_grad():
        for _ in range(setting["repeats"] + 1):
            dist.barrier()
            start = time.perf_counter()
            out = encode()
            times.append(time.perf_counter() - start)
    peak = peak_memory_mb(cpu) - base
    return dict(rank=rank, weights_mb=weights, peak_mb=peak, encode_s=times[1:], out_sum=float(out.double().sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    for placement in ("replicated", "sharded", "rank0 + broadcast"):
        setting = dict(placement=placement, ranks=args.ranks, tokens=args.tokens, repeats=args.repeats)
        ranks = run_ranks(setting["ranks"], rank_main, setting)
        row = dict(
            setting=setting,
            ranks=ranks,
            encode_s=statistics.median(max(r["encode_s"][i] for r in ranks) for i in range(args.repeats)),
        )
        results.append(row)
        weights = ", ".join(f"{r['weights_mb']:.0f}" for r in ranks)
        peaks = ", ".join(f"{r['peak_mb']:.0f}" for r in ranks)
        print(
            f"{placement}: weights part per rank {weights} MB, peak {peaks} MB, encoding {row['encode_s']:.2f} s "
            f"(slowest rank, median of {args.repeats}); output sum {ranks[0]['out_sum']:.6g}",
            flush=True,
        )
    if args.json:  # with the command, as every figure in BENCHMARKS.md names it
        command = " ".join(["python", *sys.argv])
        Path(args.json).write_text(json.dumps(dict(command=command, cpu=os.cpu_count(), results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
