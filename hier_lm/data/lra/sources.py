"""Shared pieces of the LRA readers: finding a release folder under `data.path`, and texts as byte sequences."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def find_folder(path: str | Path, names: Sequence[str], subfolders: Sequence[str], what: str) -> Path:
    """The first of `path` and `path/<subfolder>` that holds every file or folder of `names` (a release's
    layout, e.g. the tsv_data/ of lra_release); else a `FileNotFoundError` naming what to pass."""
    path = Path(path).expanduser()
    for folder in (path, *(path / sub for sub in subfolders)):
        if all((folder / name).exists() for name in names):
            return folder
    raise FileNotFoundError(f"no {', '.join(names)} in {path} (nor in {', '.join(subfolders)} below it): pass "
                            f"data.path={what}")


def text_bytes(text: str | bytes) -> np.ndarray:
    """`uint8 [n]`: the UTF-8 bytes of `text` (bytes are kept as they are)."""
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8)
