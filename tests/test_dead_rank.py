"""A rank that dies mid-image must not leave the others blocked: their next collective fails
(gloo sees the closed connection, or the collective timeout fires) and they exit."""

import os
import time

from helpers import BLOCK, denoise, run_ranks, tiny_model

import distrifusion


def dying_rank_job() -> dict:
    model = tiny_model("sd15")
    distrifusion.parallelize(model, distrifusion.ParallelConfig(mode="sync", split_cfg=False, timeout_s=30))
    rank = int(os.environ["RANK"])
    calls = 0

    def die_on_third_call(module, args):
        nonlocal calls
        calls += 1
        if rank == 1 and calls == 3:
            os._exit(0)  # vanish without any goodbye (exit code 0 so the launcher waits for rank 0)

    model.register_forward_pre_hook(die_on_third_call)
    start = time.perf_counter()
    try:
        denoise(model, "sd15", 4 * BLOCK, 3 * BLOCK, steps=6)
    except Exception as e:  # noqa: BLE001 - the failure is the result
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}
    return {"error": None}


def test_survivor_fails_fast_instead_of_hanging():
    start = time.perf_counter()
    results = run_ranks(2, dying_rank_job)
    assert results[0]["error"] is not None
    assert results[0]["seconds"] < 40  # within the 30 s collective timeout (gloo usually notices at once)
    assert time.perf_counter() - start < 120
