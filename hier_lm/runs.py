"""Run folders: a new one per run (unique across processes), the lock a run holds while it writes one, and the
`<runs_dir>/<recipe>/last` link to the newest run that started training."""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import time
from pathlib import Path

LOCK_FILE = ".lock"  # <run>/.lock: held (flock) by the process writing the run, holding its pid


def new_run_dir(group: Path) -> Path:
    """Create and return `<group>/<timestamp>`, or `<timestamp>-<n>` when that exists. `mkdir` claims the name
    atomically, so processes starting within one second (a sweep's jobs, two launches) get different folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count():
        run_dir = group / (f"{stamp}-{n}" if n else stamp)
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue


def outermost_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist (what creating `path` creates); None if it
    exists."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def remove_run_dir(run_dir: Path, top: Path) -> None:
    """Delete the folder of a run that failed to start, and its parents up to `top` (the outermost folder created
    for it) where they are empty (another run may have started beside it)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in run_dir.parents:
        if not folder.is_relative_to(top):
            break
        try:
            folder.rmdir()
        except OSError:  # not empty
            break


def point_last(group: Path, run_dir: Path) -> None:
    """Atomically make `<group>/last` a symlink to `run_dir`."""
    tmp = group / f".last.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name if run_dir.parent == group else run_dir.resolve())
    os.replace(tmp, group / "last")


class RunLock:
    """An exclusive `flock` on `<run_dir>/.lock` (which holds the holder's pid) while a run writes the folder; a
    second run into it is refused at once, naming the holder. The kernel drops the lock when the holder exits, so a
    crashed run leaves none behind (at most a stale `.lock` file, taken over by the next run). `release` deletes the
    file, so a finished or refused run leaves the folder as it found it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(f"{self.path.parent} is in use by a running run (pid {pid}): wait for it to end or "
                                 f"stop it (kill -INT {pid} saves a checkpoint first); a new run takes a new folder "
                                 f"(leave run_dir= unset)") from None
            if self._still_linked(fd):  # else its holder deleted the file as we opened it: lock the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Delete the lock file and drop the lock (idempotent)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: whoever opened it meanwhile sees it gone, retries
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
