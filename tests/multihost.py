"""A two-host test bed on one machine: two network namespaces joined by a veth pair, each running
`torchrun --nnodes 2 --nproc-per-node N` with c10d rendezvous (host 0 is the rendezvous host).

    with TwoHosts() as bed:                       # skips (pytest) where namespaces cannot be made
        bed.start(["generate", "--model", "embedded", ...])
        bed.wait(timeout=120)                     # every agent's exit code, output in bed.output(i)

Everything started here runs inside one of the two namespaces, so `ip netns pids` lists exactly our
processes (agents, workers, anything they fork): cleanup SIGKILLs those PIDs, then deletes the
namespaces (which removes the veth pair), in a `finally` / `__exit__` even when a test fails.
Each namespace gets `net.ipv4.tcp_retries2=5` (README's setting; `tcp_retries2=None` keeps the
kernel's 15): with the link cut, torchrun's agent otherwise stays blocked in a store request ~15 min.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ADDRS = ("10.77.0.1", "10.77.0.2")  # private to our two namespaces: no clash with the machine's own
PORT = 29400


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN)"
    name = f"dfprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def pid_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TwoHosts:
    """Two namespaces `<tag>h0`, `<tag>h1` with a veth pair `<tag>v0` - `<tag>v1` (names unique per
    bed, 15 characters at most), addresses ADDRS, loopback up in both."""

    def __init__(self, nproc_per_node: int = 2, tcp_retries2: int | None = 5) -> None:
        self.tag = f"df{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
        self.ns = [f"{self.tag}h{i}" for i in range(2)]
        self.veth = [f"{self.tag}v{i}" for i in range(2)]
        self.nproc = nproc_per_node
        self.tcp_retries2 = tcp_retries2
        self.dir = Path(tempfile.mkdtemp(prefix="distrifusion-multihost-"))
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.started_at: float | None = None
        self.made = False

    # -- the namespaces ------------------------------------------------------------------------

    def __enter__(self) -> TwoHosts:
        reason = unavailable()
        if reason:
            import pytest

            pytest.skip(f"two-host test bed: {reason}")
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        self.made = True
        for ns in self.ns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, addr in zip(self.ns, self.veth, ADDRS, strict=True):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", veth, "up")
            if self.tcp_retries2 is not None:  # per namespace: how long TCP retransmits to a silent peer
                _ip("netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_retries2={self.tcp_retries2}")

    def link(self, up: bool) -> None:
        """Cut (or restore) the link between the hosts: host 0's end of the veth down."""
        _ip("-n", self.ns[0], "link", "set", self.veth[0], "up" if up else "down")

    def pids(self, host: int | None = None) -> list[int]:
        """Every process in a host's namespace (both hosts: None), zombies of ours included."""
        found = []
        for ns in self.ns if host is None else [self.ns[host]]:
            out = _ip("netns", "pids", ns, check=False).stdout
            found += [int(p) for p in out.split()]
        return found

    def live_pids(self, host: int | None = None) -> list[int]:
        """As `pids`, without zombies (a dead worker its agent has not reaped yet)."""
        live = []
        for pid in self.pids(host):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                live.append(pid)
        return live

    def workers(self, host: int) -> dict[int, int]:
        """Global rank -> PID of the workers now running on `host`."""
        out = {}
        for pid in self.pids(host):
            env = pid_env(pid)
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and "distrifusion" in pid_cmdline(pid):
                out[int(env["RANK"])] = pid
        return out

    def close(self) -> None:
        """SIGKILL every process in our namespaces (by PID), reap our agents, delete the namespaces."""
        if self.made:
            for _ in range(50):
                pids = self.pids()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                for p in self.procs:
                    if p.poll() is None:
                        try:
                            p.wait(timeout=0.1)
                        except subprocess.TimeoutExpired:
                            pass
                time.sleep(0.1)
            for ns in self.ns:
                _ip("netns", "del", ns, check=False)
            self.made = False
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- torchrun --------------------------------------------------------------------------------

    def torchrun_argv(
        self,
        host: int,
        argv: list[str],
        max_restarts: int = 0,
        run_id: str = "job",
        rdzv_conf: str = "",
        extra: tuple = (),
    ) -> list[str]:
        """The torchrun command for `host` (also what README shows, with real addresses)."""
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            str(self.nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"{ADDRS[0]}:{PORT}",
            "--rdzv-id",
            run_id,
            "--rdzv-conf",
            f"is_host={int(host == 0)}" + (f",{rdzv_conf}" if rdzv_conf else ""),
            "--local-addr",
            ADDRS[host],
            "--max-restarts",
            str(max_restarts),
            *extra,
            "-m",
            "distrifusion",
            *argv,
        ]

    def start(
        self, argv: list[str], env: dict | None = None, max_restarts: int = 0, rdzv_conf: str = "", extra: tuple = ()
    ) -> None:
        """Start both agents, `distrifusion ARGV` as their workers; output to a log per host."""
        self.started_at = time.monotonic()
        for host in range(2):
            log = self.dir / f"host{host}.log"
            self.logs.append(log)
            host_env = dict(
                os.environ,
                GLOO_SOCKET_IFNAME=self.veth[host],
                OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1",
                **(env or {}),
            )
            with open(log, "wb") as f:
                self.procs.append(
                    subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            self.ns[host],
                            *self.torchrun_argv(host, argv, max_restarts, rdzv_conf=rdzv_conf, extra=extra),
                        ],
                        env=host_env,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        cwd=self.dir,
                        start_new_session=True,
                    )
                )

    def output(self, host: int) -> str:
        try:
            return self.logs[host].read_text(errors="replace")
        except (OSError, IndexError):
            return ""

    def all_output(self) -> str:
        return "".join(f"---- host {h} ----\n{self.output(h)}\n" for h in range(len(self.logs)))

    def wait_for(self, pattern: str, timeout: float, host: int = 0) -> float:
        """Wait until `pattern` (a regex) shows in a host's output; return the monotonic time it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output(host)):
                return time.monotonic()
            if all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen on host {host} within {timeout} s\n{self.all_output()}")

    def wait(self, timeout: float, detect: str | None = None) -> dict:
        """Wait until every process in both namespaces is gone (or `timeout`): the agents' exit codes,
        when each agent ended, when the last process ended and when `detect` (a regex) first showed in
        any output (monotonic times, 50 ms resolution), and what is still alive."""
        deadline = time.monotonic() + timeout
        ended: dict[int, float] = {}
        detected = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if detect and detected is None and re.search(detect, self.all_output()):
                detected = now
            for i, p in enumerate(self.procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = now
            if len(ended) == len(self.procs) and not self.live_pids():
                break
            time.sleep(0.05)
        left = {pid: pid_cmdline(pid)[:120] for pid in self.live_pids()}
        if detect and detected is None and re.search(detect, self.all_output()):
            detected = time.monotonic()
        return {
            "codes": [p.poll() for p in self.procs],
            "ended": [ended.get(i) for i in range(len(self.procs))],
            "all_gone": None if left else time.monotonic(),
            "detected": detected,
            "left": left,
        }
