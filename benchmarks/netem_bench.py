"""What a slow link costs: `distrifusion generate` over two hosts (1 rank each) behind a shaped link.

The two hosts are the two-namespace test bed of tests/multihost.py (veth pair, torchrun with c10d
rendezvous in each namespace, gloo). For each link setting a root qdisc is put on both veth ends:
`tc qdisc add dev <veth> root netem rate R delay D` was the plan, but this machine's kernel has no
netem (`Specified qdisc kind is unknown`), so the default links are `tbf rate R` (a rate limit in
each direction, no added delay); `--links netem-...` tries netem and records the refusal. Then
`generate --model embedded` runs in sync mode, displaced mode and displaced with `--compress
residual-int4`. One process without torchrun (same size, steps and seed) is the reference: its time,
and its PNG, against which each run's pixels are compared (sync mode should match it exactly).

Every run is bounded (--run-timeout); each bed's namespaces, their qdiscs and every process in them
are removed by PID in a `finally` (TwoHosts.close), the reference process is killed by its PID if it
overruns. Recorded per run: the "denoising X s" and the total ("in T s") that rank 0 prints, the
wait for the other ranks it reports, and the wall time of the whole torchrun launch.

Command behind BENCHMARKS.md ("Slow links (two hosts, netem)"; 2-core shared CPU, as root):

    python benchmarks/netem_bench.py --height 384 --width 384 --steps 10 \\
        --json benchmarks/cpu_netem_2hosts.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from multihost import TwoHosts, unavailable  # noqa: E402

# name -> the root qdisc put on both veth ends (None: the bare veth). netem (rate + delay) is what we
# wanted; this machine's kernel has no sch_netem ("Specified qdisc kind is unknown"), so the default
# links are tbf rate limits without added delay (tbf: `latency` bounds its queue, it adds no delay).
LINKS = {
    "none": None,
    "tbf-1gbit": ["tbf", "rate", "1gbit", "burst", "1mb", "latency", "100ms"],
    "tbf-100mbit": ["tbf", "rate", "100mbit", "burst", "128kb", "latency", "100ms"],
    "tbf-10mbit": ["tbf", "rate", "10mbit", "burst", "32kb", "latency", "200ms"],
    "netem-1gbit-0.1ms": ["netem", "rate", "1gbit", "delay", "0.1ms"],
    "netem-100mbit-1ms": ["netem", "rate", "100mbit", "delay", "1ms"],
}
DEFAULT_LINKS = ["none", "tbf-1gbit", "tbf-100mbit", "tbf-10mbit"]
MODES = {
    "sync": ["--mode", "sync"],
    "displaced": ["--mode", "displaced"],
    "displaced+residual-int4": ["--mode", "displaced", "--compress", "residual-int4"],
}
LINE = re.compile(
    r"wrote \S+ \(.*?\) in (?P<total>[\d.]+) s: start-up (?P<startup>[\d.]+) s.*?denoising (?P<den>[\d.]+) s"
)
WAIT = re.compile(r"waiting for the other ranks (?P<wait>[\d.]+) s/step")


def parse(text: str) -> dict:
    m = LINE.search(text)
    if not m:
        return {}
    out = {"total_s": float(m["total"]), "startup_s": float(m["startup"]), "denoising_s": float(m["den"])}
    w = WAIT.search(text)
    if w:
        out["wait_s_per_step_max_rank"] = float(w["wait"])
    return out


def pixel_diff(a: Path, b: Path) -> int | None:
    try:
        import numpy as np
        from PIL import Image

        x = np.asarray(Image.open(a), dtype=np.int16)
        y = np.asarray(Image.open(b), dtype=np.int16)
        return int(np.abs(x - y).max())
    except Exception:
        return None


def tc(ns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=20)


def reference(gen: list[str], out: Path, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distrifusion", *gen, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's group, by its PID
        text, _ = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"code": proc.returncode, "wall_s": round(time.monotonic() - t0, 2), **parse(text), "tail": text[-400:]}


class LinkRefused(RuntimeError):
    """`tc` would not put the link's qdisc on the veth (e.g. netem on a kernel without it)."""


