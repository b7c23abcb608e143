"""`distrifusion serve` in a process of its own on loopback, for the server tests (tests/test_serve.py,
tests/test_web_page.py) and the load test (benchmarks/load_test.py, which puts tests/ on its path as
netem_bench.py does for multihost.py): started on a given port with its output collected, waited for on
/health, its ranks found in /proc, and stopped so that no rank outlives it, whatever happened.

It lives with the tests rather than in the package: it is a client of the command (a subprocess driven
over HTTP with httpx, a test dependency), not a part of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx


def serve_command(port: int, flags: Sequence[str]) -> list[str]:
    """The command line of `distrifusion serve` on `port` with `flags`, in this Python."""
    return [sys.executable, "-m", "distrifusion", "serve", "--port", str(port), *flags]


class ServeProcess:
    """`python -m distrifusion serve --port PORT FLAGS`, its output (stdout and stderr) gathered in
    `output` and, with `log`, appended to that file as it comes; waited for until ready (`startup_s`,
    the seconds it took), and stopped if it is not ready within `ready_timeout` seconds."""

    def __init__(
        self,
        port: int,
        flags: Sequence[str],
        ready_timeout: float,
        stop_grace: float,
        env: dict | None = None,
        log: Path | None = None,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = serve_command(port, flags)
        self.proc = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.log = log
        self.stop_grace = stop_grace
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.startup_s = self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if self.log:
                with open(self.log, "a") as f:
                    f.write(line)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until GET /health answers 200 (the worker group is ready). RuntimeError, with the
        server's output, if it exits first or is not ready within `timeout` seconds."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{''.join(self.output)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server was not ready in {timeout:.0f} s:\n{''.join(self.output)}")

    def ranks(self) -> list[int]:
        """The rank processes: the children of any of the server's threads (its dispatcher thread starts
        them), from /proc; none once the server has exited."""
        children = []
        try:
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                children += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:
            pass
        return children

    def stop(self, ranks: Iterable[int] = ()) -> int | None:
        """SIGTERM (the server drains and stops its ranks), SIGKILL after `stop_grace` seconds; then SIGKILL
        every rank still alive: its ranks of now and `ranks` (those a caller saw earlier, in case the
        server died and left them). Returns the server's exit code."""
        left = set(ranks) | (set(self.ranks()) if self.proc.poll() is None else set())
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                print(f"killed a rank left behind (pid {pid})", file=sys.stderr)
            except ProcessLookupError:
                pass
        return self.proc.returncode
