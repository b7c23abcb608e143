"""`distrifusion serve` with a video model: OpenAI's videos API (POST /v1/videos, GET /v1/videos/ID,
GET /v1/videos/ID/content, DELETE /v1/videos/ID) and the bounded clip store.

Most of it in-process (the FastAPI app and its dispatcher over a fake worker group that writes a clip
of known bytes: validation, the job's life, queue overflow, deadlines, the store's bound, the API key,
multipart and first frames), then end to end on a real server (2 gloo ranks, a tiny random Wan
pipeline folder): the clip decodes to the frames and size asked, progress moves step by step, a killed
rank fails the running job and the group restarts, SIGTERM drains and the store's folder goes."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from distrifusion.app.cli_checks import wan_geometry
from distrifusion.app.clips import ClipStore, ClipTooLarge, clip_paths, folder_bytes
from distrifusion.app.serve import Dispatcher, GroupFailure, Settings, frames_for, make_app

KEY = "video-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WAN = wan_geometry("this WanPipeline", {"patch_size": [1, 2, 2]}, {})  # 16 px token rows, 1 + 4k frames
CLIP = {"prompt": "a red cat", "size": "48x80", "frames": 17, "steps": 3}


def png_bytes(width: int = 24, height: int = 16) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------- in-process


class FakeVideoGroup:
    """A worker group without processes: a video job steps (job.step, `step_s` apart), then its MP4 is
    `clip_bytes` random bytes and its thumbnail 3 bytes, written where rank 0 would write them. `hold`
    cleared: jobs wait for it (to fill the queue); `hang`: the next job outlives its deadline."""

    def __init__(self, clip_bytes: int = 1000, step_s: float = 0.0, image_input: str = "none") -> None:
        self.clip_bytes, self.step_s, self.image_input = clip_bytes, step_s, image_input
        self.hold = threading.Event()
        self.hold.set()
        self.hang = False
        self.ran: list[dict] = []
        self.starts = 0

    def start(self) -> dict:
        self.starts += 1
        return {"world_size": 2, "video": True, "image_input": self.image_input}

    def check_alive(self) -> None:
        pass

    def run(self, job, deadline: float) -> None:
        while not self.hold.wait(0.01) or self.hang:
            if time.monotonic() > deadline:
                self.hang = False
                raise GroupFailure(504, "the request timed out; the worker group is being restarted")
        for step in range(1, job.settings["steps"] + 1):
            time.sleep(self.step_s)
            job.step = step
        paths = clip_paths(job.settings["clip_dir"], job.id)
        paths["video"].write_bytes(os.urandom(self.clip_bytes))
        paths["thumbnail"].write_bytes(b"jpg")
        self.ran.append(job.settings | {"id": job.id})
        s = job.settings
        job.timings.update(denoising_s=0.0, run_s=0.0)
        job.finish(result={"frames": s["frames"], "height": s["height"], "width": s["width"]})

    def stop(self) -> bool:
        return True

    def kill(self) -> None:
        pass


@contextmanager
def front(group=None, **overrides):
    """The app of a 2-rank video server over `group` (a FakeVideoGroup), its dispatcher ready."""
    group = group or FakeVideoGroup()
    options = dict(
        model="tiny-wan",
        world_size=2,
        geometry=WAN,
        api_key=KEY,
        queue_size=2,
        max_pixels=8192,
        max_steps=50,
        max_frames=33,
        default_size=48,
    )
    settings = Settings(**(options | overrides))
    store = ClipStore(settings.clip_store_bytes, settings.clip_ttl_s) if settings.video else None
    dispatcher = Dispatcher(settings, group, store)
    dispatcher.thread.start()
    while dispatcher.status != "ready":
        time.sleep(0.01)
    from starlette.testclient import TestClient

    try:
        with TestClient(make_app(dispatcher), headers=AUTH) as client:
            client.dispatcher, client.group, client.store = dispatcher, group, store
            yield client
    finally:
        if hasattr(group, "hold"):
            group.hold.set()
        dispatcher.drain(5)
        if store is not None:
            store.close()


def wait(client, video_id: str, until=("completed", "failed"), timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in until:
            return video
        time.sleep(0.01)
    raise AssertionError(f"video {video_id} still {video['status']} after {timeout} s")


def error_of(response, status: int) -> str:
    """The message of an answer in our error shape, which must have `status`."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == status, body
    return body["error"]["message"]


