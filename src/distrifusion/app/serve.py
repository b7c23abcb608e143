"""`distrifusion serve`: one process group for the life of the server, behind an HTTP API.

The front (this module: FastAPI on uvicorn, no torch) validates requests, queues them (bounded:
503 and Retry-After when full) and hands them one at a time to rank 0 of the worker group
(`serve_worker`), which broadcasts each to the other ranks. With `--nproc N` the front starts the
ranks itself and watches them: a rank that dies, or a job that outlives its timeout (a hung
collective), fails the running request with 500/504, and the group is restarted while queued
requests wait (or get 503 if it cannot be). Under torchrun (many machines) rank 0 runs the front
in-process, and restarts are torchrun's (`--max-restarts`).

Requests are not batched together: a batch of several requests' images is not bitwise the images
of the requests alone (GEMM reductions depend on the batch), and the same seed and settings must
give the same PNG whatever else is queued.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener, Pipe
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .cli_checks import EMBEDDED, Geometry, UsageError, check_image_size

CONTROL_ENV = "DISTRIFUSION_SERVE_CONTROL"
"""host:port of the front's listener, set for the ranks it starts (absent under torchrun)."""
KEY_ENV = "DISTRIFUSION_SERVE_KEY"
API_KEY_ENV = "DISTRIFUSION_API_KEY"
MAX_BODY = 64 * 1024
WEB_PAGE = Path(__file__).parent.parent / "data" / "web" / "index.html"
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


# -- settings and validation ----------------------------------------------------------------------


@dataclass
class Settings:
    """What the server serves and its limits (from the command line)."""

    model: str
    world_size: int
    geometry: Geometry | None
    classes: list[str] | None = None
    """The embedded models' class names (their prompts); None for text pipelines."""
    split_cfg: bool = True
    mode: str = "displaced"
    queue_size: int = 16
    max_pixels: int = 1024 * 1024
    max_steps: int = 100
    max_images: int = 4
    request_timeout_s: float = 600.0
    api_key: str | None = None
    max_restarts: int = 3
    default_size: int = 512


class Refused(Exception):
    """A request the server answers with an HTTP error (and a one-line message)."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class ImageRequest(BaseModel):
    """The request body: the OpenAI images fields we honour, plus ours. Unknown fields: 422."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field("", max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels")
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = None
    steps: int = Field(20, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float | None = Field(None, allow_inf_nan=False)
    mode: Literal["sync", "displaced"] | None = None


def job_settings(request, settings: Settings) -> dict:
    """The validated job of a request (what every rank runs), or Refused(4xx)."""
    width = height = settings.default_size
    if request.size is not None:
        match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", request.size)
        if not match:
            raise Refused(422, f"size must be WIDTHxHEIGHT in pixels, e.g. 512x512; got {request.size!r}")
        width, height = int(match[1]), int(match[2])
    if width * height > settings.max_pixels:
        raise Refused(413, f"{width}x{height} is {width * height} pixels; this server allows {settings.max_pixels}")
    if request.n > settings.max_images:
        raise Refused(422, f"n must be at most {settings.max_images}, got {request.n}")
    if request.steps > settings.max_steps:
        raise Refused(422, f"steps must be at most {settings.max_steps}, got {request.steps}")
    if request.model not in (None, settings.model):
        raise Refused(422, f"this server serves model {settings.model!r}, not {request.model!r}")
    if settings.geometry is not None:
        try:
            check_image_size(settings.geometry, height, width, settings.world_size, settings.split_cfg)
        except UsageError as e:
            raise Refused(422, str(e)) from None
    prompt = request.prompt
    if settings.classes is not None:
        prompt = prompt or settings.classes[0]
        if prompt not in settings.classes:
            shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            raise Refused(422, f"unknown class {shown!r}; this model knows: {', '.join(settings.classes)}")
        if request.negative_prompt or request.guidance_scale is not None:
            raise Refused(422, "the embedded models take no negative_prompt or guidance_scale (they have no CFG)")
    elif not prompt:
        raise Refused(422, "prompt must not be empty")
    return dict(
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        n=request.n,
        height=height,
        width=width,
        steps=request.steps,
        seed=request.seed,
        guidance_scale=request.guidance_scale,
        mode=request.mode or settings.mode,
    )


# -- jobs, metrics --------------------------------------------------------------------------------


@dataclass
class Job:
    settings: dict
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.monotonic)
    status: str = "queued"  # queued, running, done, failed
    step: int = 0
    images: list[bytes] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    error: tuple | None = None
    """(HTTP status, message[, headers]) of a job that failed."""
    finished: threading.Event = field(default_factory=threading.Event)

    def finish(self, images: list[bytes] | None = None, error: tuple | None = None) -> None:
        self.status = "failed" if error else "done"
        self.images, self.error = images or [], error
        self.timings["total_s"] = time.monotonic() - self.created
        self.finished.set()

    def public(self) -> dict:
        """What GET /v1/jobs/ID shows."""
        out = {"id": self.id, "status": self.status, "step": self.step, "steps": self.settings["steps"]}
        out.update(timings=self.timings)
        if self.error:
            out["error"] = {"status": self.error[0], "message": self.error[1]}
        if self.images:
            out["images"] = [base64.b64encode(png).decode() for png in self.images]
        return out


