"""`--nproc N` without torchrun: run a command as N local ranks and wait for them.

The launcher spawns the ranks, copies rank 0's output to its own, stops every rank on SIGINT/SIGTERM or
once one has failed, reaps them all and reports the failure once (a rank leaves its error in the run
folder, `RUN_DIR`, through `cli.report_error`). `as_rank` is the ranks' side of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RUN_DIR = "DISTRIFUSION_RUN_DIR"
"""Set by `launch` for its ranks: where a rank leaves its error for the launcher to report once."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def as_rank() -> None:
    """A rank of our launcher ends at once and silently on SIGINT/SIGTERM (the launcher reports), and
    with the launcher if that dies."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if str(os.getppid()) != os.environ.get("DISTRIFUSION_LAUNCHER_PID", str(os.getppid())):
        os._exit(143)  # the launcher is already gone


def as_torchrun_worker() -> None:
    """A torchrun worker ends (SIGKILL) when its agent dies. torchrun starts its workers in sessions of
    their own (start_new_session) and nothing else stops them: a killed agent would leave its host's ranks
    computing or waiting in a collective with nobody watching."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before that
        os._exit(137)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def launch(nproc: int, argv: list[str], env: dict | None = None, t0: float | None = None, verbose: bool = False) -> int:
    """Run this command as `nproc` local ranks (gloo on CPU, nccl on CUDA) and wait for them.

    A rank's error is reported once, by this launcher (the first rank to fail names the cause; the
    others are stopped after a moment). SIGINT/SIGTERM stop every rank within seconds: one line,
    exit 130/143. Ranks other than 0 keep their output in a log unless `verbose`.
    """
    run_dir = tempfile.mkdtemp(prefix="distrifusion-")
    cores = os.cpu_count() or 1
    base = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        DISTRIFUSION_T0=str(t0 or time.time()),
        DISTRIFUSION_LAUNCHER_PID=str(os.getpid()),
        **{RUN_DIR: run_dir},
    )
    base.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # ranks share the cores instead of fighting
    base.update(env or {})
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda s, f: received.append(s))
        for sig in (signal.SIGINT, signal.SIGTERM)
        # Not where SIGINT is ignored (as nohup or a background job asked), nor off the main thread (Python refuses).
        if signal.getsignal(sig) is not signal.SIG_IGN and threading.current_thread() is threading.main_thread()
    }
    procs: list[subprocess.Popen] = []
    logs = []
    relay = None
    try:
        for rank in range(nproc):
            log = None
            if rank > 0 and not verbose:
                log = open(os.path.join(run_dir, f"rank{rank}.log"), "wb")  # noqa: SIM115 - closed below
                logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distrifusion", *argv],
                    env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=log,
                    stderr=subprocess.STDOUT if log else subprocess.PIPE if rank == 0 else None,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only, which stops the ranks
                )
            )
            if rank == 0:
                relay = _Relay(procs[0].stderr)
                relay.start()
        failed_at = None
        while True:
            if received:
                stopped = _stop(procs)
                relay.say(f"distrifusion: interrupted; {stopped} rank{'s' * (stopped != 1)} stopped")
                return 128 + received[0]
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                return 0
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()
                first = next(r for r, c in enumerate(codes) if c not in (None, 0))
            if failed_at is not None and (all(c is not None for c in codes) or time.monotonic() - failed_at > 2):
                _stop(procs)  # the others had a moment to fail by themselves (with the same error, often)
                return _report_failure(procs, run_dir, relay, first)
            time.sleep(0.05)
    finally:
        _stop(procs)
        if relay is not None:
            relay.join(timeout=2)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for log in logs:
            log.close()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


class _Relay(threading.Thread):
    """Copies rank 0's stderr (its progress bar) to ours and knows whether it was left mid-line, so that
    the launcher's own message starts on a line of its own."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self.pipe, self.mid_line = pipe, False

    def run(self) -> None:
        with self.pipe:
            while chunk := os.read(self.pipe.fileno(), 65536):
                os.write(2, chunk)
                self.mid_line = not chunk.endswith(b"\n")

    def say(self, line: str) -> None:
        self.join(timeout=2)  # the ranks have ended: their last words first
        sys.stderr.write(("\n" if self.mid_line else "") + line + "\n")
        sys.stderr.flush()


def _stop(procs: list[subprocess.Popen], grace: float = 5.0) -> int:
    """SIGTERM every running rank (SIGCONT too, in case it is stopped), SIGKILL what is left after `grace`
    seconds, reap all; return how many were stopped or had died by a signal."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return sum(1 for p in procs if p.returncode is not None and p.returncode < 0)


def _report_failure(procs: list[subprocess.Popen], run_dir: str, relay: _Relay, first: int) -> int:
    """One line for the rank that failed first (`first`, as the launcher saw it); its code (2 bad input,
    1 a failure). Ranks that all failed with the same message are not named."""
    errors = {}
    for rank in range(len(procs)):
        path = Path(run_dir, f"error.{rank}")
        if path.exists():
            try:
                errors[rank] = json.loads(path.read_text())
            except ValueError:
                pass
    if first in errors:
        message, code = errors[first]["message"], errors[first]["code"]
        everywhere = len(errors) == len(procs) and len({e["message"] for e in errors.values()}) == 1
        relay.say(f"distrifusion: error{'' if everywhere else f' on rank {first}'}: {message}")
        return code
    # It ended without a message of its own (killed, crashed): say how, and show its last words.
    relay.say(f"distrifusion: rank {first} failed ({_describe_exit(procs[first].returncode)}); the others were stopped")
    log = Path(run_dir, f"rank{first}.log")
    if log.exists():
        for line in log.read_text(errors="replace").strip().splitlines()[-5:]:
            print(f"  rank {first}: {line}", file=sys.stderr)
    return 1
