"""The ranks of `distrifusion serve`: load the pipeline once, then run the jobs that rank 0 receives.

Rank 0 gets each job (a dict of validated settings) from the server's front over a
`multiprocessing` connection, and broadcasts it to the other ranks over a gloo group of its own
whose timeout spans idle periods (the engine's group keeps its short timeout for the collectives
of an image). Every rank runs the pipeline; rank 0 sends progress per step and the PNGs back.
`None` is the end: every rank leaves its loop, closes the process group and exits 0.

A refusal of the job (a ValueError or TypeError raised identically on every rank before any
collective: the engine's checks) is answered and the loop goes on; anything else ends the rank
with an error, and the front restarts the group.
"""

from __future__ import annotations

import dataclasses
import io
import time
from datetime import timedelta
from functools import partial

from ..parallel.parallelize import denoiser_of

IDLE_TIMEOUT = timedelta(days=365)
"""How long ranks 1..N-1 may wait for the next job."""


def load_pipeline(model: str, dtype, config):
    """The parallelised pipeline for `model` ('embedded', 'embedded-dit', or a diffusers pipeline)."""
    import distrifusion

    from .pipelines import load_pipeline as load

    pipe = distrifusion.parallelize(load(model, dtype), config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_job(pipe, job: dict, embedded: bool, on_step) -> tuple[list, dict]:
    """The images of one job (PIL) and its timings; `on_step(step)` after every denoising step."""
    import torch

    denoiser = denoiser_of(pipe)
    state = denoiser._distrifusion_state
    mode = job["mode"]
    if mode == "auto":  # the server's --mode auto: what parallelize planned at start-up
        mode = state.auto_plan["best"]["mode"] if state.auto_plan else "sync"
    state.config = dataclasses.replace(state.config, mode=mode)
    calls, marks = [0], {}

    def after(module, inputs, output):
        calls[0] += 1
        marks.setdefault("first", time.perf_counter())
        marks["last"] = time.perf_counter()
        on_step(calls[0])

    hook = denoiser.register_forward_hook(after)
    generator = torch.Generator().manual_seed(job["seed"])
    size = dict(height=job["height"], width=job["width"], num_inference_steps=job["steps"], generator=generator)
    start = time.perf_counter()
    try:
        if embedded:
            images = pipe([job["prompt"]] * job["n"], **size).images
        else:
            extra = {} if job["guidance_scale"] is None else {"guidance_scale": job["guidance_scale"]}
            if job["negative_prompt"]:
                extra["negative_prompt"] = job["negative_prompt"]
            images = pipe(prompt=job["prompt"], num_images_per_prompt=job["n"], **size, **extra).images
    finally:
        hook.remove()
    end = time.perf_counter()
    denoising = marks.get("last", end) - marks.get("first", start)
    return images, {"denoising_s": denoising, "run_s": end - start}


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _progress(connection, job_id: str, steps: int, step: int) -> None:
    connection.send(("progress", job_id, step, steps))


def worker_loop(pipe, embedded: bool, connection) -> None:
    """Run jobs until the front sends None. `connection` is rank 0's (None on the other ranks)."""
    import torch.distributed as dist

    state = denoiser_of(pipe)._distrifusion_state
    world = state.runtime.world_size
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if world > 1 else None
    rank = dist.get_rank() if world > 1 else 0
    if rank == 0:
        connection.send(("ready", {"world_size": world, "device": str(state.runtime.device)}))
    while True:
        job = connection.recv() if rank == 0 else None
        if world > 1:
            box = [job]
            dist.broadcast_object_list(box, src=0, group=control)
            job = box[0]
        if job is None:
            break
        report = partial(_progress, connection, job["id"], job["steps"]) if rank == 0 else (lambda step: None)
        try:
            images, timings = run_job(pipe, job, embedded, report)
        except (ValueError, TypeError) as refusal:  # raised alike on every rank, before any collective
            if rank == 0:
                connection.send(("failed", job["id"], 422, str(refusal)))
            continue
        if rank == 0:
            start = time.perf_counter()
            pngs = [png_bytes(image) for image in images]
            timings["encode_s"] = time.perf_counter() - start
            connection.send(("done", job["id"], pngs, timings))
    if control is not None:
        dist.barrier(group=control)