class Metrics:
    """Counters and histograms in Prometheus' text format (kept by hand: a handful of series)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.histograms: dict[str, list] = {}  # name -> [bucket counts..., sum, count]
        self.images = 0
        self.restarts = 0
        self.recent: deque[float] = deque()  # completion times of recent images

    def outcome(self, status: int) -> None:
        with self.lock:
            key = str(status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            h = self.histograms.setdefault(name, [0] * len(BUCKETS) + [0.0, 0])
            for i, bound in enumerate(BUCKETS):
                h[i] += seconds <= bound
            h[-2] += seconds
            h[-1] += 1

    def image_done(self, count: int) -> None:
        with self.lock:
            self.images += count
            now = time.monotonic()
            self.recent.extend([now] * count)
            while self.recent and self.recent[0] < now - 60:
                self.recent.popleft()

    def text(self, queue_depth: int, status: str) -> str:
        with self.lock:
            lines = ["# TYPE distrifusion_requests_total counter"]
            lines += [f'distrifusion_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            lines += ["# TYPE distrifusion_queue_depth gauge", f"distrifusion_queue_depth {queue_depth}"]
            lines += ["# TYPE distrifusion_ready gauge", f"distrifusion_ready {int(status == 'ready')}"]
            lines += ["# TYPE distrifusion_images_total counter", f"distrifusion_images_total {self.images}"]
            rate = len(self.recent) / 60.0
            lines += ["# TYPE distrifusion_images_per_second gauge", f"distrifusion_images_per_second {rate:.4f}"]
            lines += ["# TYPE distrifusion_group_restarts_total counter"]
            lines += [f"distrifusion_group_restarts_total {self.restarts}"]
            for name, h in sorted(self.histograms.items()):
                lines.append(f"# TYPE distrifusion_{name}_seconds histogram")
                lines += [f'distrifusion_{name}_seconds_bucket{{le="{b}"}} {c}' for b, c in zip(BUCKETS, h)]
                lines.append(f'distrifusion_{name}_seconds_bucket{{le="+Inf"}} {h[-1]}')
                lines += [f"distrifusion_{name}_seconds_sum {h[-2]:.6f}", f"distrifusion_{name}_seconds_count {h[-1]}"]
            return "\n".join(lines) + "\n"


# -- the worker group -----------------------------------------------------------------------------


class GroupFailure(Exception):
    """The worker group failed (a rank died, or a job outlived its timeout): restart it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WorkerGroup:
    """The ranks, started by the front (`--nproc N`), watched, stopped and restarted; jobs go to
    rank 0 over a local authenticated connection."""

    def __init__(self, argv: list[str], nproc: int, load_timeout_s: float = 900.0) -> None:
        self.argv, self.nproc, self.load_timeout_s = argv, nproc, load_timeout_s
        self.procs: list[subprocess.Popen] = []
        self.connection: Connection | None = None
        self.run_dir = tempfile.mkdtemp(prefix="distrifusion-serve-")

    def start(self) -> dict:
        """Start the ranks and wait until rank 0 says the pipeline is loaded; GroupFailure if not."""
        from .launcher import RUN_DIR, _free_port

        key = secrets.token_bytes(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            WORLD_SIZE=str(self.nproc),
            LOCAL_WORLD_SIZE=str(self.nproc),
            DISTRIFUSION_LAUNCHER_PID=str(os.getpid()),
            **{CONTROL_ENV: "{}:{}".format(*listener.address), KEY_ENV: key.hex(), RUN_DIR: self.run_dir},
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.nproc)))
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "distrifusion", *self.argv],
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                start_new_session=True,  # signals to the front do not reach the ranks: it stops them itself
            )
            for rank in range(self.nproc)
        ]
        accepted: list[Connection] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + self.load_timeout_s
        try:
            self._wait_loading(lambda: thread.join(0.1) or bool(accepted), deadline)
        finally:
            listener.close()
        self.connection = accepted[0]
        self._wait_loading(lambda: self.connection.poll(0.1), deadline)
        return self.connection.recv()[1]

    def _wait_loading(self, ready, deadline: float) -> None:
        """Poll `ready()` (each call may block 0.1 s) while the ranks load; GroupFailure if a rank exits
        or the deadline passes."""
        while not ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise GroupFailure(500, f"the ranks did not load within {self.load_timeout_s:.0f} s")

    def check_alive(self) -> None:
        """GroupFailure if a rank has exited (with that rank's own error, if it left one)."""
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                raise GroupFailure(500, f"rank {rank} exited ({code}){self._rank_error(rank)}")

    def _rank_error(self, rank: int) -> str:
        # Only the rank's own: the others' errors are what its death did to them ("connection closed").
        try:
            return ": " + json.loads(Path(self.run_dir, f"error.{rank}").read_text()).get("message", "")
        except (OSError, ValueError, AttributeError):
            return ""

    def run(self, job: Job, deadline: float) -> None:
        """Run one job to its end (job.finish), or raise GroupFailure."""
        try:
            self.connection.send(job.settings | {"id": job.id})
            while True:
                # The deadline at every turn: a job whose steps are quick sends progress all the time.
                if time.monotonic() > deadline:
                    raise GroupFailure(504, "the request timed out; the worker group is being restarted")
                if not self.connection.poll(0.05):
                    self.check_alive()
                    continue
                kind, _, *rest = self.connection.recv()
                if kind == "progress":
                    job.step = rest[0]
                elif kind == "done":
                    job.timings.update(rest[1])
                    job.finish(images=rest[0])
                    return
                elif kind == "failed":
                    job.finish(error=(rest[0], rest[1]))
                    return
        except (EOFError, OSError) as e:  # rank 0 is gone
            self.check_alive()
            raise GroupFailure(500, f"lost rank 0: {e}") from None

    def stop(self, grace_s: float = 20.0) -> bool:
        """Ask the ranks to finish (they exit 0); kill what is left after `grace_s`. True if all exited 0."""
        try:
            if self.connection is not None:
                self.connection.send(None)
        except OSError:
            pass
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        codes = [p.poll() for p in self.procs]
        self.kill()
        for rank, code in enumerate(codes):
            if code != 0:
                what = "did not stop" if code is None else f"exited {code}"
                print(f"distrifusion: rank {rank} {what}", file=sys.stderr)
        return all(code == 0 for code in codes)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
        for proc in self.procs:
            proc.wait()
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        for path in Path(self.run_dir).glob("*"):
            path.unlink(missing_ok=True)


