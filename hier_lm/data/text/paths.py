"""Which files a byte corpus reads: globs, folders, files, or the Python standard library."""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path


def stdlib_files() -> list[Path]:
    """All `*.py` files of the running interpreter's standard library (no site-/dist-packages), sorted by
    relative POSIX path."""
    root = os.path.abspath(sysconfig.get_paths()["stdlib"])
    files = []
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        files += [os.path.join(parent, n) for n in names if n.endswith(".py")]
    return sorted((Path(f) for f in files if os.path.isfile(f)), key=lambda p: p.relative_to(root).as_posix())


def _files_under(folder: str) -> list[str]:
    """Regular files under `folder`, recursively, skipping hidden files and folders (`.git`, ...)."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, n) for n in names if not n.startswith(".")]
    return [f for f in found if os.path.isfile(f)]


def resolve_paths(paths: Sequence[str]) -> list[Path]:
    """Expand `paths` into a sorted, de-duplicated list of absolute regular-file paths.

    Each entry is a glob (`**` recursive; `~` and `$VARS` expanded; only the files it matches count), a
    file, a folder (every non-hidden file under it) or the word `stdlib` (`stdlib_files()`). An entry that
    matches no file is a `FileNotFoundError` naming it.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise ValueError("data.paths is empty: pass globs, files or folders, e.g. data.paths=['src/**/*.py']")
    found: set[str] = set()
    unmatched = []
    for entry in map(str, entries):
        if entry == "stdlib":
            matches = [str(p) for p in stdlib_files()]
        else:
            pattern = os.path.expandvars(os.path.expanduser(entry))
            if glob.has_magic(pattern):
                matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
            elif os.path.isdir(pattern):
                matches = _files_under(pattern)
            else:
                matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            unmatched.append(entry)
        found.update(os.path.abspath(m) for m in matches)
    if unmatched:
        raise FileNotFoundError(
            f"no files match data.paths entries {unmatched} (working directory {os.getcwd()}); pass globs, files "
            "or folders that exist, e.g. data.paths=['src/**/*.py'], or data.paths=[stdlib] for the Python "
            "standard library")
    return sorted((Path(f) for f in found), key=Path.as_posix)
