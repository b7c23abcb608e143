"""A bounded load test of `distrifusion serve` on loopback: N requests, C at a time, to POST /generate
(or, with --video, to POST /v1/videos, each job polled to its end and its MP4 fetched).

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

With --video (a video model: `--start "--model WAN_FOLDER ..."`), each request is a job of --frames
frames at --size and --steps; a client polls it (GET /v1/videos/ID every --poll s) until it completes
or fails, then fetches its MP4 (GET /v1/videos/ID/content) and decodes it (imageio). Its latency is
from the POST to the clip fetched. Meanwhile the server's clip store is sampled every 0.25 s: its
accounted bytes (GET /metrics) and, for a server this test started, the bytes in its folder on disk
(read from here: the same machine). The checks become:

  * every POST answered (no transport error), every accepted job completed (none failed, none lost);
  * every clip fetched is an MP4 that decodes to the frames and size asked, or was removed by the
    store's bound before its client fetched it (410, "removed to keep the store within ...");
  * the store's accounted bytes never exceeded its bound (GET /health's clip_store.max_bytes), and the
    folder on disk never exceeded it by more than the one clip being written; the folder is gone
    once the server has stopped;
  * the server's counters (requests by status, distrifusion_videos_total) moved by what the client saw.

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

The video run (a tiny random-weight Wan pipeline folder, written by tests/wan_helpers.py; a store of
0.25 MiB, so that the bound is reached many times over):

  python benchmarks/load_test.py --video --make-tiny-wan /tmp/tiny_wan \
      --start "--model /tmp/tiny_wan --nproc 2 --queue-size 8 --max-pixels 8192 --clip-store-mb 0.25" \
      --requests 40 --concurrency 6 --size 48x80 --frames 17 --steps 4 --time-limit 600 \
      --json benchmarks/cpu_serve_load_video.json
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
MP4 = b"ftyp"  # bytes 4..8 of an MP4 (ISO base media file)
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
    out = {"requests": {}, "images": 0, "restarts": 0, "videos": 0, "clip_store_bytes": 0, "evictions": 0}
    names = {
        "images_total": "images",
        "group_restarts_total": "restarts",
        "videos_total": "videos",
        "clip_store_bytes": "clip_store_bytes",
        "clip_store_evictions_total": "evictions",
    }
    for line in text.splitlines():
        m = re.fullmatch(r'distrifusion_requests_total\{status="(\d+)"\} (\d+)', line)
        if m:
            out["requests"][m[1]] = int(m[2])
            continue
        name, _, value = line.partition(" ")
        key = names.get(name.removeprefix("distrifusion_"))
        if key:
            out[key] = int(float(value))
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
        found = re.search(r"clips kept in (\S+)", "".join(self.output))
        self.clip_folder = Path(found[1]) if found else None
        """A video server's clip store (it says where at start-up)."""

    def stop(self) -> int | None:
        """As ServeProcess.stop, the ranks seen at start-up included (the server may have died and left them)."""
        return super().stop(self.started_ranks)


# -- the load ---------------------------------------------------------------------------------


def refusal(response: httpx.Response, record: dict, prefix: str = "") -> None:
    """A refusal's Retry-After and message, into `record`."""
    record[prefix + "retry_after"] = response.headers.get("retry-after")
    try:
        record[prefix + "message"] = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        record[prefix + "message"] = response.text[:200]


async def one_video(client: httpx.AsyncClient, args, body: dict, record: dict) -> None:
    """POST /v1/videos, poll the job to its end, fetch its MP4 and decode it: into `record` (status is the
    POST's; job_status the job's end; content_status the fetch's: 200, or 410 if the store's bound removed
    the clip first)."""
    response = await client.post("/v1/videos", json=body)
    record["status"] = response.status_code
    if response.status_code != 200:
        refusal(response, record)
        return
    video_id = response.json()["id"]
    while True:
        await asyncio.sleep(args.poll)
        job = await client.get(f"/v1/videos/{video_id}")
        if job.status_code != 200:  # the job itself went missing: lost
            record["job_status"] = f"http:{job.status_code}"
            return
        job = job.json()
        if job["status"] in ("completed", "failed"):
            break
    record["job_status"] = job["status"]
    record["timings"] = job.get("timings")
    if job["status"] == "failed":
        record["message"] = job["error"]["message"]
        return
    content = await client.get(f"/v1/videos/{video_id}/content")
    record["content_status"] = content.status_code
    if content.status_code != 200:
        refusal(content, record, "content_")
        return
    record["bytes"] = len(content.content)
    record["mp4"] = content.content[4:8] == MP4
    if record["mp4"]:
        record["decoded"] = list(await asyncio.to_thread(decoded_shape, content.content))


