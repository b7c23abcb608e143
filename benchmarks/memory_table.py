"""The README's "Memory" table: `distrifusion plan --memory` for Flux.2-dev, Qwen-Image, Wan2.1-14B,
Wan2.2-A14B and SDXL at N = 1/2/4/8, in bfloat16, at each pipeline's default size, counted on the meta
device (no weights; any machine). The Flux.2, Qwen-Image and Wan configs are copies of the shared ones
(benchmarks/configs/; Wan2.2-A14B is Wan2.1-14B's shape with `_experts: 2`, its two experts loaded).

    python benchmarks/memory_table.py --json benchmarks/memory_table.json --markdown benchmarks/memory_table.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from distrifusion.measure.memory import GB, format_memory_plan, memory_plan, pipeline_parts, smallest_fit

HERE = Path(__file__).parent / "configs"
MODELS = [
    ("Flux.2-dev", str(HERE / "flux2_dev_transformer.json"), (1024, 1024), None),
    ("Qwen-Image", str(HERE / "qwen_image_transformer.json"), (1328, 1328), None),
    ("Wan2.1-T2V-14B", str(HERE / "wan21_t2v_14b_transformer.json"), (720, 1280), 81),
    ("Wan2.2-T2V-A14B", str(HERE / "wan22_t2v_a14b_transformer.json"), (720, 1280), 81),
    ("SDXL", "sdxl", (1024, 1024), None),
]
RANKS = [1, 2, 4, 8]


def _cell(found: dict, ranks: int, sharded: bool, placement: str) -> str:
    row = next(
        (
            r
            for r in found["rows"]
            if r["ranks"] == ranks and r["sharded"] == sharded and r["text_encoders"] == placement
        ),
        None,
    )
    return "" if row is None else f"{row['peak'] / GB:.0f}"


def _fits(found: dict, ranks: int) -> str:
    """The smallest card that one setting of N ranks fits, and that setting."""
    for card in (24, 48, 80, 141):
        best = smallest_fit({"rows": [r for r in found["rows"] if r["ranks"] == ranks]}, card)
        if best:
            weights = "sharded" if best["sharded"] else "whole"
            return f"{card} GB ({weights}, text {best['text_encoders']})"
    return "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    plans, lines = [], []
    lines.append(
        "| model | N | whole, text replicated | sharded, text sharded | sharded, text on CPU | exchange | "
        "gathers / exchange per step (GB) | smallest card |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, arch, (height, width), frames in MODELS:
        parts = pipeline_parts(arch, torch.bfloat16)
        found = memory_plan(parts, height, width, frames, RANKS)
        found["label"] = name
        plans.append(found)
        print(format_memory_plan(found), flush=True)
        for n in RANKS:
            sharded = [r for r in found["rows"] if r["ranks"] == n and r["sharded"]]
            step = (
                f"{sharded[0]['gather_step_bytes'] / GB:.1f} / {sharded[0]['exchange_step_bytes'] / GB:.1f}"
                if sharded
                else "-"
            )
            exchange = next(r for r in found["rows"] if r["ranks"] == n)["exchange"]
            lines.append(
                f"| {name} {height}x{width}{f', {frames} frames' if frames else ''} | {n} | "
                f"{_cell(found, n, False, 'replicated')} | {_cell(found, n, True, 'sharded') or '-'} | "
                f"{_cell(found, n, True, 'cpu') or _cell(found, n, False, 'cpu')} | {exchange / GB:.1f} | {step} | "
                f"{_fits(found, n)} |"
            )
        if args.json:
            Path(args.json).write_text(
                json.dumps(dict(command=" ".join(["python", *sys.argv]), plans=plans), indent=1, default=str)
            )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
