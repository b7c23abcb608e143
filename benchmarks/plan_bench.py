"""The plan's predictions against real steps: `distrifusion plan --measure` over two hosts behind a shaped link.

The two hosts and the links are netem_bench.py's (tests/multihost.py's two namespaces, 1 rank each, tbf rate
limits because this kernel has no netem). For each link, `plan --model embedded --measure` predicts every
choice's step from the link it measures and each choice's measured share and counted bytes, then runs each
choice on both hosts and times its steps; this records both, and which choice "auto" took.

Command behind BENCHMARKS.md ("The plan: predicted against measured"; 2-core shared CPU, as root):

    python benchmarks/plan_bench.py --height 256 --width 256 --json benchmarks/cpu_plan_2hosts.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import tempfile
from pathlib import Path

import netem_bench  # its import puts tests/ on the path, for multihost
from multihost import unavailable

LINKS = netem_bench.LINKS


def plan_on_two_hosts(plan_args: list[str], link: list[str] | None, out: Path, timeout: float) -> dict:
    try:
        with netem_bench.shaped_two_hosts(link) as bed:
            bed.start([*plan_args, "--json", str(out), "--timeout", "120"], extra=("--shutdown-timeout", "5"))
            result = bed.wait(timeout=timeout)
            if result["codes"] != [0, 0] or not out.exists():
                return {"error": f"exit codes {result['codes']}", "tail": bed.all_output()[-1500:]}
            return {"table": bed.output(0)[-2500:], **json.loads(out.read_text())}
    except netem_bench.LinkRefused as e:
        return {"error": str(e)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--links", nargs="+", default=netem_bench.DEFAULT_LINKS, choices=list(LINKS))
    p.add_argument("--run-timeout", type=float, default=600.0, help="bound on each plan run (s)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up on SIGTERM too
    why = unavailable()
    if why:
        print(f"two-host test bed unavailable: {why}", file=sys.stderr)
        return 2
    plan_args = ["plan", "--model", "embedded", "--height", str(args.height), "--width", str(args.width)]
    plan_args += ["--repeats", str(args.repeats), "--measure"]
    results = {
        "command": " ".join(["python", "benchmarks/plan_bench.py", *sys.argv[1:]]),
        "plan": plan_args,
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs, {platform.platform()}",
        "per_rank": "2 hosts x 1 rank (--nproc-per-node 1), gloo",
        "links": {},
    }
    work = Path(tempfile.mkdtemp(prefix="distrifusion-plan-"))
    for name in args.links:
        row = plan_on_two_hosts(plan_args, LINKS[name], work / f"{name}.json", args.run_timeout)
        results["links"][name] = {"qdisc": LINKS[name], **row}
        print(f"---- {name}\n{row.get('table') or row.get('error')}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
