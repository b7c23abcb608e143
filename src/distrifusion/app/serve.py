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

A video model (a pipeline whose call takes `num_frames` and returns `.frames`) is served as OpenAI's
videos API: POST /v1/videos answers a job at once, GET /v1/videos/ID its status and progress, GET
/v1/videos/ID/content the MP4 (or `?variant=thumbnail`), DELETE /v1/videos/ID frees it. Rank 0
writes each clip into a folder the front owns (`clips.ClipStore`: bounded in bytes and age, removed
at exit). The image endpoints refuse on a video server, and the video endpoints on an image server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.parser
import email.policy
import hmac
import io
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener, Pipe
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .cli_checks import EMBEDDED, Geometry, UsageError, check_image_size, check_video
from .clips import VARIANTS, ClipStore, ClipTooLarge

CONTROL_ENV = "DISTRIFUSION_SERVE_CONTROL"
"""host:port of the front's listener, set for the ranks it starts (absent under torchrun)."""
KEY_ENV = "DISTRIFUSION_SERVE_KEY"
API_KEY_ENV = "DISTRIFUSION_API_KEY"
MAX_BODY = 64 * 1024
MAX_VIDEO_BODY = 16 * 1024 * 1024
"""POST /v1/videos may carry a first frame (input_reference): base64 in JSON, or a multipart file."""
MAX_REFERENCE_PIXELS = 4096 * 4096
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
    """The default height in px (and width, unless default_width is set)."""
    default_width: int = 0
    fps: float = 16.0
    """Videos: the frames per second of a clip when a request gives none."""
    max_frames: int = 129
    clip_store_bytes: int = 2 << 30
    clip_ttl_s: float = 3600.0
    video_split: str = "rows"

    @property
    def video(self) -> bool:
        """Whether the model makes videos (its geometry has a time factor)."""
        return self.geometry is not None and self.geometry.time_factor > 0


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
    if settings.video:
        raise Refused(400, f"this server serves the video model {settings.model!r}: POST /v1/videos makes its clips")
    width, height = _size(request.size, settings)
    if request.n > settings.max_images:
        raise Refused(422, f"n must be at most {settings.max_images}, got {request.n}")
    if settings.geometry is not None:
        try:
            check_image_size(settings.geometry, height, width, settings.world_size, settings.split_cfg)
        except UsageError as e:
            raise Refused(422, str(e)) from None
    return _job(request, settings, height, width, n=request.n)


def _job(request, settings: Settings, height: int, width: int, **more) -> dict:
    """What every rank runs, of an image request or a video request."""
    prompt = _prompt(request, settings)
    return dict(
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        height=height,
        width=width,
        steps=request.steps,
        seed=request.seed,
        guidance_scale=request.guidance_scale,
        mode=request.mode or settings.mode,
        **more,
    )


def _size(size: str | None, settings: Settings) -> tuple[int, int]:
    """(width, height) of a request's `size` "WxH" (the server's default if None), within --max-pixels."""
    height = settings.default_size
    width = settings.default_width or height
    if size is not None:
        match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size)
        if not match:
            raise Refused(422, f"size must be WIDTHxHEIGHT in pixels, e.g. 512x512; got {size!r}")
        width, height = int(match[1]), int(match[2])
    if width * height > settings.max_pixels:
        raise Refused(413, f"{width}x{height} is {width * height} pixels; this server allows {settings.max_pixels}")
    return width, height


def _prompt(request, settings: Settings) -> str:
    """The request's prompt (an embedded model's class), after the checks every request gets: steps, model."""
    if request.steps > settings.max_steps:
        raise Refused(422, f"steps must be at most {settings.max_steps}, got {request.steps}")
    if request.model not in (None, settings.model):
        raise Refused(422, f"this server serves model {settings.model!r}, not {request.model!r}")
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
    return prompt


