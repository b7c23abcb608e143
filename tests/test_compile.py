"""torch.compile of a parallelised model, on 2 gloo ranks: the same image as eager.

Dynamo compiles the model's own forward and breaks its graph at every exchange (the collectives
and the exchange buffers stay outside the graphs, see `ParallelState`), so that compiled and
eager steps run the same exchanges in the same order. The default test compiles with the
"aot_eager" backend (dynamo and AOTAutograd, where the reported crash was, without inductor's C++
compilation); the slow one with inductor, the default backend.
"""

import time

import pytest
import torch
from helpers import denoise, run_ranks, tiny_model

import distrifusion

HEIGHT, WIDTH, STEPS = 20, 12, 4  # 5 blocks of 4 latent rows: uneven strips (3 + 2 blocks)
# Of the output's scale, after 4 float32 steps. aot_eager runs eager's kernels (measured: equal);
# inductor's fused kernels differ as much from eager in one process (measured 7e-5) as here (8e-5).
TOL = {"aot_eager": 1e-6, "inductor": 5e-4}
ONE_TOL = 5e-4  # float32 patch parallelism against one process (eager or compiled: both 8e-5 measured)


def _image(model):
    distrifusion.reset(model)
    return denoise(model, "sd15", HEIGHT, WIDTH, steps=STEPS, dtype=torch.float32)


def compile_job(backend: str) -> dict:
    """Eager and compiled images on this rank: displaced with `torch.compile(model)` after
    `parallelize`, sync with `model.compile()` before it; each compiled image twice (the second
    with no compilation left to do)."""
    out = {}
    for mode, how in [("displaced", "torch.compile after"), ("sync", "model.compile before")]:
        cfg = distrifusion.ParallelConfig(mode=mode, warmup_steps=1)
        eager = distrifusion.parallelize(tiny_model("sd15", dtype=torch.float32), cfg)
        out[mode, "eager"] = _image(eager)
        model = tiny_model("sd15", dtype=torch.float32)
        if how == "model.compile before":
            model.compile(backend=backend)
            distrifusion.parallelize(model, cfg)
        else:
            model = torch.compile(distrifusion.parallelize(model, cfg), backend=backend)
        out[mode, "compiled"] = _image(model)
        start = time.perf_counter()
        out[mode, "again"] = _image(model)
        out[mode, "again_s"] = time.perf_counter() - start
        out[mode, "eager_s"] = time.perf_counter()
        _image(eager)
        out[mode, "eager_s"] = time.perf_counter() - out[mode, "eager_s"]
    return out


def _check(backend: str) -> None:
    ranks = run_ranks(2, compile_job, backend)
    one = denoise(tiny_model("sd15", dtype=torch.float32), "sd15", HEIGHT, WIDTH, steps=STEPS, dtype=torch.float32)
    scale = one.abs().max()
    for mode in ("displaced", "sync"):
        eager = ranks[0][mode, "eager"]
        for r in ranks:
            assert torch.equal(r[mode, "compiled"], ranks[0][mode, "compiled"]), "ranks disagree"
            for run in ("compiled", "again"):
                err = (r[mode, run] - eager).abs().max() / scale
                assert err < TOL[backend], f"{mode}, {run}: {err:.2e} of the output's scale from eager"
        # The compiled image is not re-traced at every step (guards that depend on the step counter).
        assert ranks[0][mode, "again_s"] < 20 * ranks[0][mode, "eager_s"] + 2
    # Sync mode is exact patch parallelism: the compiled image is the one process's.
    for run in ("eager", "compiled"):
        assert (ranks[0]["sync", run] - one).abs().max() / scale < ONE_TOL


def test_compiled_parallel_model_matches_eager():
    _check("aot_eager")


@pytest.mark.slow
def test_compiled_with_inductor_matches_eager():
    _check("inductor")
