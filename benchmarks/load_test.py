"""A bounded load test of `distrifusion serve` on loopback: N requests, C at a time, to POST /generate.

Each request asks for one image of a class of the embedded model (the prompt cycles through
--classes), at --size and --steps, with its own seed (--seed + request index). The test stops
*starting* requests when --time-limit seconds have passed (those not sent are counted as
"not_sent", never as lost); requests already sent are waited for (up to --request-timeout each).

It records each request's HTTP status and latency (send to last byte) and prints, and writes as
JSON (--json): the count of each status, throughput (images/s = 200s / wall time; requests/s),
p50/p90/p99 latency (of the 200s, and of all answers), the wall time, and the checks:

  * every sent request got an HTTP answer (no transport error, no timeout): nothing lost;
  * every 200 is a PNG; every other status is an expected refusal (503 with Retry-After);
  * the server's own counters (GET /metrics, before and after: distrifusion_requests_total by
    status, distrifusion_images_total) moved by exactly what the client saw;
  * no worker-group restart (distrifusion_group_restarts_total unchanged: no rank error), and
    GET /health is 200 ("ready") at the end.

The exit status is 0 only if all checks pass.

Either target a running server (--url http://127.0.0.1:PORT) or let the test start one
(--start "SERVE FLAGS": `python -m distrifusion serve --port RANDOM SERVE FLAGS`, waited for on
/health, stopped at the end with SIGTERM — its drain — then SIGKILL of anything left: tests/serve_process.py,
the server tests' harness).

The commands behind BENCHMARKS.md ("Serving (distrifusion serve)"; 2-core shared CPU):

  python benchmarks/load_test.py --start "--nproc 2 --queue-size 16" \\
      --requests 200 --concurrency 8 --size 128x128 --steps 4 --time-limit 900 \\
      --json benchmarks/cpu_serve_load_128.json
  python benchmarks/load_test.py --start "--nproc 2 --queue-size 16" \\
      --requests 24 --concurrency 8 --size 512x512 --steps 4 --time-limit 540 \\
      --json benchmarks/cpu_serve_load_512.json
  python benchmarks/load_test.py --start "--nproc 2 --queue-size 4" \\
      --requests 60 --concurrency 32 --size 128x128 --steps 4 --time-limit 600 --expect-503 \\
      --json benchmarks/cpu_serve_load_overload.json

(4 steps, not 20: on the loaded 2-core machine a 20-step 128x128 image took ~14 s, so 200 of them
would have taken ~47 min. Against a running server: --url http://127.0.0.1:PORT instead of --start.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import socket
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serve_process import ServeProcess, serve_command  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
CLASSES = ["brick", "grass", "gravel", "hubble_deep_field", "ihc", "retina"]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None if no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def parse_metrics(text: str) -> dict:
    """The counters we cross-check, from Prometheus' text format."""
    out = {"requests": {}, "images": 0, "restarts": 0}
    for line in text.splitlines():
        m = re.fullmatch(r'distrifusion_requests_total\{status="(\d+)"\} (\d+)', line)
        if m:
            out["requests"][m[1]] = int(m[2])
        elif line.startswith("distrifusion_images_total "):
            out["images"] = int(float(line.split()[1]))
        elif line.startswith("distrifusion_group_restarts_total "):
            out["restarts"] = int(float(line.split()[1]))
    return out


# -- a server of our own ----------------------------------------------------------------------


