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


def roll_call_job(silent_rank: int | None) -> dict:
    """Every rank but `silent_rank` answers the roll call (a rank that hangs or died answers nothing)."""
    from distrifusion.engine.comm import init_runtime, roll_call

    init_runtime(timeout_s=30)
    rank = int(os.environ["RANK"])
    if rank == silent_rank:
        time.sleep(4)  # outlasts the others' 2 s window; then leaves (its answer would come too late)
        return {"said": None}
    start = time.perf_counter()
    said = roll_call(window_s=2.0)
    return {"said": said, "seconds": time.perf_counter() - start}


def test_roll_call_names_the_rank_that_does_not_answer():
    results = run_ranks(3, roll_call_job, 2)
    for result in results[:2]:
        assert result["said"] is not None and "from rank 2 (" in result["said"], result
        assert "rank 0" not in result["said"] and "rank 1" not in result["said"]
        assert "127.0.0.1" in result["said"]  # the address it reaches the rendezvous from
        assert 1.9 < result["seconds"] < 4.5  # waited the window, and no longer


def test_roll_call_with_every_rank_answering_says_nothing_and_returns_at_once():
    results = run_ranks(3, roll_call_job, None)
    assert all(r["said"] is None for r in results), results
    assert all(r["seconds"] < 1.9 for r in results), results  # did not wait out the window


def _listening(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    found.append(local.rsplit(":", 1)[0])
    return found


def test_the_rendezvous_store_of_local_ranks_listens_on_loopback_only(monkeypatch):
    from datetime import timedelta

    from helpers import free_port

    from distrifusion.engine.comm import _loopback_store

    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    store = _loopback_store(timedelta(seconds=10), 1)
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert _listening(port) == ["0100007F"]  # 127.0.0.1, not every interface
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # another machine's address: torch's own store
    assert _loopback_store(timedelta(seconds=10), 1) is None