def test_a_job_is_answered_at_once_then_completes_with_progress_and_its_clip():
    group = FakeVideoGroup(step_s=0.03)
    with front(group) as client:
        response = client.post("/v1/videos", json=dict(CLIP, steps=10))
        assert response.status_code == 200, response.text  # OpenAI's videos API answers 200 with the job
        video = response.json()
        assert video["object"] == "video" and video["status"] in ("queued", "in_progress")
        assert (video["size"], video["frames"], video["fps"], video["seconds"]) == ("48x80", 17, 16.0, "1.06")
        seen = []
        while video["status"] not in ("completed", "failed"):
            video = client.get(f"/v1/videos/{video['id']}").json()
            seen.append((video["progress"], video["step"]))
        assert video["status"] == "completed" and video["progress"] == 100 and video["step"] == 10
        assert any(0 < progress < 100 for progress, _ in seen), seen
        assert [s for _, s in seen] == sorted(s for _, s in seen)  # never backwards
        assert video["completed_at"] >= video["created_at"] and video["expires_at"] > video["completed_at"]
        assert video["clip"] == {"bytes": 1003}
        content = client.get(f"/v1/videos/{video['id']}/content")
        written = clip_paths(client.store.folder, video["id"])["video"].read_bytes()
        assert content.status_code == 200 and content.content == written
        assert content.headers["content-type"] == "video/mp4" and content.headers["content-length"] == "1000"
        thumbnail = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
        assert thumbnail.headers["content-type"] == "image/jpeg" and thumbnail.content == b"jpg"
        job = group.ran[0]
        assert (job["kind"], job["height"], job["width"], job["frames"], job["image"]) == ("video", 80, 48, 17, None)
        listed = client.get("/v1/videos").json()
        assert listed["object"] == "list" and [v["id"] for v in listed["data"]] == [video["id"]]
        metrics = client.get("/metrics").text
        assert "distrifusion_videos_total 1" in metrics and "distrifusion_video_frames_total 17" in metrics
        assert "distrifusion_clip_store_bytes 1003" in metrics
        health = client.get("/health").json()
        assert health["kind"] == "video" and health["clip_store"]["bytes"] == 1003


def test_seconds_become_the_next_frame_count_the_model_makes():
    assert (frames_for(5, 16, 4), frames_for(4, 16, 4), frames_for(1, 16, 4)) == (81, 65, 17)
    assert (frames_for(1, 16, 1), frames_for(0.01, 16, 4), frames_for(2, 8, 4)) == (16, 1, 17)
    with front() as client:
        for body, frames in ((dict(seconds="1"), 17), (dict(seconds=1.5, fps=8), 13), ({}, 33)):
            request = {k: v for k, v in CLIP.items() if k != "frames"} | body
            video = client.post("/v1/videos", json=request).json()
            assert video["frames"] == frames, (body, video)
        message = error_of(client.post("/v1/videos", json=dict(CLIP, frames=None, seconds="4")), 422)
        assert message == "seconds 4 at 16 fps are 65 frames: this server makes at most 33 frames (--max-frames)"