class InProcessGroup(WorkerGroup):
    """Under torchrun: this process is rank 0; its main thread runs the rank loop (`worker_loop`)."""

    def __init__(self) -> None:
        super().__init__([], 0)
        self.connection, self.rank_end = Pipe()
        self.rank_thread = threading.main_thread()

    def start(self) -> dict:
        return self.connection.recv()[1]

    def check_alive(self) -> None:
        if not self.rank_thread.is_alive():
            raise GroupFailure(500, "rank 0's loop ended")

    def stop(self, grace_s: float = 20.0) -> bool:
        self.connection.send(None)
        return True

    def kill(self) -> None:  # torchrun restarts the whole group
        os._exit(1)


# -- the dispatcher -------------------------------------------------------------------------------


class Dispatcher:
    """The only thread that talks to the worker group: takes queued jobs one at a time."""

    def __init__(self, settings: Settings, group: WorkerGroup) -> None:
        self.settings, self.group = settings, group
        self.metrics = Metrics()
        self.status = "loading"  # loading, ready, restarting, failed, draining
        self.detail = ""
        self.info: dict = {}
        self.queue: deque[Job] = deque()
        self.jobs: OrderedDict[str, Job] = OrderedDict()  # recent jobs, for GET /v1/jobs/ID
        self.lock = threading.Condition()
        self.running: Job | None = None
        self.stopping = False
        self.stopped_cleanly = True
        self.thread = threading.Thread(target=self._run, name="distrifusion-dispatcher", daemon=True)

    def submit(self, settings: dict) -> Job:
        with self.lock:
            if self.stopping:
                raise Refused(503, "the server is shutting down", {"Retry-After": "30"})
            if self.status == "failed":
                raise Refused(503, f"the worker group failed: {self.detail}", {"Retry-After": "60"})
            if len(self.queue) >= self.settings.queue_size:
                raise Refused(503, f"the queue is full ({self.settings.queue_size} waiting)", {"Retry-After": "5"})
            job = Job(settings)
            self.queue.append(job)
            self.jobs[job.id] = job
            while len(self.jobs) > 256:
                oldest = next(iter(self.jobs))
                if self.jobs[oldest].status in ("queued", "running"):
                    break
                del self.jobs[oldest]
            self.lock.notify_all()
            return job

    def _start_group(self) -> bool:
        for _ in range(1 + self.settings.max_restarts):
            if self.stopping:  # shutting down: a group that failed meanwhile is not started again
                self.stopped_cleanly = False
                return False
            try:
                self.info = self.group.start()
                self.status, self.detail = "ready", ""
                return True
            except GroupFailure as e:
                self.group.kill()
                self.detail = str(e)
                self.status = "restarting"
        self.status = "failed"
        with self.lock:
            for job in self.queue:
                job.finish(error=(503, f"the worker group failed: {self.detail}"))
            self.queue.clear()
        return False

    def _restart(self, failure: GroupFailure) -> bool:
        self.metrics.restarts += 1
        self.group.kill()
        self.status, self.detail = "restarting", str(failure)
        return self._start_group()

    def _run(self) -> None:
        if not self._start_group():
            return
        while True:
            with self.lock:
                if not self.queue and not self.stopping:
                    self.lock.wait(0.5)
                if not self.queue and self.stopping:
                    break
                job = self.running = self.queue.popleft() if self.queue else None
            if job is None:  # idle: a rank that died meanwhile is replaced before the next request
                try:
                    self.group.check_alive()
                except GroupFailure as e:
                    if not self._restart(e):
                        return
                continue
            deadline = job.created + self.settings.request_timeout_s
            waited = time.monotonic() - job.created
            job.timings["queued_s"] = waited
            self.metrics.observe("queue_wait", waited)
            if time.monotonic() > deadline:
                job.finish(error=(504, "the request timed out while queued"))
                continue
            job.status = "running"
            try:
                self.group.run(job, deadline)
            except GroupFailure as e:
                if self.stopping:  # the drain's time ran out and its ranks were stopped
                    job.finish(error=(503, "the server shut down before this job finished", {"Retry-After": "30"}))
                    self.group.kill()
                    self.stopped_cleanly = False
                    return
                job.finish(error=(e.status, f"the worker group failed: {e}"))
                if not self._restart(e):
                    return
            finally:
                self.running = None
            if job.status == "done":
                self.metrics.observe("run", job.timings.get("run_s", 0.0))
                self.metrics.image_done(len(job.images))
        # Stopped from this thread: the ranks die with the thread that started them (PR_SET_PDEATHSIG).
        self.stopped_cleanly = self.group.stop()

    def expire(self, job: Job) -> None:
        """A request's time is up: a job still queued leaves the queue (504); a running one is failed
        by the dispatcher at the same deadline."""
        with self.lock:
            if any(queued is job for queued in self.queue):
                self.queue = deque(queued for queued in self.queue if queued is not job)
                job.finish(error=(504, "the request timed out while queued"))

    def drain(self, grace_s: float = 25.0) -> bool:
        """Refuse new jobs, fail the queued ones with 503, let the running one finish, stop the ranks."""
        with self.lock:
            self.stopping = True
            for job in self.queue:
                job.finish(error=(503, "the server is shutting down", {"Retry-After": "30"}))
            self.queue.clear()
            self.lock.notify_all()
        self.thread.join(grace_s)
        if self.thread.is_alive():  # the running job did not finish in time
            self.group.kill()
            self.thread.join(5)  # its request is answered (503) before the front goes
            return False
        return self.stopped_cleanly