def free_port() -> int:
    """A random free port on loopback (random, not the OS's next one: others use this machine)."""
    for _ in range(200):
        port = random.randint(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


class OwnServer(ServeProcess):
    """`distrifusion serve` started by this test, stopped by PID at the end (tests/serve_process.py)."""

    def __init__(self, flags: str, startup_timeout: float, log: Path | None) -> None:
        port, flags = free_port(), shlex.split(flags)
        print(f"starting: {shlex.join(serve_command(port, flags))}", flush=True)
        self.started_ranks: list[int] = []
        super().__init__(port, flags, ready_timeout=startup_timeout, stop_grace=60, log=log)
        self.started_ranks = self.ranks()

    def stop(self) -> int | None:
        """As ServeProcess.stop, the ranks seen at start-up included (the server may have died and left them)."""
        return super().stop(self.started_ranks)


# -- the load ---------------------------------------------------------------------------------


async def run_load(args, url: str, headers: dict) -> tuple[list[dict], float, int]:
    results: list[dict] = []
    next_index = 0
    t0 = time.monotonic()
    deadline = t0 + args.time_limit
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.request_timeout, connect=30)

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < args.requests and time.monotonic() < deadline:
                i = next_index
                next_index += 1
                body = {
                    "prompt": args.classes[i % len(args.classes)],
                    "size": args.size,
                    "steps": args.steps,
                    "seed": args.seed + i,
                }
                sent = time.monotonic()
                record = {"i": i, "prompt": body["prompt"], "seed": body["seed"], "sent_s": round(sent - t0, 4)}
                try:
                    response = await client.post("/generate", json=body)
                    record["status"] = response.status_code
                    record["bytes"] = len(response.content)
                    if response.status_code == 200:
                        record["png"] = response.content.startswith(PNG)
                    else:
                        record["retry_after"] = response.headers.get("retry-after")
                        try:
                            record["message"] = response.json()["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            record["message"] = response.text[:200]
                except httpx.HTTPError as e:  # transport error or timeout: no answer
                    record["status"] = f"error:{type(e).__name__}"
                    record["message"] = str(e)[:200]
                record["latency_s"] = round(time.monotonic() - sent, 4)
                results.append(record)
                done = len(results)
                if args.progress and (done % args.progress == 0 or done == args.requests):
                    ok = sum(r["status"] == 200 for r in results)
                    print(f"  {done}/{args.requests} answered ({ok} x 200), {time.monotonic() - t0:.0f} s", flush=True)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.monotonic() - t0
    return sorted(results, key=lambda r: r["i"]), wall, args.requests - next_index


def summarise(args, results: list[dict], wall: float, not_sent: int, before: dict, after: dict, health) -> dict:
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    ok = [r for r in results if r["status"] == 200]
    answered = [r for r in results if isinstance(r["status"], int)]
    errors = [r for r in results if not isinstance(r["status"], int)]
    lat_ok = [r["latency_s"] for r in ok]
    lat_all = [r["latency_s"] for r in answered]

    def pcts(xs):
        return {f"p{q}": None if percentile(xs, q) is None else round(percentile(xs, q), 3) for q in (50, 90, 99)} | {
            "min": round(min(xs), 3) if xs else None,
            "max": round(max(xs), 3) if xs else None,
            "mean": round(sum(xs) / len(xs), 3) if xs else None,
        }

    server_delta = {
        k: after["requests"].get(k, 0) - before["requests"].get(k, 0)
        for k in sorted(set(after["requests"]) | set(before["requests"]))
    }
    server_delta = {k: v for k, v in server_delta.items() if v}
    client_http = {k: v for k, v in counts.items() if k.isdigit()}
    allowed = {"200", "503"} if args.expect_503 else {"200"}
    unexpected = {k: v for k, v in client_http.items() if k not in allowed}
    refusals_ok = all(r.get("retry_after") for r in answered if r["status"] == 503)
    checks = {
        "every_sent_request_answered": not errors,
        "all_200_are_png": all(r.get("png") for r in ok),
        "only_expected_statuses": not unexpected,
        "every_503_has_retry_after": refusals_ok,
        "server_counts_match_client": server_delta == client_http,
        "server_images_match_200s": after["images"] - before["images"] == len(ok),
        "no_group_restart": after["restarts"] == before["restarts"],
        "healthy_at_end": health == 200,
    }
    if args.expect_503:
        checks["some_503_seen"] = counts.get("503", 0) > 0
    return {
        "config": {
            "size": args.size,
            "steps": args.steps,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "time_limit_s": args.time_limit,
            "classes": args.classes,
            "seed": args.seed,
            "server": args.server_command,
            "server_startup_s": args.server_startup_s,
        },
        "sent": len(results),
        "not_sent_time_limit": not_sent,
        "statuses": dict(sorted(counts.items())),
        "wall_s": round(wall, 3),
        "throughput_images_per_s": round(len(ok) / wall, 4) if wall else None,
        "throughput_requests_per_s": round(len(answered) / wall, 4) if wall else None,
        "latency_s_200": pcts(lat_ok),
        "latency_s_all_answers": pcts(lat_all),
        "server_metrics_delta": {
            "requests": server_delta,
            "images": after["images"] - before["images"],
            "restarts": after["restarts"] - before["restarts"],
        },
        "checks": checks,
        "passed": all(checks.values()),
        "requests_detail": results,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--start", metavar="FLAGS", help='start `distrifusion serve FLAGS` (e.g. "--nproc 2 --queue-size 16")'
    )
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--size", default="128x128", help="WIDTHxHEIGHT")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="request i gets seed SEED + i")
    p.add_argument("--classes", nargs="+", default=CLASSES, help="prompts, cycled (the embedded model's classes)")
    p.add_argument("--time-limit", type=float, default=600, help="seconds after which no request is started")
    p.add_argument("--request-timeout", type=float, default=900, help="seconds one request may take (client side)")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds for a --start server to be ready")
    p.add_argument("--expect-503", action="store_true", help="an overload run: 503 (queue full) is an expected answer")
    p.add_argument("--api-key", default=os.environ.get("DISTRIFUSION_API_KEY"))
    p.add_argument("--json", type=Path, help="write the summary (and every request) here")
    p.add_argument("--server-log", type=Path, help="with --start: append the server's output here")
    p.add_argument("--progress", type=int, default=10, help="print a line every this many answers (0: none)")
    args = p.parse_args()

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server = None
    args.server_command, args.server_startup_s = None, None
    if args.start is not None:
        server = OwnServer(args.start, args.startup_timeout, args.server_log)
        url = server.url
        args.server_command = "distrifusion serve --port PORT " + args.start
        args.server_startup_s = round(server.startup_s, 1)
        ranks = server.started_ranks
        print(f"server ready in {server.startup_s:.1f} s on {url} (pid {server.proc.pid}, ranks {ranks})")
    else:
        url = args.url.rstrip("/")
    try:
        before = parse_metrics(httpx.get(url + "/metrics", headers=headers, timeout=30).text)
        load = f"{args.requests} requests, {args.concurrency} concurrent, {args.size}, {args.steps} steps"
        print(f"{load} -> {url}/generate")
        results, wall, not_sent = asyncio.run(run_load(args, url, headers))
        after = parse_metrics(httpx.get(url + "/metrics", headers=headers, timeout=30).text)
        health = httpx.get(url + "/health", timeout=30).status_code
    finally:
        if server is not None:
            code = server.stop()
            print(f"server stopped (exit {code})")
    summary = summarise(args, results, wall, not_sent, before, after, health)
    if server is not None:
        summary["server_exit_code"] = code
        summary["checks"]["server_stopped_cleanly"] = code == 0
        summary["passed"] = all(summary["checks"].values())
    brief = {k: v for k, v in summary.items() if k != "requests_detail"}
    print(json.dumps(brief, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
