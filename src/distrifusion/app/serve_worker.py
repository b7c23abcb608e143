"""The ranks of `distrifusion serve`: load the pipeline once, then run the jobs that rank 0 receives.

Rank 0 gets each job (a dict of validated settings) from the server's front over a
`multiprocessing` connection, and broadcasts it to the other ranks over a gloo group of its own
whose timeout spans idle periods (the engine's group keeps its short timeout for the collectives
of an image). Every rank runs the pipeline; rank 0 sends progress per step and the PNGs back, or,
for a video job, writes the MP4 and its thumbnail into the server's clip store (at the paths the
front's `clips.clip_paths` names) and sends their sizes.
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

from ..parallel.parallelize import denoiser_of, denoisers_of
from .clips import clip_paths

IDLE_TIMEOUT = timedelta(days=365)
"""How long ranks 1..N-1 may wait for the next job."""


def load_pipeline(model: str, dtype, config):
    """The parallelised pipeline for `model` ('embedded', 'embedded-dit', or a diffusers pipeline)."""
    import distrifusion

    from .pipelines import load_pipeline as load

    pipe = distrifusion.parallelize(load(model, dtype), config)
    pipe.set_progress_bar_config(disable=True)
    _prompt_cleaning_without_ftfy(pipe)
    return pipe


def _prompt_cleaning_without_ftfy(pipe) -> None:
    """diffusers' Wan image-to-video pipeline (0.41, 0.42) cleans prompts with ftfy unguarded, where its
    text-to-video pipeline skips ftfy when it is not installed: without ftfy, the first prompt would end the
    rank (a NameError). There, the pipeline's module gets what the text-to-video one does: text unchanged."""
    import importlib.util
    import sys
    import types

    module = sys.modules.get(_pipeline_class(pipe).__module__)
    if module is None or hasattr(module, "ftfy") or importlib.util.find_spec("ftfy") is not None:
        return
    cleaners = (getattr(module, name, None) for name in ("prompt_clean", "basic_clean"))
    if any("ftfy" in getattr(getattr(f, "__code__", None), "co_names", ()) for f in cleaners):
        module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


def _pipeline_class(pipe) -> type:
    """The pipeline's own class (parallelize wraps it in a subclass whose __call__ takes *args, **kwargs)."""
    return getattr(type(pipe), "_distrifusion_base", type(pipe))


def pipeline_info(pipe) -> dict:
    """What the front needs to know of the pipeline: whether it makes videos (its call takes `num_frames`)
    and whether it takes a first frame (`image`: "required", "optional" or "none")."""
    import inspect

    params = _call_parameters(pipe)
    image = params.get("image")
    takes = "none" if image is None else "required" if image.default is inspect.Parameter.empty else "optional"
    return {"video": "num_frames" in params, "image_input": takes}