# -- the HTTP app ---------------------------------------------------------------------------------


def make_app(dispatcher: Dispatcher):
    """The FastAPI app: the API, /health, /metrics and the web page."""
    settings, metrics = dispatcher.settings, dispatcher.metrics
    app = FastAPI(title="distrifusion", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.outcome(status)
        return JSONResponse({"error": {"message": message, "status": status}}, status, headers=headers)

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        problems = e.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error(400, "the request body is not valid JSON")
        if any(tuple(p.get("loc", ())) == ("body",) for p in problems):
            return error(400, "the request body must be a JSON object (Content-Type: application/json)")
        text = "; ".join(f"{'.'.join(str(x) for x in p['loc'][1:]) or 'body'}: {p['msg']}" for p in problems)
        return error(422, text)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # 404, 405, unreadable bodies: our shape
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    def key_error(headers: dict) -> JSONResponse | None:
        """401 unless the request carries the API key (when one is set)."""
        if settings.api_key is None:
            return None
        given = headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if hmac.compare_digest(given.encode(), settings.api_key.encode()):
            return None
        return error(401, "a valid API key is required (Authorization: Bearer KEY)", {"WWW-Authenticate": "Bearer"})

    too_large = lambda: error(413, f"the request body is larger than {MAX_BODY} bytes")  # noqa: E731
    app.add_middleware(_Gate, key_error=key_error, too_large=too_large)

    async def finished(job: Job) -> Job:
        left = job.created + settings.request_timeout_s - time.monotonic()
        if not await asyncio.to_thread(job.finished.wait, max(0.0, left)):
            dispatcher.expire(job)  # queued: 504 now; running: the dispatcher fails it at this deadline
            await asyncio.to_thread(job.finished.wait, 10.0)
        if not job.finished.is_set():
            raise Refused(504, "the request timed out")
        if job.error:
            raise Refused(*job.error)
        return job

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest):
        job = await finished(dispatcher.submit(job_settings(body, settings)))
        metrics.outcome(200)
        data = [{"b64_json": base64.b64encode(png).decode()} for png in job.images]
        return {"created": int(time.time()), "data": data, "timings": job.timings, "seed": job.settings["seed"]}

    @app.post("/generate")
    async def generate(body: ImageRequest):
        if body.n != 1:
            raise Refused(422, "/generate returns one PNG: n must be 1 (use /v1/images/generations for more)")
        job = await finished(dispatcher.submit(job_settings(body, settings)))
        metrics.outcome(200)
        timings = ", ".join(f"{k}={v:.3f}" for k, v in job.timings.items())
        return Response(job.images[0], media_type="image/png", headers={"X-Distrifusion-Timings": timings})

    @app.post("/v1/jobs", status_code=202)
    async def submit(body: ImageRequest):
        job = dispatcher.submit(job_settings(body, settings))
        metrics.outcome(202)
        return {"id": job.id, "status": job.status}

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str):
        job = dispatcher.jobs.get(job_id)
        if job is None:
            raise Refused(404, f"no job {job_id!r} (finished jobs are kept for a while only)")
        return job.public()

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        body = {
            "status": dispatcher.status,
            "detail": dispatcher.detail,
            "model": settings.model,
            "world_size": settings.world_size,
            "queue": len(dispatcher.queue),
            "running": dispatcher.running is not None,
        }
        return JSONResponse(body, 200 if dispatcher.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(len(dispatcher.queue), dispatcher.status))

    @app.get("/")
    async def page():
        page = WEB_PAGE.read_text().replace("__CLASSES__", json.dumps(settings.classes))
        page = page.replace("__DEFAULT_SIZE__", str(settings.default_size))
        return HTMLResponse(page)

    return app