@pytest.mark.parametrize(
    "change, status, words",
    [
        ({"size": "50x80"}, 422, "image width of 50 px must be a multiple of the model's block of 16 px"),
        ({"size": "48"}, 422, "size must be WIDTHxHEIGHT"),
        ({"size": "96x96"}, 413, "9216 pixels; this server allows 8192"),
        ({"size": "48x16"}, 422, "image height of 16 px is too small to split over 2 ranks"),
        ({"frames": 20}, 422, "frames 20: this WanPipeline makes 1 + 4k frames"),
        ({"frames": 0}, 422, "frames: Input should be greater than or equal to 1"),
        ({"frames": 37}, 422, "this server makes at most 33 frames"),
        ({"frames": None, "seconds": "abc"}, 422, "seconds: Input should be a valid number"),
        ({"frames": None, "seconds": -1}, 422, "seconds: Input should be greater than 0"),
        ({"seconds": 1}, 422, "give seconds or frames, not both"),
        ({"fps": 0}, 422, "fps: Input should be greater than 0"),
        ({"steps": 51}, 422, "steps must be at most 50"),
        ({"colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"prompt": ""}, 422, "prompt must not be empty"),
        ({"model": "sora-2"}, 422, "this server serves model 'tiny-wan', not 'sora-2'"),
        ({"input_reference": "!!"}, 422, "input_reference is not valid base64"),
        ({"input_reference": "https://example.com/a.png"}, 422, "this server fetches no URL"),
        ({"input_reference": {"file_id": "file_1"}}, 422, "this server keeps no files"),
        ({"input_reference": base64.b64encode(png_bytes()).decode()}, 422, "takes no input_reference"),
    ],
)
def test_bad_requests_get_a_4xx_in_our_error_shape(change, status, words):
    with front() as client:
        message = error_of(client.post("/v1/videos", json={**CLIP, **change}), status)
        assert words in message, message
        assert not client.group.ran and not client.dispatcher.jobs  # nothing queued


def test_bodies_that_are_not_a_request():
    with front() as client:
        assert "not valid JSON" in error_of(client.post("/v1/videos", content=b"{nope"), 400)
        assert "JSON object" in error_of(client.post("/v1/videos", json=[1, 2]), 400)
        assert "not valid multipart" in error_of(
            client.post("/v1/videos", content=b"x", headers={"Content-Type": "multipart/form-data; boundary=b"}), 400
        )
        big = {**CLIP, "negative_prompt": "x" * 3000, "input_reference": "A" * (17 * 2**20)}
        assert "larger than 16777216 bytes" in error_of(client.post("/v1/videos", json=big), 413)


def test_unknown_ids_variants_and_unfinished_content():
    group = FakeVideoGroup()
    with front(group) as client:
        for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            path = "/v1/videos/nope" + path
            assert "no video 'nope'" in error_of(client.request(method, path), 404)
        group.hold.clear()  # the job waits
        video = client.post("/v1/videos", json=CLIP).json()
        message = error_of(client.get(f"/v1/videos/{video['id']}/content"), 409)
        assert re.search(rf"video {video['id']} is (queued|in_progress)", message), message
        group.hold.set()
        wait(client, video["id"])
        message = error_of(client.get(f"/v1/videos/{video['id']}/content", params={"variant": "spritesheet"}), 422)
        assert message == "variant must be one of video, thumbnail, got 'spritesheet'"
        assert error_of(client.get("/v1/videos", params={"limit": 0}), 422)


def test_a_full_queue_answers_503_and_delete_takes_a_queued_job_out():
    group = FakeVideoGroup()
    with front(group, queue_size=2) as client:
        group.hold.clear()
        running = client.post("/v1/videos", json=CLIP).json()
        while client.dispatcher.running is None:  # taken from the queue: the dispatcher runs it
            time.sleep(0.01)
        queued = [client.post("/v1/videos", json=dict(CLIP, seed=i)).json() for i in range(2)]
        refused = client.post("/v1/videos", json=CLIP)
        assert "the queue is full (2 waiting)" in error_of(refused, 503) and refused.headers["retry-after"]
        assert "in progress" in error_of(client.delete(f"/v1/videos/{running['id']}"), 409)
        deleted = client.delete(f"/v1/videos/{queued[0]['id']}")
        assert deleted.json() == {"id": queued[0]["id"], "object": "video.deleted", "deleted": True}
        assert error_of(client.get(f"/v1/videos/{queued[0]['id']}"), 404)
        last = client.post("/v1/videos", json=CLIP)  # room again
        assert last.status_code == 200
        group.hold.set()
        assert wait(client, last.json()["id"])["status"] == "completed"
        assert [job["id"] for job in group.ran] == [running["id"], queued[1]["id"], last.json()["id"]]
        metrics = client.get("/metrics").text
        assert 'distrifusion_requests_total{status="503"} 1' in metrics


def test_delete_frees_the_clip():
    with front() as client:
        video = wait(client, client.post("/v1/videos", json=CLIP).json()["id"])
        files = clip_paths(client.store.folder, video["id"])
        assert files["video"].is_file() and client.store.total_bytes == 1003
        assert client.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True
        assert not files["video"].exists() and not files["thumbnail"].exists()
        assert client.store.total_bytes == 0 and folder_bytes(client.store.folder) == 0
        for path in (f"/v1/videos/{video['id']}", f"/v1/videos/{video['id']}/content"):
            assert error_of(client.get(path), 404)
        assert "distrifusion_clip_store_bytes 0" in client.get("/metrics").text


def test_the_store_keeps_its_bound_and_says_why_a_clip_went():
    """Clips of 1003 bytes in a store of 2500: the newest two stay, older ones answer 410 (evicted); a clip
    larger than the store fails its job (507) and leaves nothing behind."""
    group = FakeVideoGroup(clip_bytes=1000)
    with front(group, clip_store_bytes=2500) as client:
        ids = []
        for seed in range(5):
            ids.append(wait(client, client.post("/v1/videos", json=dict(CLIP, seed=seed)).json()["id"])["id"])
            assert client.store.total_bytes <= 2500 and folder_bytes(client.store.folder) <= 2500
        for old in ids[:3]:
            message = error_of(client.get(f"/v1/videos/{old}/content"), 410)
            assert "removed to keep the store within 2500 bytes" in message
            assert client.get(f"/v1/videos/{old}").json()["clip"]["gone"].startswith("removed to keep")
        for new in ids[3:]:
            assert client.get(f"/v1/videos/{new}/content").status_code == 200
        assert "distrifusion_clip_store_evictions_total 3" in client.get("/metrics").text
        group.clip_bytes = 3000
        failed = wait(client, client.post("/v1/videos", json=CLIP).json()["id"])
        assert failed["status"] == "failed" and failed["error"]["status"] == 507
        assert "more than the server keeps (2500 bytes" in failed["error"]["message"]
        assert sorted(p.name for p in client.store.folder.iterdir()) == sorted(
            p.name for i in ids[3:] for p in clip_paths(client.store.folder, i).values()
        )


def test_clips_expire_and_the_store_owns_its_folder(tmp_path):
    now = [0.0]
    store = ClipStore(10_000, 60, clock=lambda: now[0], sweep_every_s=0)
    try:
        folder = store.folder
        assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("distrifusion-clips-")
        with pytest.raises(FileNotFoundError):
            store.add("a1")  # rank 0 wrote nothing
        for job_id in ("a1", "b2"):
            clip_paths(folder, job_id)["video"].write_bytes(b"x" * 100)
            store.add(job_id)
            now[0] += 40
        (folder / ".b2.mp4.123.tmp.mp4").write_bytes(b"half")  # what a rank killed mid-write leaves
        assert store.sweep() == ["a1"] and store.why_gone("a1") == "expired: clips are kept 60 s"
        assert store.open("a1") is None
        with store.open("b2") as file:
            assert file.read() == b"x" * 100
        assert store.discard("b2") and list(folder.iterdir()) == []  # the stray temporary file too
        clip_paths(folder, "c3")["video"].write_bytes(b"x" * 20_000)
        with pytest.raises(ClipTooLarge):
            store.add("c3")
        assert list(folder.iterdir()) == []
        with pytest.raises(ValueError, match="alphanumeric"):
            clip_paths(folder, "../etc")
    finally:
        store.close()
    assert not folder.exists()


def test_the_sweeper_expires_clips_without_a_request():
    store = ClipStore(10_000, 0.2, sweep_every_s=0.05)
    try:
        clip_paths(store.folder, "a1")["video"].write_bytes(b"x")
        store.add("a1")
        deadline = time.monotonic() + 5
        while len(store) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(store) == 0 and list(store.folder.iterdir()) == []
    finally:
        store.close()


def test_a_job_past_its_deadline_fails_504_and_queued_ones_expire():
    group = FakeVideoGroup()
    with front(group, request_timeout_s=0.5) as client:
        group.hang = True
        hung = client.post("/v1/videos", json=CLIP).json()
        queued = client.post("/v1/videos", json=CLIP).json()
        hung = wait(client, hung["id"])
        assert hung["status"] == "failed" and hung["error"]["status"] == 504 and "timed out" in hung["error"]["message"]
        queued = wait(client, queued["id"])
        assert queued["status"] == "completed" or queued["error"]["status"] == 504
        assert group.starts == 2 and client.dispatcher.status == "ready"  # the group was restarted
        assert not any(p.suffix == ".mp4" for p in client.store.folder.iterdir() if hung["id"] in p.name)


def test_a_drain_fails_the_queued_jobs_with_503():
    group = FakeVideoGroup()
    with front(group) as client:
        group.hold.clear()
        running = client.post("/v1/videos", json=CLIP).json()
        while client.dispatcher.running is None:
            time.sleep(0.01)
        queued = client.post("/v1/videos", json=CLIP).json()
        threading.Timer(0.3, group.hold.set).start()
        assert client.dispatcher.drain(5)
        assert wait(client, running["id"])["status"] == "completed"  # the running job finished
        queued = client.get(f"/v1/videos/{queued['id']}").json()
        assert queued["status"] == "failed" and queued["error"]["status"] == 503
        assert "shutting down" in error_of(client.post("/v1/videos", json=CLIP), 503)


def test_the_api_key_guards_every_video_endpoint():
    with front() as client:
        video = wait(client, client.post("/v1/videos", json=CLIP).json()["id"])
        for method, path in (
            ("POST", "/v1/videos"),
            ("GET", "/v1/videos"),
            ("GET", f"/v1/videos/{video['id']}"),
            ("GET", f"/v1/videos/{video['id']}/content"),
            ("DELETE", f"/v1/videos/{video['id']}"),
        ):
            response = client.request(method, path, headers={"Authorization": "Bearer wrong"})
            assert "API key" in error_of(response, 401), (method, path)
        assert client.get(f"/v1/videos/{video['id']}/content").status_code == 200  # not deleted


def test_image_endpoints_refuse_on_a_video_server_and_video_endpoints_on_an_image_server():
    with front() as client:
        for path in ("/generate", "/v1/images/generations", "/v1/jobs"):
            message = error_of(client.post(path, json={"prompt": "a red cat", "size": "48x80"}), 400)
            assert "serves the video model 'tiny-wan': POST /v1/videos makes its clips" in message, path
        page = client.get("/").text
        assert '"frames": 33' in page and '"image_input": "none"' in page and 'value="48"' in page
    from test_serve import FakeGroup

    with front(FakeGroup(), geometry=None, model="sd") as client:
        message = error_of(client.post("/v1/videos", json=CLIP), 400)
        assert "serves the image model 'sd'; /v1/videos needs a video model" in message
        assert error_of(client.get("/v1/videos/abc"), 404)
        assert "const video = null;" in client.get("/").text


def test_a_first_frame_as_multipart_file_data_url_or_openai_object():
    """An image-to-video pipeline: the first frame is required, and reaches the ranks as the bytes sent, in
    each of the shapes OpenAI's clients send (a multipart file; {"image_url": DATA_URL}) and as base64."""
    group = FakeVideoGroup(image_input="required")
    image, big = png_bytes(20, 10), png_bytes(400, 300)
    assert len(base64.b64encode(big)) > 64 * 1024  # a body the image endpoints would refuse
    data_url = "data:image/png;base64," + base64.b64encode(big).decode()
    with front(group) as client:
        fields = {k: str(v) for k, v in CLIP.items()}
        requests = [
            dict(data=fields, files={"input_reference": ("frame.png", image, "image/png")}),
            dict(json={**CLIP, "input_reference": {"image_url": data_url}}),
            dict(json={**CLIP, "input_reference": base64.b64encode(image).decode()}),
        ]
        for request in requests:
            response = client.post("/v1/videos", **request)
            assert response.status_code == 200, response.text
            wait(client, response.json()["id"])
        assert [job["image"] for job in group.ran] == [image, big, image]
        assert [job["frames"] for job in group.ran] == [17] * 3  # multipart text fields parsed as the JSON ones
        assert "needs input_reference (the first frame)" in error_of(client.post("/v1/videos", json=CLIP), 422)
        not_image = base64.b64encode(b"GIF89a nonsense").decode()
        message = error_of(client.post("/v1/videos", json={**CLIP, "input_reference": not_image}), 422)
        assert "not an image the server can read" in message
        twice = dict(data={**fields, "input_reference": "abc"}, files={"input_reference": ("f.png", image)})
        assert "given twice" in error_of(client.post("/v1/videos", **twice), 422)
        other_file = dict(data=fields, files={"mask": ("m.png", image)})
        assert "only input_reference may be a file" in error_of(client.post("/v1/videos", **other_file), 422)


def test_an_image_to_video_job_runs_with_its_first_frame(tmp_path):
    """The ranks' side of an image-to-video job, in one process: rank 0 says the pipeline needs a first
    frame; a job without one is refused as the engine's refusals are (a ValueError, before any model call);
    with one, the steps are counted by the pipeline (two model calls each: prompt and negative), and the
    clip and thumbnail land at the store's paths. The prompt is a string: without ftfy, diffusers' Wan
    image-to-video pipeline would end the rank at its prompt cleaning (NameError)."""
    import importlib.util

    import torch
    from wan_helpers import HEIGHT, WIDTH, first_frame, tiny_pipeline

    import distrifusion
    from distrifusion.app import serve_worker

    pipe = distrifusion.parallelize(tiny_pipeline("ti2v", dtype=torch.float32), distrifusion.ParallelConfig())
    pipe.set_progress_bar_config(disable=True)
    serve_worker._prompt_cleaning_without_ftfy(pipe)
    assert serve_worker.pipeline_info(pipe) == {"video": True, "image_input": "required"}
    frame = (first_frame()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(frame).save(out, "PNG")
    job = dict(CLIP, kind="video", id="abc123", negative_prompt="blurry", n=1, height=HEIGHT, width=WIDTH, frames=5)
    job |= dict(fps=8.0, steps=2, seed=0, guidance_scale=None, mode="sync", clip_dir=str(tmp_path), image=None)
    with pytest.raises(ValueError, match="needs a first frame: give input_reference"):
        serve_worker.run_job(pipe, job, False, print)
    steps = []
    frames, timings = serve_worker.run_job(pipe, job | {"image": out.getvalue()}, False, steps.append)
    assert frames.shape == (5, HEIGHT, WIDTH, 3) and steps == [1, 2] and timings["run_s"] > 0
    assert serve_worker.write_clip(frames, job) == {"frames": 5, "height": HEIGHT, "width": WIDTH}
    paths = clip_paths(tmp_path, "abc123")
    assert read_mp4(paths["video"].read_bytes()).shape == (5, HEIGHT, WIDTH, 3)
    assert Image.open(paths["thumbnail"]).size == (WIDTH, HEIGHT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123.jpg", "abc123.mp4"]  # no temporary left
    module = sys.modules[serve_worker._pipeline_class(pipe).__module__]  # diffusers' pipeline_wan_i2v
    assert importlib.util.find_spec("ftfy") is not None or module.ftfy.fix_text("a  b") == "a  b"


# ----------------------------------------------------------------------------- a real server

START_S = 180  # imports and loading two ranks of a Wan pipeline on 2 busy cores (test_serve.Server's too)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    import torch
    from wan_helpers import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny_wan_serve")
    tiny_pipeline("t2v", dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(wan_folder):
    from test_serve import Server

    flags = ["--model", str(wan_folder), "--api-key", KEY, "--max-pixels", "8192", "--max-steps", "60"]
    s = Server(*flags, "--max-frames", "33", "--mode", "sync")
    yield s
    s.close()


def submit(server, **kwargs) -> dict:
    response = httpx.post(server.url + "/v1/videos", headers=AUTH, timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def poll(server, video_id: str, timeout: float = 300, every: float = 0.1) -> list[dict]:
    """Every state of the job seen until it completed or failed."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(httpx.get(f"{server.url}/v1/videos/{video_id}", headers=AUTH, timeout=30).json())
        if seen[-1]["status"] in ("completed", "failed"):
            return seen
        time.sleep(every)
    raise AssertionError(f"video {video_id}: {seen[-1]}")


def read_mp4(data: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(data, extension=".mp4", plugin="FFMPEG")


def test_a_clip_decodes_to_the_frames_and_size_asked(server):
    """JSON with frames; form fields with seconds (1 s at 16 fps: 17 frames)."""
    jobs = [
        (submit(server, json=dict(CLIP, seed=1)), (17, 80, 48)),
        (submit(server, data={"prompt": "a red cat", "size": "48x64", "seconds": "1", "steps": "2"}), (17, 64, 48)),
    ]
    for video, (frames, height, width) in jobs:
        assert poll(server, video["id"])[-1]["status"] == "completed"
        content = httpx.get(f"{server.url}/v1/videos/{video['id']}/content", headers=AUTH, timeout=60)
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        clip = read_mp4(content.content)
        assert clip.shape == (frames, height, width, 3) and clip.std() > 0
        thumbnail = httpx.get(
            f"{server.url}/v1/videos/{video['id']}/content", params={"variant": "thumbnail"}, headers=AUTH
        )
        assert Image.open(io.BytesIO(thumbnail.content)).size == (width, height)


def test_progress_moves_step_by_step(server):
    video = submit(server, json=dict(CLIP, steps=40, seed=2))
    seen = poll(server, video["id"], every=0.02)
    assert seen[-1]["status"] == "completed" and seen[-1]["progress"] == 100 and seen[-1]["step"] == 40
    running = [v["step"] for v in seen if v["status"] == "in_progress"]
    assert len(set(running)) >= 3, running  # several distinct steps seen while it ran
    assert running == sorted(running) and max(running) <= 40
    progress = [v["progress"] for v in seen]
    assert progress == sorted(progress) and any(0 < p < 100 for p in progress), progress


def test_bad_input_is_refused_before_any_rank_sees_it(server):
    for change, words in (({"frames": 19}, "1 + 4k frames"), ({"size": "40x80"}, "multiple of the model's block")):
        response = httpx.post(server.url + "/v1/videos", json={**CLIP, **change}, headers=AUTH)
        assert response.status_code == 422 and words in response.json()["error"]["message"]
    response = httpx.post(server.url + "/generate", json={"prompt": "a red cat"}, headers=AUTH)
    assert response.status_code == 400 and "POST /v1/videos" in response.json()["error"]["message"]


def test_a_killed_rank_fails_the_job_the_group_restarts_and_sigterm_drains(server):
    """Last: it ends the module's server."""
    output = "".join(server.output)
    folder = Path(re.search(r"clips kept in (\S+)", output)[1])
    assert folder.is_dir() and any(folder.iterdir())  # the earlier tests' clips
    video = submit(server, json=dict(CLIP, steps=60, seed=3))
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/v1/videos/{video['id']}", headers=AUTH).json()["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(server.ranks()[-1], signal.SIGKILL)
    failed = poll(server, video["id"])[-1]
    assert failed["status"] == "failed" and failed["error"]["status"] == 500, failed
    assert "worker group failed" in failed["error"]["message"]
    server.wait_ready(START_S)
    again = submit(server, json=dict(CLIP, seed=4))
    assert poll(server, again["id"])[-1]["status"] == "completed"
    assert "distrifusion_group_restarts_total 1" in httpx.get(server.url + "/metrics", headers=AUTH).text
    # SIGTERM while a job runs: it finishes (exit 0: a drain whose job failed exits 1), new ones get 503.
    ranks = server.ranks()
    running = submit(server, json=dict(CLIP, steps=20, seed=5))
    while httpx.get(f"{server.url}/v1/videos/{running['id']}", headers=AUTH).json()["status"] == "queued":
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        late = httpx.post(server.url + "/v1/videos", json=CLIP, headers=AUTH).status_code
    except httpx.TransportError:
        late = "closed"
    assert late in (503, "closed")
    assert server.proc.wait(60) == 0, "".join(server.output)
    assert not folder.exists(), "the clip store's folder outlived the server"
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