def decoded_shape(data: bytes) -> tuple[int, ...]:
    import imageio.v3 as iio

    return iio.imread(data, extension=".mp4", plugin="FFMPEG").shape


async def watch_store(url: str, headers: dict, folder: Path | None, samples: dict, stop: asyncio.Event) -> None:
    """Every 0.25 s: the store's accounted bytes (GET /metrics) and, for our own server, its folder's bytes
    on disk; the largest of each into `samples`."""
    from distrifusion.app.clips import folder_bytes

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        while not stop.is_set():
            metrics = parse_metrics((await client.get("/metrics")).text)
            samples["max_accounted_bytes"] = max(samples.get("max_accounted_bytes", 0), metrics["clip_store_bytes"])
            if folder is not None:
                try:
                    on_disk = folder_bytes(folder)
                except FileNotFoundError:
                    on_disk = 0
                samples["max_folder_bytes"] = max(samples.get("max_folder_bytes", 0), on_disk)
            samples["count"] = samples.get("count", 0) + 1
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except TimeoutError:
                pass


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
                    if args.video:
                        await one_video(client, args, body | {"frames": args.frames}, record)
                    else:
                        response = await client.post("/generate", json=body)
                        record["status"] = response.status_code
                        record["bytes"] = len(response.content)
                        if response.status_code == 200:
                            record["png"] = response.content.startswith(PNG)
                        else:
                            refusal(response, record)
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


async def load_and_watch(args, url: str, headers: dict, folder: Path | None) -> tuple:
    """The load, and with --video the store watched meanwhile: (results, wall, not_sent, samples)."""
    samples: dict = {}
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_store(url, headers, folder, samples, stop)) if args.video else None
    try:
        results, wall, not_sent = await run_load(args, url, headers)
    finally:
        stop.set()
        if watcher is not None:
            await watcher
    return results, wall, not_sent, samples


def video_checks(args, results: list[dict], before: dict, after: dict, health: dict, samples: dict) -> tuple:
    """--video: the checks of the jobs, their clips and the store; and the figures."""
    width, height = (int(v) for v in args.size.split("x"))
    accepted = [r for r in results if r["status"] == 200]
    completed = [r for r in accepted if r.get("job_status") == "completed"]
    fetched = [r for r in completed if r.get("content_status") == 200]
    evicted = [r for r in completed if r.get("content_status") == 410]
    limit = health["clip_store"]["max_bytes"]
    largest = max((r["bytes"] for r in fetched), default=0)
    checks = {
        "every_accepted_job_ended": all(r.get("job_status") in ("completed", "failed") for r in accepted),
        "no_job_failed": len(completed) == len(accepted),
        "every_clip_decodes_to_the_frames_and_size_asked": all(
            r.get("mp4") and r.get("decoded") == [args.frames, height, width, 3] for r in fetched
        ),
        "every_missing_clip_was_evicted_by_the_bound": all(
            "removed to keep the store within" in r.get("content_message", "") for r in evicted
        )
        and len(fetched) + len(evicted) == len(completed),
        "store_bytes_within_bound": samples.get("max_accounted_bytes", 0) <= limit,
        "server_videos_match_completed": after["videos"] - before["videos"] == len(completed),
    }
    if "max_folder_bytes" in samples:
        checks["folder_within_bound_plus_the_clip_being_written"] = samples["max_folder_bytes"] <= limit + largest
    figures = {
        "clips_completed": len(completed),
        "clips_fetched": len(fetched),
        "clips_evicted_before_fetch": len(evicted),
        "clip_bytes_max": largest,
        "store": health["clip_store"]
        | {
            "max_accounted_bytes_seen": samples.get("max_accounted_bytes"),
            "max_folder_bytes_seen": samples.get("max_folder_bytes"),
            "samples": samples.get("count"),
        },
    }
    return checks, figures


