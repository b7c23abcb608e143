"""`distrifusion serve` end to end: a real server (2 gloo ranks, the embedded model at small sizes)
on loopback, driven over HTTP: the API's success path and determinism, every class of bad input,
the API key, queue overflow, a killed rank (500, then healthy again) and the SIGTERM drain."""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port
from PIL import Image
from serve_process import ServeProcess

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"prompt": "gravel", "size": "32x48", "steps": 3}
START_S = 180  # imports and loading on 2 busy cores


class Server(ServeProcess):
    """A 2-rank server (one thread each) on a free port, ready; `close` stops it and every rank."""

    def __init__(self, *flags: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        super().__init__(free_port(), ["--nproc", "2", *flags], ready_timeout=START_S, stop_grace=40, env=env)

    def post(self, path: str, json=None, headers=AUTH, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=json, headers=headers, timeout=120, **kwargs)

    def close(self) -> None:
        self.stop()


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--queue-size", "2", "--max-pixels", "16384", "--max-steps", "50", "--mode", "sync")
    yield s
    s.close()


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_generate_returns_a_png_of_the_asked_size(server):
    response = server.post("/generate", SMALL)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert png(response.content).size == (32, 48)


def test_openai_shape_with_several_images(server):
    response = server.post("/v1/images/generations", dict(SMALL, n=2, response_format="b64_json"))
    assert response.status_code == 200, response.text
    body = response.json()
    images = [png(base64.b64decode(item["b64_json"])) for item in body["data"]]
    assert [i.size for i in images] == [(32, 48)] * 2
    assert images[0].tobytes() != images[1].tobytes()  # two different draws
    assert {"queued_s", "denoising_s", "total_s"} <= set(body["timings"])


def test_jobs_endpoint_reports_progress_and_the_image(server):
    job = server.post("/v1/jobs", SMALL).json()
    for _ in range(600):
        state = httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=AUTH).json()
        if state["status"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert state["status"] == "done" and state["step"] == state["steps"] == 3
    assert png(base64.b64decode(state["images"][0])).size == (32, 48)


def test_same_seed_same_png_whatever_else_runs(server):
    """Two identical requests in flight with different ones between them: byte-identical PNGs."""
    requests = [dict(SMALL, seed=7), dict(SMALL, seed=8, size="48x32"), dict(SMALL, seed=7)]
    results: list = [None] * 3

    def ask(i):
        results[i] = server.post("/generate", requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert results[0].content == results[2].content
    assert results[0].content != results[1].content


@pytest.mark.parametrize(
    "body,status,words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({**SMALL, "colour": "red"}, 422, "colour"),
        ({**SMALL, "size": "36x48"}, 422, "multiple"),  # the embedded UNet's block is 8 px
        ({**SMALL, "size": "32"}, 422, "WIDTHxHEIGHT"),
        ({**SMALL, "size": "256x256"}, 413, "pixels"),
        ({**SMALL, "steps": 51}, 422, "steps"),
        ({**SMALL, "n": 5}, 422, "n must be"),
        ({**SMALL, "prompt": "velvet"}, 422, "unknown class"),
        ({**SMALL, "seed": -1}, 422, "seed"),
        ({**SMALL, "response_format": "url"}, 422, "response_format"),
        ({**SMALL, "guidance_scale": 3.0}, 422, "no CFG"),
    ],
)
def test_bad_requests_are_answered_with_a_message(server, body, status, words):
    if isinstance(body, bytes):
        response = httpx.post(
            server.url + "/generate", content=body, headers={**AUTH, "content-type": "application/json"}
        )
    else:
        response = server.post("/generate", body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]


def test_oversized_body_is_413(server):
    response = server.post("/generate", {**SMALL, "prompt": "x" * 70000})
    assert response.status_code == 413


def test_a_chunked_body_over_the_limit_is_413(server):
    def chunks():  # no Content-Length: sent chunked
        yield b'{"prompt": "gravel", "size": "32x48", "steps": 2, "negative_prompt": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(server.url + "/generate", content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]
    small = iter([b'{"prompt": "gravel", ', b'"size": "32x48", "steps": 2}'])
    response = httpx.post(server.url + "/generate", content=small, headers=headers, timeout=60)
    assert response.status_code == 200 and png(response.content).size == (32, 48)


def test_errors_share_one_shape(server):
    assert server.post("/generate", content=b"{not json", headers={}).status_code == 401  # the key first
    for path in ("/nowhere", "/generate"):  # 404, and 405 (GET on a POST route)
        response = httpx.get(server.url + path, headers=AUTH)
        assert response.status_code in (404, 405) and response.json()["error"]["status"] == response.status_code
    assert httpx.head(server.url + "/health").status_code == 200


def test_api_key(server):
    assert server.post("/generate", SMALL, headers={}).status_code == 401
    assert server.post("/generate", SMALL, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'distrifusion_requests_total{status="401"}' in metrics and "distrifusion_queue_depth" in metrics


def test_a_full_queue_answers_503_with_retry_after(server):
    """Queue of 2: of 6 concurrent slow requests one runs, two wait, the rest get 503 at once."""
    results: list = [None] * 6

    def ask(i):
        results[i] = server.post("/generate", dict(SMALL, steps=40, seed=i))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes.count(503) >= 2 and codes.count(200) >= 2 and set(codes) == {200, 503}, codes
    refused = next(r for r in results if r.status_code == 503)
    assert refused.headers["retry-after"] and "queue is full" in refused.json()["error"]["message"]


def test_killed_rank_fails_the_request_then_the_group_restarts():
    server = Server("--mode", "sync")
    try:
        result = {}
        ask = threading.Thread(target=lambda: result.update(r=server.post("/generate", dict(SMALL, steps=50))))
        ask.start()
        time.sleep(1.5)  # the job is running
        os.kill(server.ranks()[-1], signal.SIGKILL)
        ask.join()
        assert result["r"].status_code == 500 and "worker group failed" in result["r"].text
        health = httpx.get(server.url + "/health").json()
        assert health["status"] in ("restarting", "ready")
        server.wait_ready(START_S)
        assert server.post("/generate", SMALL).status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert "distrifusion_group_restarts_total 1" in metrics
        # A rank that dies while the server is idle is replaced before the next request, which succeeds.
        os.kill(server.ranks()[0], signal.SIGKILL)
        time.sleep(1.5)
        assert httpx.get(server.url + "/health").json()["status"] in ("restarting", "ready")
        assert server.post("/generate", SMALL).status_code == 200
        assert "distrifusion_group_restarts_total 2" in httpx.get(server.url + "/metrics").text
        # SIGTERM while a job runs: it finishes, a new request gets 503, everything exits 0 within 30 s.
        ranks = server.ranks()
        result.clear()
        ask = threading.Thread(target=lambda: result.update(r=server.post("/generate", dict(SMALL, steps=20))))
        ask.start()
        time.sleep(1.0)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            late = server.post("/generate", SMALL).status_code
        except httpx.TransportError:
            late = "closed"
        ask.join()
        assert result["r"].status_code == 200
        assert late in (503, "closed")
        assert server.proc.wait(30) == 0 and time.monotonic() - started < 30, "".join(server.output)
        for pid in ranks:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        server.close()


class FakeGroup:
    """A worker group without processes: runs a job by sleeping; `hang` makes the next job outlive
    its deadline, as a hung collective would."""

    def __init__(self) -> None:
        self.starts = self.stops = self.kills = 0
        self.hang = self.dead = self.deaf = False

    def check_alive(self) -> None:
        from distrifusion.app.serve import GroupFailure

        if self.dead:
            self.dead = False
            raise GroupFailure(500, "rank 1 exited (-9)")

    def start(self) -> dict:
        self.starts += 1
        return {}

    def run(self, job, deadline: float) -> None:
        from distrifusion.app.serve import GroupFailure

        while self.deaf:  # a job that outlives the drain: ends only when the group is killed
            if self.kills:
                raise GroupFailure(500, "lost rank 0")
            time.sleep(0.01)
        while self.hang:
            if time.monotonic() > deadline:
                self.hang = False
                raise GroupFailure(504, "the request timed out; the worker group is being restarted")
            time.sleep(0.01)
        time.sleep(0.05)
        job.finish(images=[b"png"])

    def stop(self) -> bool:
        self.stops += 1
        return True

    def kill(self) -> None:
        self.kills += 1


def test_dispatcher_times_out_a_hung_job_restarts_and_drains():
    from distrifusion.app.serve import Dispatcher, Refused, Settings

    group = FakeGroup()
    dispatcher = Dispatcher(Settings(model="m", world_size=2, geometry=None, request_timeout_s=0.5), group)
    dispatcher.thread.start()
    group.hang = True
    hung = dispatcher.submit({"steps": 1})
    queued = dispatcher.submit({"steps": 1})
    assert hung.finished.wait(5) and hung.error[0] == 504
    assert queued.finished.wait(5)  # waited through the restart, then ran (or timed out while queued)
    assert queued.status == "done" or queued.error[0] == 504
    assert group.kills == 1 and group.starts == 2 and dispatcher.status == "ready"
    assert dispatcher.submit({"steps": 1}).finished.wait(5)
    assert dispatcher.drain() and group.stops == 1
    with pytest.raises(Refused) as refused:
        dispatcher.submit({"steps": 1})
    assert refused.value.status == 503


def test_dispatcher_replaces_a_group_that_died_while_idle():
    from distrifusion.app.serve import Dispatcher, Settings

    group = FakeGroup()
    dispatcher = Dispatcher(Settings(model="m", world_size=2, geometry=None), group)
    dispatcher.thread.start()
    assert dispatcher.submit({"steps": 1}).finished.wait(5)
    group.dead = True
    deadline = time.monotonic() + 5
    while group.starts < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group.kills == 1 and group.starts == 2 and dispatcher.metrics.restarts == 1
    job = dispatcher.submit({"steps": 1})
    assert job.finished.wait(5) and job.status == "done"
    assert dispatcher.drain()


def test_a_queued_request_expires_at_its_deadline_and_a_drain_that_runs_out_fails_the_running_job():
    from distrifusion.app.serve import Dispatcher, Settings

    group = FakeGroup()
    dispatcher = Dispatcher(Settings(model="m", world_size=2, geometry=None), group)
    dispatcher.thread.start()
    group.deaf = True
    running = dispatcher.submit({"steps": 1})
    queued = dispatcher.submit({"steps": 1})
    time.sleep(0.2)
    dispatcher.expire(queued)  # what the request's handler does at its deadline
    assert queued.finished.is_set() and queued.error[0] == 504 and not dispatcher.queue
    assert not dispatcher.drain(grace_s=0.3)  # the running job outlives the drain: its ranks are stopped
    assert running.finished.is_set() and running.error[0] == 503 and "shut down" in running.error[1]
    assert group.starts == 1, "no new group is started while the server shuts down"


def test_a_job_whose_progress_never_stops_still_times_out():
    """The deadline holds while progress messages keep coming (quick steps on a GPU)."""
    from multiprocessing.connection import Pipe

    from distrifusion.app.serve import GroupFailure, Job, WorkerGroup

    group = WorkerGroup([], 0)
    group.connection, rank0 = Pipe()
    stop = threading.Event()

    def chatty_rank0():
        rank0.recv()  # the job
        step = 0
        while not stop.is_set():
            rank0.send(("progress", "id", step))
            step += 1
            time.sleep(0.005)

    threading.Thread(target=chatty_rank0, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(GroupFailure) as failure:
        group.run(Job({"steps": 1000}), deadline=started + 0.3)
    stop.set()
    assert failure.value.status == 504 and time.monotonic() - started < 2


def test_mode_auto_serves_the_planned_mode_and_per_request_modes():
    """`--mode auto`: the ranks plan at start-up; a request without a mode runs the planned one (the
    engine never runs an unresolved "auto"), a request may still ask for sync."""
    s = Server("--mode", "auto")
    try:
        for body in (
            {"prompt": "gravel", "size": "64x32", "steps": 3},
            {"prompt": "grass", "size": "32x64", "mode": "sync"},
        ):
            r = s.post("/generate", json=body, headers={})
            assert r.status_code == 200, (r.text, "".join(s.output))
            assert png(r.content).size == tuple(int(v) for v in body["size"].split("x"))
        assert "mode auto: " in "".join(s.output)
    finally:
        s.close()