class VideoRequest(BaseModel):
    """POST /v1/videos: OpenAI's videos fields (`prompt`, `size` "WxH", `seconds`, `input_reference`,
    `model`), plus ours (`frames` instead of `seconds`, `fps`, `steps`, `seed`, ...). Unknown fields: 422."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field("", max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels")
    seconds: float | None = Field(None, gt=0, allow_inf_nan=False, description="OpenAI sends a string: '4'")
    frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, le=240, allow_inf_nan=False)
    model: str | None = None
    steps: int = Field(20, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float | None = Field(None, allow_inf_nan=False)
    mode: Literal["sync", "displaced"] | None = None
    input_reference: str | dict | None = Field(
        None, description="the first frame: base64, a data URL, or OpenAI's {'image_url': DATA_URL}"
    )


def frames_for(seconds: float, fps: float, time_factor: int) -> int:
    """The frames of a clip of at least `seconds` at `fps`: the next count the model makes (a Wan VAE:
    1 + 4k, so 5 s at 16 fps are 81 frames, Wan's own default; a model of any count: ceil(seconds x fps))."""
    frames = max(1, math.ceil(seconds * fps - 1e-9))
    if time_factor > 1:
        frames = 1 + time_factor * math.ceil((frames - 1) / time_factor)
    return frames


def video_job_settings(request: VideoRequest, settings: Settings, info: dict, upload: bytes | None = None) -> dict:
    """The validated job of POST /v1/videos, or Refused(4xx). `info`: what rank 0 said of the pipeline
    (empty while it loads: then the ranks check the first frame themselves); `upload`: a multipart file."""
    _video_server(settings)
    geo = settings.geometry
    width, height = _size(request.size, settings)
    fps = request.fps or settings.fps
    if request.seconds is not None and request.frames is not None:
        raise Refused(422, "give seconds or frames, not both")
    if request.frames is not None:
        frames, asked = request.frames, f"frames {request.frames}"
    elif request.seconds is not None:
        frames = frames_for(request.seconds, fps, geo.time_factor)
        asked = f"seconds {request.seconds:g} at {fps:g} fps are {frames} frames"
    else:
        frames, asked = default_frames(settings), ""
    if frames > settings.max_frames:
        raise Refused(422, f"{asked}: this server makes at most {settings.max_frames} frames (--max-frames)")
    try:
        check_video(geo, frames, height, width, settings.world_size, settings.video_split)
    except UsageError as e:
        message = str(e).replace("--frames ", "frames ")
        raise Refused(422, f"{message} ({asked})" if request.seconds is not None else message) from None
    job = _job(request, settings, height, width, kind="video", n=1, frames=frames, fps=fps)
    return job | {"image": _first_frame(request.input_reference, upload, info)}


def _video_server(settings: Settings) -> None:
    if not settings.video:
        raise Refused(
            400,
            f"this server serves the image model {settings.model!r}; /v1/videos needs a video model "
            "(POST /v1/images/generations makes its images)",
        )


def default_frames(settings: Settings) -> int:
    """The model's default frame count (Wan: 81), or the most it makes within --max-frames."""
    factor = max(settings.geometry.time_factor, 1)
    return min(settings.geometry.default_frames, 1 + (settings.max_frames - 1) // factor * factor)


def _first_frame(given: str | dict | None, upload: bytes | None, info: dict) -> bytes | None:
    """The image bytes of `input_reference` (base64, a base64 data URL, {"image_url": DATA_URL}, or a
    multipart file), checked to be an image of at most MAX_REFERENCE_PIXELS; the server fetches nothing."""
    data = upload
    if given is not None:
        if upload is not None:
            raise Refused(422, "input_reference given twice (a field and a file)")
        if isinstance(given, dict):
            if "file_id" in given:
                raise Refused(
                    422,
                    "input_reference.file_id: this server keeps no files; send the image itself "
                    "(image_url as a base64 data URL, or a multipart file)",
                )
            if set(given) != {"image_url"} or not isinstance(given["image_url"], str):
                raise Refused(422, "input_reference must be base64, a data URL, or {'image_url': DATA_URL}")
            given = given["image_url"]
        if given.startswith(("http://", "https://")):
            raise Refused(422, "input_reference: this server fetches no URL; send the image as a base64 data URL")
        if given.startswith("data:"):
            header, _, given = given.partition(",")
            if not header.endswith(";base64"):
                raise Refused(422, "input_reference: a data URL must be base64 (data:image/png;base64,...)")
        try:
            data = base64.b64decode(given, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(422, "input_reference is not valid base64") from None
    takes = info.get("image_input")
    if data is None:
        if takes == "required":
            raise Refused(422, "this image-to-video pipeline needs input_reference (the first frame)")
        return None
    if takes == "none":
        raise Refused(422, "this model takes no input_reference (a text-to-video pipeline)")
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_REFERENCE_PIXELS:
            limit = MAX_REFERENCE_PIXELS
            raise Refused(413, f"input_reference is {width}x{height}; this server reads at most {limit} pixels")
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise Refused(422, "input_reference is not an image the server can read (PNG, JPEG or WebP)") from None
    return data


def _multipart(body: bytes, content_type: str) -> tuple[dict, bytes | None]:
    """A multipart/form-data body: its text fields, and the `input_reference` file (OpenAI's SDK sends
    the first frame so). Parsed by the standard library's MIME parser (the body is bounded already)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    if not message.is_multipart() or message.defects:
        raise Refused(400, "the request body is not valid multipart/form-data")
    fields: dict = {}
    upload = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise Refused(400, "a multipart part without a name")
        if name in fields or (name == "input_reference" and upload is not None):
            raise Refused(422, f"{name}: given twice")
        value = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            if name != "input_reference":
                raise Refused(422, f"{name}: only input_reference may be a file")
            upload = value
            continue
        try:
            fields[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Refused(400, f"{name}: a multipart text field must be UTF-8") from None
    return fields, upload


def _form(body: bytes) -> dict:
    """An application/x-www-form-urlencoded body's fields (each once)."""
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "the request body is not a valid form (application/x-www-form-urlencoded)") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise Refused(422, "a form field is given twice")
    return fields


def problems_text(problems: list, skip: int = 0) -> str:
    """Pydantic's validation errors as one line: "field: message; ..." (`skip`: leading parts of the
    location that are not fields, as FastAPI's "body")."""
    return "; ".join(f"{'.'.join(str(x) for x in p['loc'][skip:]) or 'body'}: {p['msg']}" for p in problems)


# -- jobs, metrics --------------------------------------------------------------------------------


@dataclass
class Job:
    settings: dict
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.monotonic)
    created_at: float = field(default_factory=time.time)
    status: str = "queued"  # queued, running, done, failed
    step: int = 0
    images: list[bytes] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    """A video job's clip: its frames, height and width, as rank 0 wrote them."""
    timings: dict = field(default_factory=dict)
    error: tuple | None = None
    """(HTTP status, message[, headers]) of a job that failed."""
    finished_at: float | None = None
    settle: Callable | None = None
    """settle(job, error) -> error, before the job is seen finished (a video's clip into the store)."""
    finished: threading.Event = field(default_factory=threading.Event)

    def finish(self, images: list[bytes] | None = None, error: tuple | None = None, result: dict | None = None) -> None:
        self.images, self.result = images or [], result or {}
        if self.settle is not None:
            error = self.settle(self, error)
        self.status = "failed" if error else "done"
        self.error = error
        self.timings["total_s"] = time.monotonic() - self.created
        self.finished_at = time.time()
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
        self.videos = 0
        self.video_frames = 0
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

    def video_done(self, frames: int) -> None:
        with self.lock:
            self.videos += 1
            self.video_frames += frames

    def text(self, queue_depth: int, status: str, store: ClipStore | None = None) -> str:
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
            if store is not None:  # a video model
                for kind, name, value in (
                    ("counter", "videos_total", self.videos),
                    ("counter", "video_frames_total", self.video_frames),
                    ("gauge", "clip_store_bytes", store.total_bytes),
                    ("gauge", "clip_store_clips", len(store)),
                    ("counter", "clip_store_evictions_total", store.evictions),
                ):
                    lines += [f"# TYPE distrifusion_{name} {kind}", f"distrifusion_{name} {value}"]
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
                    job.finish(images=rest[0], result=rest[2] if len(rest) > 2 else None)
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

    def __init__(self, settings: Settings, group: WorkerGroup, store: ClipStore | None = None) -> None:
        self.settings, self.group, self.store = settings, group, store
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

    def submit(self, settings: dict, settle: Callable | None = None) -> Job:
        with self.lock:
            if self.stopping:
                raise Refused(503, "the server is shutting down", {"Retry-After": "30"})
            if self.status == "failed":
                raise Refused(503, f"the worker group failed: {self.detail}", {"Retry-After": "60"})
            if len(self.queue) >= self.settings.queue_size:
                raise Refused(503, f"the queue is full ({self.settings.queue_size} waiting)", {"Retry-After": "5"})
            job = Job(settings, settle=settle)
            self.queue.append(job)
            self.jobs[job.id] = job
            while len(self.jobs) > 256:
                oldest = next(iter(self.jobs))
                if self.jobs[oldest].status in ("queued", "running"):
                    break
                del self.jobs[oldest]
                if self.store is not None:  # a video's clip goes with its record
                    self.store.forget(oldest)
            self.lock.notify_all()
            return job

    def cancel(self, job: Job) -> bool:
        """Take a queued job out of the queue and forget it (DELETE); False if it is no longer queued."""
        with self.lock:
            if not any(queued is job for queued in self.queue):
                return False
            self.queue = deque(queued for queued in self.queue if queued is not job)
            job.finish(error=(404, "deleted"))
            return True

    def forget(self, job_id: str) -> None:
        """Drop a finished job's record (and its clip)."""
        with self.lock:
            self.jobs.pop(job_id, None)
        if self.store is not None:
            self.store.forget(job_id)

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
        return error(422, problems_text(problems, skip=1))

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

    too_large = lambda limit: error(413, f"the request body is larger than {limit} bytes")  # noqa: E731
    limits = {"/v1/videos": MAX_VIDEO_BODY} if settings.video else {}
    app.add_middleware(_Gate, key_error=key_error, too_large=too_large, limits=limits)

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

    add_video_routes(app, dispatcher)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        body = {
            "status": dispatcher.status,
            "detail": dispatcher.detail,
            "model": settings.model,
            "kind": "video" if settings.video else "image",
            "world_size": settings.world_size,
            "queue": len(dispatcher.queue),
            "running": dispatcher.running is not None,
        }
        if dispatcher.store is not None:
            store = dispatcher.store
            body["clip_store"] = {
                "max_bytes": store.max_bytes,
                "max_age_s": store.max_age_s,
                "bytes": store.total_bytes,
                "clips": len(store),
            }
        return JSONResponse(body, 200 if dispatcher.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(len(dispatcher.queue), dispatcher.status, dispatcher.store))

    @app.get("/")
    async def page():
        video = None
        if settings.video:
            video = {
                "frames": default_frames(settings),
                "fps": settings.fps,
                "max_frames": settings.max_frames,
                "time_factor": settings.geometry.time_factor,
                "image_input": dispatcher.info.get("image_input"),
            }
        page = WEB_PAGE.read_text().replace("__CLASSES__", json.dumps(settings.classes))
        page = page.replace("__VIDEO__", json.dumps(video))
        page = page.replace("__DEFAULT_WIDTH__", str(settings.default_width or settings.default_size))
        page = page.replace("__DEFAULT_SIZE__", str(settings.default_size))
        return HTMLResponse(page)

    return app


VIDEO_STATUS = {"queued": "queued", "running": "in_progress", "done": "completed", "failed": "failed"}


def video_object(job: Job, settings: Settings, store: ClipStore | None) -> dict:
    """GET /v1/videos/ID: OpenAI's video object (id, object, model, status, progress in %, created_at,
    completed_at, expires_at, size, seconds, error) and ours (frames, fps, step of steps, seed, timings,
    the clip's bytes or why it is gone)."""
    s = job.settings
    done = job.status == "done"
    progress = 100 if done else min(99, 100 * job.step // max(1, s["steps"]))
    out = {
        "id": job.id,
        "object": "video",
        "model": settings.model,
        "status": VIDEO_STATUS[job.status],
        "progress": progress,
        "created_at": int(job.created_at),
        "completed_at": int(job.finished_at) if done else None,
        "expires_at": int(job.finished_at + settings.clip_ttl_s) if done else None,
        "size": f"{s['width']}x{s['height']}",
        "seconds": f"{s['frames'] / s['fps']:.2f}",
        "frames": s["frames"],
        "fps": s["fps"],
        "step": job.step,
        "steps": s["steps"],
        "seed": s["seed"],
        "prompt": s["prompt"],
        "timings": job.timings,
    }
    if job.error:
        out["error"] = {"status": job.error[0], "message": job.error[1]}
    if done and store is not None:
        clip = store.clips.get(job.id)
        out["clip"] = {"bytes": clip.bytes} if clip else {"gone": store.why_gone(job.id) or "removed"}
    return out


def add_video_routes(app, dispatcher: Dispatcher) -> None:
    """POST /v1/videos, GET /v1/videos[/ID[/content]], DELETE /v1/videos/ID (OpenAI's videos API). On an
    image server they answer 400 (POST) or 404 (no such video)."""
    settings, metrics, store = dispatcher.settings, dispatcher.metrics, dispatcher.store

    def settle(job: Job, error: tuple | None) -> tuple | None:
        """In the dispatcher's thread, as rank 0 answers: the clip into the store (or its files removed)."""
        if error is None:
            try:
                store.add(job.id)
                metrics.video_done(job.result.get("frames", 0))
            except ClipTooLarge as e:
                error = (507, str(e))
            except FileNotFoundError as e:
                error = (500, str(e))
        if error is not None:
            store.discard(job.id)
        return error

    def video_job(video_id: str) -> Job:
        job = dispatcher.jobs.get(video_id)
        if job is None or job.settings.get("kind") != "video":
            raise Refused(404, f"no video {video_id!r} (deleted, or forgotten: the server keeps its last 256 jobs)")
        return job

    @app.post("/v1/videos")
    async def create_video(request: Request):
        _video_server(settings)  # before reading the body
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        upload = None
        if content_type.startswith("multipart/form-data"):
            fields, upload = _multipart(body, content_type)
        elif content_type.startswith("application/x-www-form-urlencoded"):  # curl -d / -F without a file
            fields = _form(body)
        else:
            try:
                fields = json.loads(body)
            except ValueError:
                raise Refused(400, "the request body is not valid JSON") from None
            if not isinstance(fields, dict):
                raise Refused(400, "the request body must be a JSON object, or multipart/form-data")
        try:
            video = VideoRequest.model_validate(fields)
        except ValidationError as e:
            raise Refused(422, problems_text(e.errors())) from None
        job_settings = video_job_settings(video, settings, dispatcher.info, upload)
        job = dispatcher.submit(job_settings | {"clip_dir": str(store.folder)}, settle=settle)
        metrics.outcome(200)
        return video_object(job, settings, store)

    @app.get("/v1/videos")
    async def list_videos(limit: int = 20):
        if not 1 <= limit <= 100:
            raise Refused(422, f"limit must be in [1, 100], got {limit}")
        jobs = [job for job in reversed(list(dispatcher.jobs.values())) if job.settings.get("kind") == "video"]
        data = [video_object(job, settings, store) for job in jobs[:limit]]
        return {"object": "list", "data": data, "has_more": len(jobs) > limit}

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str):
        return video_object(video_job(video_id), settings, store)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video"):
        job = video_job(video_id)
        if variant not in VARIANTS:
            raise Refused(422, f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if job.status != "done":
            state = VIDEO_STATUS[job.status]
            why = f": {job.error[1]}" if job.error else f" (step {job.step} of {job.settings['steps']})"
            raise Refused(409, f"video {video_id} is {state}{why}; its content is there once it is completed")
        file = store.open(video_id, variant)
        if file is None:
            raise Refused(410, f"the clip of video {video_id} is gone: {store.why_gone(video_id) or 'removed'}")
        suffix, media_type = VARIANTS[variant]
        headers = {
            "Content-Length": str(os.fstat(file.fileno()).st_size),
            "Content-Disposition": f'inline; filename="{video_id}{suffix}"',
        }
        return StreamingResponse(_chunks(file), media_type=media_type, headers=headers)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        job = video_job(video_id)
        if job.status == "running" or (job.status == "queued" and not dispatcher.cancel(job)):
            raise Refused(409, f"video {video_id} is in progress; delete it once it has completed or failed")
        dispatcher.forget(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}


def _chunks(file, size: int = 1 << 20):
    """A file's bytes in chunks, closed at the end (it was opened while the store held the clip)."""
    with file:
        while chunk := file.read(size):
            yield chunk


OPEN_PATHS = ("/", "/health")
"""What answers without the API key: the page (it asks for the key) and the health check."""


class _Gate:
    """ASGI middleware in front of every route: the API key (before the body is read), then the body's
    size, declared (Content-Length) or not (chunked: counted as it arrives; no more is read past the
    limit). Either refusal is answered here, in the app's error shape."""

    def __init__(self, app, key_error, too_large, limits: dict | None = None) -> None:
        self.app, self.key_error, self.too_large = app, key_error, too_large
        self.limits = limits or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = None if scope["path"] in OPEN_PATHS else self.key_error(headers)
        length = headers.get("content-length")
        limit = self.limits.get(scope["path"], MAX_BODY)
        if refusal is None and length is not None and (not length.isdigit() or int(length) > limit):
            refusal = self.too_large(limit)
        if refusal is None and length is None:
            chunks, size, more = [], 0, True
            while more and size <= limit:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                chunks.append(message.get("body", b""))
                size, more = size + len(chunks[-1]), message.get("more_body", False)
            body = b"".join(chunks)
            if len(body) > limit:
                refusal = self.too_large(limit)
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
        default_width=0 if args.default_size or geo is None else geo.default_width_px,
        fps=args.fps,
        max_frames=args.max_frames,
        clip_store_bytes=max(1, int(args.clip_store_mb * 1024 * 1024)),
        clip_ttl_s=args.clip_ttl,
        video_split=args.video_split,
    )


def serve_front(args, group: WorkerGroup, world_size: int) -> int:
    """Run the HTTP front until SIGTERM/SIGINT, then drain: running jobs finish, new ones get 503,
    the ranks exit. Returns the exit code."""
    settings = settings_from_args(args, world_size)
    store = ClipStore(settings.clip_store_bytes, settings.clip_ttl_s) if settings.video else None
    try:
        return _serve(args, group, world_size, Dispatcher(settings, group, store))
    finally:
        if store is not None:  # the clips go with the server
            store.close()


def _serve(args, group: WorkerGroup, world_size: int, dispatcher: Dispatcher) -> int:
    import uvicorn

    settings = dispatcher.settings
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
    if dispatcher.store is not None:
        limit = f"at most {settings.clip_store_bytes / 2**20:g} MiB, {settings.clip_ttl_s:g} s each"
        print(f"distrifusion: clips kept in {dispatcher.store.folder} ({limit})", flush=True)
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