def summarise(args, results: list[dict], wall: float, not_sent: int, before: dict, after: dict, health) -> dict:
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    status = health["status"]
    health = health["body"]
    # Every error answer counts on the server's side, the content fetches' 410s too; successes only for POSTs.
    client_counts = dict(counts)
    for r in results:
        if r.get("content_status", 200) != 200:
            key = str(r["content_status"])
            client_counts[key] = client_counts.get(key, 0) + 1
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
        "only_expected_statuses": not unexpected,
        "every_503_has_retry_after": refusals_ok,
        "server_counts_match_client": server_delta == {k: v for k, v in client_counts.items() if k.isdigit()},
        "no_group_restart": after["restarts"] == before["restarts"],
        "healthy_at_end": status == 200,
    }
    figures = {}
    if args.video:
        more, figures = video_checks(args, results, before, after, health, args.samples)
        checks |= more
        wall_ok = [r for r in ok if r.get("job_status") == "completed"]
        figures["throughput_clips_per_s"] = round(len(wall_ok) / wall, 4) if wall else None
        figures["throughput_frames_per_s"] = round(len(wall_ok) * args.frames / wall, 4) if wall else None
    else:
        checks["all_200_are_png"] = all(r.get("png") for r in ok)
        checks["server_images_match_200s"] = after["images"] - before["images"] == len(ok)
    if args.expect_503:
        checks["some_503_seen"] = counts.get("503", 0) > 0
    return {
        "config": {
            "video": args.video,
            "frames": args.frames if args.video else None,
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
        "throughput_images_per_s": round(len(ok) / wall, 4) if wall and not args.video else None,
        "throughput_requests_per_s": round(len(answered) / wall, 4) if wall else None,
        "latency_s_200": pcts(lat_ok),
        "latency_s_all_answers": pcts(lat_all),
        **figures,
        "server_metrics_delta": {
            "requests": server_delta,
            **{key: after[key] - before[key] for key in ("images", "videos", "evictions", "restarts")},
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
    p.add_argument("--video", action="store_true", help="POST /v1/videos jobs (a video model), polled, MP4 fetched")
    p.add_argument("--frames", type=int, default=17, help="--video: frames per clip (default 17)")
    p.add_argument("--poll", type=float, default=0.2, help="--video: seconds between polls of a job (default 0.2)")
    p.add_argument(
        "--make-tiny-wan",
        type=Path,
        metavar="FOLDER",
        help="first write a tiny random-weight Wan pipeline (tests/wan_helpers.py) to FOLDER, for --start",
    )
    args = p.parse_args()
    if args.video and args.classes == CLASSES:
        args.classes = ["a red cat"]
    if args.make_tiny_wan:
        import torch
        from wan_helpers import tiny_pipeline

        tiny_pipeline("t2v", dtype=torch.float32).save_pretrained(args.make_tiny_wan)
        print(f"wrote a tiny Wan pipeline to {args.make_tiny_wan}", flush=True)

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
        frames = f", {args.frames} frames" if args.video else ""
        print(f"{load}{frames} -> {url}{'/v1/videos' if args.video else '/generate'}")
        folder = server.clip_folder if server is not None else None
        results, wall, not_sent, args.samples = asyncio.run(load_and_watch(args, url, headers, folder))
        after = parse_metrics(httpx.get(url + "/metrics", headers=headers, timeout=30).text)
        answer = httpx.get(url + "/health", timeout=30)
        health = {"status": answer.status_code, "body": answer.json()}
    finally:
        if server is not None:
            code = server.stop()
            print(f"server stopped (exit {code})")
    summary = summarise(args, results, wall, not_sent, before, after, health)
    if server is not None:
        summary["server_exit_code"] = code
        summary["checks"]["server_stopped_cleanly"] = code == 0
        if server.clip_folder is not None:
            summary["checks"]["clip_folder_removed_at_exit"] = not server.clip_folder.exists()
        summary["passed"] = all(summary["checks"].values())
    brief = {k: v for k, v in summary.items() if k != "requests_detail"}
    print(json.dumps(brief, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
