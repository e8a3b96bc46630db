"""Download a file over HTTP(S): progress on stderr, resumable from `<name>.part`, sha256-verified, and
renamed to its final name only when complete and verified."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

_CHUNK = 1 << 20
_HASH_CHUNK = 16 << 20
USER_AGENT = "hier_lm (python urllib)"


class ChecksumError(ValueError):
    """A file's sha256 is not the expected one."""


class DownloadError(FileNotFoundError):
    """The file could not be fetched (network error, HTTP error, or the connection closed early)."""


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of the file at `path`, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_hint(setting: str = "data.sha256") -> str:
    """How to skip a checksum, for errors: the `setting` to set to null."""
    return (f"pass {setting}=null (for training or `python -m hier_lm.data prepare`) to skip the verification, "
            "only if you trust the file")


class Progress:
    """Byte progress on `stream` (stderr): a tqdm bar on a terminal; otherwise plain newline-terminated
    lines at every 10% (every 10 MB when the size is unknown), so that logs stay readable."""

    def __init__(self, desc: str, total: int | None, initial: int = 0, stream: IO[str] | None = None,
                 enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.desc, self.total, self.done, self.enabled = desc, total, initial, enabled
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc,
                        file=self.stream) if enabled and isatty else None
        self._next = self._mark_after(initial)
        if enabled and self.bar is None:
            size = f" {total / 1e6:,.1f} MB" if total else ""
            start = f", resuming at {initial / 1e6:,.1f} MB" if initial else ""
            self._line(f"{desc}: downloading{size}{start}")

    def _mark_after(self, done: int) -> int:
        step = max(self.total // 10, 1) if self.total else 10_000_000
        return (done // step + 1) * step

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done >= self._next:
            pct = f" ({100 * self.done // self.total}%)" if self.total else ""
            self._line(f"{self.desc}: {self.done / 1e6:,.1f} MB{pct}")
            self._next = self._mark_after(self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _content_range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    return int(match.group(1)) if match else None


def _fetch(url: str, part: Path, timeout: float, progress: bool, desc: str) -> bool:
    """Append the rest of `url` to `part` (asking for a Range from its current size), or rewrite it from
    the start when the server ignores the Range; True if bytes already in `part` were kept. Raises
    `http.client.IncompleteRead` if the transfer is cut short (network errors propagate)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # Range Not Satisfiable: the .part already holds the whole file
            return True
        raise
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and response.status == 206 and _content_range_start(response.headers.get("Content-Range")) == offset:
            mode = "ab"
        else:  # a fresh download, or the server ignored the Range (200): start over
            offset, mode = 0, "wb"
        total = None if length is None else offset + length
        bar = Progress(desc, total, offset, enabled=progress)
        written = offset
        try:
            with open(part, mode) as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        finally:
            bar.close()
    if total is not None and written != total:
        raise http.client.IncompleteRead(b"", total - written)
    return mode == "ab"


def download(url: str, dest: str | Path, sha256: str | None = None, *, timeout: float = 60,
             progress: bool = True, desc: str | None = None, sha256_setting: str = "data.sha256",
             local_hint: str = "") -> Path:
    """Download `url` to `dest` unless `dest` already exists (and matches `sha256`, when given); returns `dest`.

    The bytes go to `<dest>.part`, which a later call resumes with an HTTP Range request (or restarts when
    the server ignores it); `<dest>.part` is renamed to `dest` only when the transfer is complete and its
    sha256 matches. A mismatch deletes the `.part` and raises `ChecksumError`; a network or HTTP error, or a
    connection closed early, keeps the `.part` and raises `DownloadError`. An existing `dest` is never
    replaced or deleted. `sha256_setting` and `local_hint` name the settings that fix an error.
    """
    dest = Path(dest)
    desc = desc or dest.name
    if dest.exists():
        if sha256 is None:
            return dest
        actual = file_sha256(dest)
        if actual == sha256.lower():
            return dest
        raise ChecksumError(
            f"{dest} exists but its sha256 is {actual}, not the expected {sha256} (the file at {url}): delete it "
            f"to download it again, or {checksum_hint(sha256_setting)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offline = (f"To use a copy you already have, {local_hint}." if local_hint else
               f"To use a copy you already have, put it at {dest}.")
    while True:
        try:
            resumed = _fetch(url, part, timeout, progress, desc)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            if isinstance(err, urllib.error.HTTPError):
                reason = f"HTTP {err.code} {err.reason}"
            elif isinstance(err, http.client.IncompleteRead):
                missing = f"{err.expected:,} bytes " if isinstance(err.expected, int) else ""
                reason = f"the connection closed {missing}before the end"
            else:
                reason = getattr(err, "reason", None) or err
            kept = part.stat().st_size if part.exists() else 0
            resume = f" The {kept:,} bytes received are kept in {part}; run again to resume." if kept else ""
            raise DownloadError(f"could not download {url}: {reason}.{resume} {offline}") from err
        if sha256 is None:
            break
        actual = file_sha256(part)
        if actual == sha256.lower():
            break
        size = part.stat().st_size
        part.unlink()
        if resumed:  # the kept bytes may be a stale .part of another version of the file: start over once
            continue
        raise ChecksumError(
            f"the download of {url} has sha256 {actual} ({size:,} bytes), expected {sha256}; the download was "
            f"deleted. Run again to retry; if the file there changed on purpose, {checksum_hint(sha256_setting)}. "
            f"{offline}")
    os.replace(part, dest)
    return dest