@contextmanager
def shaped_two_hosts(link: list[str] | tuple | None):
    """The two-host bed with 1 rank per host and `link`'s root qdisc on both veth ends (None: the bare
    veth). Raises LinkRefused when tc refuses it. On exit the qdiscs go, then every process in our
    namespaces (SIGKILL by PID) and the namespaces with the veth pair."""
    bed = TwoHosts(nproc_per_node=1)
    shaped: list[str] = []
    try:
        bed._make()
        if link is not None:
            for ns, veth in zip(bed.ns, bed.veth):
                r = tc(ns, "qdisc", "add", "dev", veth, "root", *link)
                if r.returncode:
                    raise LinkRefused(f"tc qdisc add {' '.join(link)}: {r.stderr.strip()}")
                shaped.append(ns)
        yield bed
    finally:
        for ns, veth in zip(bed.ns, bed.veth):
            if ns in shaped:
                tc(ns, "qdisc", "del", "dev", veth, "root")
        bed.close()


def two_hosts(gen: list[str], link: tuple | None, out: Path, ref_png: Path, timeout: float) -> dict:
    try:
        with shaped_two_hosts(link) as bed:
            shown = tc(bed.ns[0], "qdisc", "show", "dev", bed.veth[0]).stdout.strip()
            bed.start([*gen, "--out", str(out), "--timeout", "60"], extra=("--shutdown-timeout", "5"))
            res = bed.wait(timeout=timeout)
            wall = (max(e for e in res["ended"] if e is not None) if all(res["ended"]) else time.monotonic()) - (
                bed.started_at or 0
            )
            text = bed.output(0)
            row = {
                "codes": res["codes"],
                "wall_s": round(wall, 2),
                **parse(text),
                "max_pixel_diff_vs_1_process": pixel_diff(out, ref_png) if out.exists() else None,
                "qdisc": shown,
                "left": res["left"],
            }
            if not row.get("denoising_s"):
                row["tail"] = bed.all_output()[-1500:]
            return row
    except LinkRefused as e:
        return {"codes": None, "wall_s": 0.0, "error": str(e)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--links", nargs="+", default=DEFAULT_LINKS, choices=list(LINKS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--run-timeout", type=float, default=150.0, help="bound on each run (s)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up on SIGTERM too
    why = unavailable()
    if why:
        print(f"two-host test bed unavailable: {why}", file=sys.stderr)
        return 2
    gen = ["generate", "--model", "embedded", "--prompt", "gravel", "--seed", "0"]
    gen += ["--height", str(args.height), "--width", str(args.width), "--steps", str(args.steps)]
    work = Path(tempfile.mkdtemp(prefix="distrifusion-netem-"))
    ref_png = work / "ref.png"
    results = {
        "command": " ".join(["python", "benchmarks/netem_bench.py", *sys.argv[1:]]),
        "generate": gen,
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores shared with other jobs, {platform.platform()}, "
        f"python {platform.python_version()}",
        "per_rank": "2 hosts x 1 rank (--nproc-per-node 1), OMP_NUM_THREADS=1, gloo",
        "links": {k: LINKS[k] for k in args.links},
        "reference": [],
        "runs": [],
    }
    try:
        import torch

        results["torch"] = torch.__version__
    except ImportError:
        pass

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")

    for rep in range(args.repeats):
        row = reference(gen, ref_png, args.run_timeout)
        results["reference"].append({"repeat": rep, **row})
        print(f"[{rep}] 1 process: {row.get('denoising_s')} s denoising, {row.get('total_s')} s total", flush=True)
        save()
        for link in args.links:
            for mode in args.modes:
                out = work / f"{link}_{mode}_{rep}.png"
                row = two_hosts([*gen, *MODES[mode]], LINKS[link], out, ref_png, args.run_timeout)
                if row.get("error"):
                    print(f"[{rep}] {link}: {row['error']}", flush=True)
                    results["runs"].append({"repeat": rep, "link": link, "mode": mode, **row})
                    save()
                    continue
                results["runs"].append({"repeat": rep, "link": link, "mode": mode, **row})
                print(
                    f"[{rep}] {link:12s} {mode:24s} denoising {row.get('denoising_s')} s, "
                    f"total {row.get('total_s')} s, "
                    f"wait {row.get('wait_s_per_step_max_rank')} s/step, wall {row['wall_s']} s, codes {row['codes']}, "
                    f"pixel diff {row.get('max_pixel_diff_vs_1_process')}",
                    flush=True,
                )
                save()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
