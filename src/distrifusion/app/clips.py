"""The finished clips of `distrifusion serve` with a video model: a folder the server makes for itself
(under the system's temporary folder), bounded in bytes and in age, removed when the server stops.

Rank 0 writes a job's clip (`<id>.mp4`) and its thumbnail (`<id>.jpg`) into the folder, under paths the
front names (`clip_paths`: no request field names a path), through temporary names in the same folder;
the front then `add`s them, which counts their bytes and evicts the oldest other clips until the total
is within the bound (a clip larger than the whole bound is refused and removed). A clip older than the
age limit is removed by a sweeper thread (and at every call). Nothing here imports torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VARIANTS = {"video": (".mp4", "video/mp4"), "thumbnail": (".jpg", "image/jpeg")}
"""GET /v1/videos/ID/content?variant=...: the file's suffix and media type."""


def clip_paths(folder: str | Path, job_id: str) -> dict[str, Path]:
    """Where a job's files go: {variant: path} (the job id is the server's, a hex uuid)."""
    if not job_id.isalnum():
        raise ValueError(f"a clip id is alphanumeric, got {job_id!r}")
    return {variant: Path(folder) / f"{job_id}{suffix}" for variant, (suffix, _) in VARIANTS.items()}


class ClipTooLarge(Exception):
    """A finished clip larger than the whole store."""


@dataclass
class Clip:
    bytes: int
    added: float
    """When it was stored (the store's clock: time.monotonic by default)."""


class ClipStore:
    """At most `max_bytes` of finished clips (with their thumbnails), none older than `max_age_s`; why a
    clip went (evicted, expired, deleted) is remembered for the last 1024."""

    def __init__(
        self,
        max_bytes: int,
        max_age_s: float,
        folder: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        sweep_every_s: float | None = None,
    ) -> None:
        if max_bytes < 1 or not max_age_s > 0:
            raise ValueError(f"the clip store needs max_bytes >= 1 and max_age_s > 0, got {max_bytes}, {max_age_s}")
        self.max_bytes, self.max_age_s, self.clock = max_bytes, max_age_s, clock
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="distrifusion-clips-"))
        self.clips: OrderedDict[str, Clip] = OrderedDict()  # oldest first
        self.gone: dict[str, str] = {}  # id -> why its clip was removed (bounded like the jobs)
        self.evictions = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = None
        if sweep_every_s is None:
            sweep_every_s = min(30.0, max(0.5, max_age_s / 4))
        if sweep_every_s > 0:
            self._sweeper = threading.Thread(target=self._sweep_loop, args=(sweep_every_s,), daemon=True)
            self._sweeper.start()

    # -- bookkeeping ------------------------------------------------------------------------------

    def paths(self, job_id: str) -> dict[str, Path]:
        return clip_paths(self.folder, job_id)

    @property
    def total_bytes(self) -> int:
        with self.lock:
            return sum(c.bytes for c in self.clips.values())

    def __len__(self) -> int:
        return len(self.clips)

    def __contains__(self, job_id: str) -> bool:
        self.sweep()
        return job_id in self.clips

    def add(self, job_id: str) -> list[str]:
        """Count a finished clip's files (written by rank 0) and evict the oldest others until the store
        is within its bound; returns the evicted ids. ClipTooLarge (its files removed) if the clip alone
        is over the bound; FileNotFoundError if rank 0 wrote no video."""
        files = self.paths(job_id)
        if not files["video"].is_file():
            raise FileNotFoundError(f"no clip was written for {job_id}")
        size = sum(path.stat().st_size for path in files.values() if path.is_file())
        if size > self.max_bytes:
            self._remove_files(job_id)
            raise ClipTooLarge(
                f"the clip is {size} bytes, more than the server keeps ({self.max_bytes} bytes, --clip-store-mb)"
            )
        evicted = []
        with self.lock:
            self.clips[job_id] = Clip(size, self.clock())
            total = sum(c.bytes for c in self.clips.values())
            while total > self.max_bytes:
                oldest = next(iter(self.clips))  # never the new clip: it fits alone
                total -= self._drop(oldest, f"removed to keep the store within {self.max_bytes} bytes")
                evicted.append(oldest)
        return evicted + self.sweep()

    def sweep(self) -> list[str]:
        """Remove the clips older than the age limit; returns their ids."""
        now = self.clock()
        with self.lock:
            old = [i for i, c in self.clips.items() if now - c.added > self.max_age_s]
            for job_id in old:
                self._drop(job_id, f"expired: clips are kept {self.max_age_s:g} s")
        return old

    def open(self, job_id: str, variant: str = "video"):
        """The clip's file opened for reading (it stays readable if evicted meanwhile), or None."""
        self.sweep()
        with self.lock:
            if job_id not in self.clips:
                return None
            path = self.paths(job_id)[variant]
            return open(path, "rb") if path.is_file() else None

    def discard(self, job_id: str) -> bool:
        """Remove a clip (DELETE, or a job that failed after writing): its files and any temporary ones
        a rank killed mid-write left behind. True if a stored clip was removed."""
        with self.lock:
            stored = job_id in self.clips
            if stored:
                self._drop(job_id, "deleted")
            else:
                self._remove_files(job_id)
        return stored

    def forget(self, job_id: str) -> None:
        """The server forgot the job: its clip goes too, and why it went."""
        self.discard(job_id)
        with self.lock:
            self.gone.pop(job_id, None)

    def why_gone(self, job_id: str) -> str | None:
        return self.gone.get(job_id)

    def close(self) -> None:
        """Stop the sweeper and remove the folder with everything in it."""
        self._stop.set()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- internals --------------------------------------------------------------------------------

    def _drop(self, job_id: str, why: str) -> int:
        """With the lock held: forget the clip, remove its files, remember why. Returns its bytes."""
        clip = self.clips.pop(job_id)
        self._remove_files(job_id)
        self.gone[job_id] = why
        while len(self.gone) > 1024:
            self.gone.pop(next(iter(self.gone)))
        if why != "deleted":
            self.evictions += 1
        return clip.bytes

    def _remove_files(self, job_id: str) -> None:
        for path in self.paths(job_id).values():
            path.unlink(missing_ok=True)
        for stray in self.folder.glob(f".{job_id}.*"):  # write_video's temporary names
            stray.unlink(missing_ok=True)

    def _sweep_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                self.sweep()
            except OSError:  # the folder went (closed): nothing left to sweep
                pass


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the regular files in `folder` (what the store holds on disk, written or being written)."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass
    return total
