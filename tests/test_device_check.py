"""benchmarks/device_check.sh, the one command a lent GPU runs, in its small mode on the CPU: the same
runner and steps at tiny sizes. What it must guarantee on the device, checked here:

- at most 8 files come back (the device tool returns no more): results.jsonl, device_check.log and
  artifacts.tar.gz, whatever the steps do;
- each step's result is written the moment it ends (a later step's hang cannot take it away);
- a step that fails or hangs is ended at its limit and the others keep their results;
- the per-step budget table in the script agrees with the runner's limits and fits in 300 s.

The default test runs four steps for real (three bench steps forked from the runner) and two injected
ones, one failing between them and one hanging last (~20 s of CPU); the whole small mode, every step
real, is marked slow.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import device_check  # noqa: E402

OUT_FILES = {"results.jsonl", "device_check.log", "artifacts.tar.gz"}


def _run(out: Path, steps: list[str], inject: list[str], timeout: float) -> tuple[int, list[int], str]:
    """device_check.sh in small mode; its exit code, the line counts of results.jsonl seen while it ran,
    and its output. Its process group is always killed at the end."""
    env = {**os.environ, "OUT": str(out), "DEVICE_CHECK_SMALL": "1", "DEVICE_CHECK_STEPS": " ".join(steps)}
    env["DEVICE_CHECK_INJECT"] = " ".join(inject)
    proc = subprocess.Popen(
        ["bash", "benchmarks/device_check.sh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen, deadline = [], time.monotonic() + timeout
    results = out / "results.jsonl"
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "device_check.sh did not end in time"
            if results.exists():
                seen.append(sum(1 for line in results.read_text().splitlines() if line.strip()))
            time.sleep(0.05)
        return proc.returncode, seen, proc.stdout.read()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def test_small_mode_keeps_every_steps_result_through_a_failure_and_a_hang(tmp_path):
    steps = ["environment", "sdxl", "flux", "vae", "codec", "compile"]  # the runner's order
    code, seen, output = _run(tmp_path, steps, ["flux=fail", "compile=hang"], timeout=200)
    assert code == 1, output[-3000:]  # some step did not succeed
    assert {p.name for p in tmp_path.rglob("*")} == OUT_FILES  # 3 files, no folder: within the tool's 8
    records = _records(tmp_path)
    assert [r["step"] for r in records] == steps
    status = {r["step"]: r["status"] for r in records}
    assert status == dict(environment="ok", sdxl="ok", flux="failed", vae="ok", codec="ok", compile="timed out")
    by_step = {r["step"]: r for r in records}
    # The steps kept their measurements through the failure and the hang; the hang was ended at its limit.
    sdxl_shares = [row["ranks"] for row in by_step["sdxl"]["rows"] if "ranks" in row]
    assert sdxl_shares[:3] == [2, 4, 8] and all(row["share_step_s"] > 0 for row in by_step["sdxl"]["rows"])
    assert len(by_step["vae"]["rows"]) >= 4 and len(by_step["codec"]["rows"]) == 2
    assert {row["compress"] for row in by_step["codec"]["rows"]} == {None, "residual-int2"}
    assert by_step["flux"]["rc"] == 3 and "rows" not in by_step["flux"] and by_step["compile"]["seconds"] < 10
    # Written as each step ended: every earlier line was on disk while the last step hung, and the steps
    # ran one after the other.
    assert seen == sorted(seen) and len(steps) - 1 in seen
    for before, after in zip(records, records[1:]):
        assert before["ended"] <= after["started"]
    with tarfile.open(tmp_path / "artifacts.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"sdxl.jsonl", "sdxl.log", "flux.log", "vae.jsonl", "codec.jsonl", "compile.log"} <= names
    log = (tmp_path / "device_check.log").read_text()
    assert "=== flux: failed" in log and "injected failure" in log and "=== codec: ok" in log


@pytest.mark.slow
def test_small_mode_runs_every_step(tmp_path):
    """Every step for real at tiny sizes (pytest steps, forked bench steps, the command line): all ok.
    Several minutes of CPU (dynamo's trace of the compile step, the ranks of generate)."""
    code, _, output = _run(tmp_path, [s.name for s in device_check.STEPS], [], timeout=600)
    records = _records(tmp_path)
    assert code == 0 and all(r["status"] == "ok" for r in records), output[-3000:]
    assert {p.name for p in tmp_path.rglob("*")} == OUT_FILES


def _table() -> dict[str, list[str]]:
    """The budget table of device_check.sh: step name -> its cells (continuation rows left out)."""
    rows = {}
    for line in (ROOT / "benchmarks" / "device_check.sh").read_text().splitlines():
        if line.startswith("# |") and not line.startswith("# |--"):
            cells = [c.strip() for c in line[2:].strip().strip("|").split("|")]
            if cells[0] and cells[0] != "step":
                rows[cells[0]] = cells
    return rows


def _seconds(cell: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?) s", cell)
    assert match, cell
    return float(match.group(1))


def test_the_budget_table_is_the_runners_and_fits_in_300_s():
    table = _table()
    steps = {s.name: s for s in device_check.STEPS}
    assert [name for name in table if name in steps] == list(steps)
    for name, step in steps.items():
        assert _seconds(table[name][3]) == step.limit_s, name
        assert _seconds(table[name][5]) == step.small_limit_s, name
        assert _seconds(table[name][2]) < step.limit_s, name  # the limit leaves room over the estimate
    setup = _seconds(table["(setup)"][3])
    total = setup + sum(s.limit_s for s in device_check.STEPS)
    assert _seconds(table["total"][3]) == total <= device_check.BUDGET_S
    estimates = _seconds(table["(setup)"][2]) + sum(_seconds(table[n][2]) for n in steps)
    assert _seconds(table["total"][2]) == estimates