OPEN_PATHS = ("/", "/health")
"""What answers without the API key: the page (it asks for the key) and the health check."""


class _Gate:
    """ASGI middleware in front of every route: the API key (before the body is read), then the body's
    size, declared (Content-Length) or not (chunked: counted as it arrives; no more is read past the
    limit). Either refusal is answered here, in the app's error shape."""

    def __init__(self, app, key_error, too_large) -> None:
        self.app, self.key_error, self.too_large = app, key_error, too_large

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None if scope["path"] in OPEN_PATHS else self.key_error(headers)
        length = headers.get("content-length")
        if refusal is None and length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            refusal = self.too_large()
        if refusal is None and length is None:
            body, more = b"", True
            while more and len(body) <= MAX_BODY:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                body, more = body + message.get("body", b""), message.get("more_body", False)
            if len(body) > MAX_BODY:
                refusal = self.too_large()
            else:
                receive = _replay(body, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI receive that gives `body` (already read) once, then what the client sends next."""
    given = False

    async def replayed():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


# -- the command ----------------------------------------------------------------------------------


def settings_from_args(args, world_size: int) -> Settings:
    classes = None
    if args.model in EMBEDDED:
        classes = json.loads((EMBEDDED[args.model] / "classes.json").read_text())["classes"]
    geo = args.geometry
    return Settings(
        model=args.model,
        world_size=world_size,
        geometry=geo,
        classes=classes,
        split_cfg=args.split_cfg,
        mode=args.mode,
        queue_size=args.queue_size,
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        max_images=args.max_images,
        request_timeout_s=args.request_timeout,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_restarts=args.max_restarts,
        default_size=args.default_size or (geo.default_px if geo and geo.default_px <= 1024 else 512),
    )


def serve_front(args, group: WorkerGroup, world_size: int) -> int:
    """Run the HTTP front until SIGTERM/SIGINT, then drain: running jobs finish, new ones get 503,
    the ranks exit. Returns the exit code."""
    import uvicorn

    settings = settings_from_args(args, world_size)
    dispatcher = Dispatcher(settings, group)
    config = uvicorn.Config(make_app(dispatcher), host=args.host, port=args.port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # ours below: drain first, then stop serving
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: stop.set())
    dispatcher.thread.start()
    http = threading.Thread(target=server.run, name="distrifusion-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not http.is_alive():
        dispatcher.drain(1)
        print(f"distrifusion: cannot serve on {args.host}:{args.port}", file=sys.stderr)
        return 1
    print(f"distrifusion: serving {args.model} on http://{args.host}:{args.port} ({world_size} ranks)", flush=True)
    while not stop.wait(0.2):
        if not http.is_alive():
            break
    clean = dispatcher.drain()
    server.should_exit = True
    http.join(5)
    print("distrifusion: stopped", file=sys.stderr, flush=True)
    return 0 if clean else 1


def rank_main(args) -> int:
    """A rank of the server (started by the front, or by torchrun)."""
    from .serve_worker import load_pipeline, worker_loop

    embedded = args.model in EMBEDDED
    pipe = load_pipeline(args.model, args.dtype_value, args.config)
    control = os.environ.get(CONTROL_ENV)
    rank = int(os.environ.get("RANK", "0"))
    if control is not None:  # started by our front
        connection = None
        if rank == 0:
            host, port = control.rsplit(":", 1)
            connection = Client((host, int(port)), authkey=bytes.fromhex(os.environ[KEY_ENV]))
        worker_loop(pipe, embedded, connection)
        return 0
    # Under torchrun: rank 0 also runs the front, in threads; its main thread is the rank.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if rank != 0:
        worker_loop(pipe, embedded, None)
        return 0
    group = InProcessGroup()
    front = threading.Thread(target=serve_front, args=(args, group, world), daemon=True)
    front.start()
    worker_loop(pipe, embedded, group.rank_end)
    front.join(30)
    return 0
