"""Atomic file writes for the whole project: a reader sees the old file or the new one, never half of one.

A leaf module (standard library and torch only), so that data, checkpoints and entry points share one helper.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it over `path`:
    readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # the name `remove_stale_temporaries` knows
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_write` calls of other processes left in `folder` (a process
    killed during a write leaves its `.<name>.tmp<pid>`); returns them. Only for a folder this process alone
    writes (e.g. a locked run's checkpoints)."""
    stale = [p for p in Path(folder).glob(".*.tmp*") if p.is_file() and
             (m := re.fullmatch(r"\..+\.tmp(\d+)", p.name)) and int(m.group(1)) != os.getpid()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text through `atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))