def run_job(pipe, job: dict, embedded: bool, on_step) -> tuple[list, dict]:
    """The images of one job (PIL), or a video job's frames ((frames, height, width, 3) in [0, 1]), and its
    timings; `on_step(step)` after every denoising step."""
    import torch

    denoiser = denoiser_of(pipe)
    state = denoiser._distrifusion_state
    mode = job["mode"]
    if mode == "auto":  # the server's --mode auto: what parallelize planned at start-up
        mode = state.auto_plan["best"]["mode"] if state.auto_plan else "sync"
    for model in denoisers_of(pipe):  # Wan 2.2 A14B: both experts
        own = model._distrifusion_state
        own.config = dataclasses.replace(own.config, mode=mode)
    video = job.get("kind") == "video"
    params = _call_parameters(pipe)
    # A step's end, where the pipeline says so: a guided video step calls the model twice (prompt, negative).
    by_callback = video and "callback_on_step_end" in params
    calls, marks = [0], {}

    def after(module, inputs, output):
        calls[0] += 1
        marks.setdefault("first", time.perf_counter())
        marks["last"] = time.perf_counter()
        if not by_callback:
            on_step(calls[0])

    def step_end(pipe, step, timestep, tensors):
        on_step(step + 1)
        return {}

    hooks = [model.register_forward_hook(after) for model in denoisers_of(pipe)]
    generator = torch.Generator().manual_seed(job["seed"])
    size = dict(height=job["height"], width=job["width"], num_inference_steps=job["steps"], generator=generator)
    if video:
        size["num_frames"] = job["frames"]
        if by_callback:
            size["callback_on_step_end"] = step_end
    start = time.perf_counter()
    try:
        if embedded and video:
            out = pipe(job["prompt"], **size).frames[0]
        elif embedded:
            out = pipe([job["prompt"]] * job["n"], **size).images
        else:
            extra = {} if job["guidance_scale"] is None else {"guidance_scale": job["guidance_scale"]}
            if job["negative_prompt"]:
                extra["negative_prompt"] = job["negative_prompt"]
            if video:
                if job.get("image") is not None:
                    extra["image"] = _image(job["image"])
                elif params.get("image") is not None and params["image"].default is params["image"].empty:
                    raise ValueError("this image-to-video pipeline needs a first frame: give input_reference")
                if "output_type" in params:
                    extra["output_type"] = "np"
                out = pipe(prompt=job["prompt"], **size, **extra).frames[0]
            else:
                out = pipe(prompt=job["prompt"], num_images_per_prompt=job["n"], **size, **extra).images
    finally:
        for hook in hooks:
            hook.remove()
    end = time.perf_counter()
    denoising = marks.get("last", end) - marks.get("first", start)
    return out, {"denoising_s": denoising, "run_s": end - start}


def _call_parameters(pipe) -> dict:
    import inspect

    return dict(inspect.signature(_pipeline_class(pipe).__call__).parameters)


def _image(data: bytes):
    """A request's first frame (PNG/JPEG/WebP bytes, checked by the front) as an RGB PIL image."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def write_clip(frames, job: dict) -> dict:
    """Rank 0: the job's MP4 and its thumbnail (the first frame, JPEG) at the store's paths for it, each
    through a temporary name in the store's folder. Returns what the front shows of the clip."""
    import os

    from PIL import Image

    from .video import to_uint8, write_video

    paths = clip_paths(job["clip_dir"], job["id"])
    write_video(frames, paths["video"], job["fps"])
    pixels = to_uint8(frames)
    thumbnail = paths["thumbnail"]
    tmp = thumbnail.with_name(f".{thumbnail.name}.{os.getpid()}.tmp.jpg")
    try:
        Image.fromarray(pixels[0]).save(tmp, format="JPEG", quality=90)
        os.replace(tmp, thumbnail)
    finally:
        tmp.unlink(missing_ok=True)
    return {"frames": len(pixels), "height": pixels.shape[1], "width": pixels.shape[2]}


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
        connection.send(("ready", {"world_size": world, "device": str(state.runtime.device), **pipeline_info(pipe)}))
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
            out, timings = run_job(pipe, job, embedded, report)
        except (ValueError, TypeError) as refusal:  # raised alike on every rank, before any collective
            if rank == 0:
                connection.send(("failed", job["id"], 422, str(refusal)))
            continue
        if rank != 0:
            continue
        start = time.perf_counter()
        if job.get("kind") == "video":
            try:
                clip = write_clip(out, job)
            except Exception as e:  # noqa: BLE001 - rank 0's own failure to write: the job's, not the group's
                connection.send(("failed", job["id"], 500, f"writing the clip failed: {type(e).__name__}: {e}"))
                continue
            timings["encode_s"] = time.perf_counter() - start
            connection.send(("done", job["id"], [], timings, clip))
        else:
            pngs = [png_bytes(image) for image in out]
            timings["encode_s"] = time.perf_counter() - start
            connection.send(("done", job["id"], pngs, timings))
    if control is not None:
        dist.barrier(group=control)
