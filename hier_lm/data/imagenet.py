"""Downsampled ImageNet 32x32 / 64x64 for image modelling (vocab 256, metric bpd), from any of its three
distributed forms, converted once into a uint8 memmap `[N, S, S, 3]` per split:

- `oord`: van den Oord et al. 2016 (PixelRNN), `train_SxS.tar` / `valid_SxS.tar` of PNG files: the set
  Hourglass (TFDS `downsampled_imagenet`) trained and reported on; train 1,281,149 / valid 49,999 images.
- `npz`: Chrabaszcz et al. 2017, `Imagenet32_train_npz.zip` / `Imagenet32_val_npz.zip` (64x64: train
  part1 + part2), `train_data_batch_K.npz` / `val_data.npz` with `data` uint8 `[N, 3*S*S]` planar; another
  resize (box) of ImageNet, train 1,281,167 / valid 50,000 images.
- `parquet`: a Hugging Face parquet copy (e.g. `benjamin-paine/imagenet-1k-32x32`), an `image` column.

The cache is `<root>/imagenet<S>/<format>/{train.u8, valid.u8, meta.json}`: `train` and `valid` are the
source's official splits; the DataModule holds out part of train as its `valid` and uses the official
validation split as `test` (see `ImageNetDataModule`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hier_lm.data.corpus import default_data_root
from hier_lm.data.download import ChecksumError, DownloadError, checksum_hint, download, file_sha256
from hier_lm.data.images import ImageDataModule, ImageSource, MemmapImages
from hier_lm.data.pixels import CHANNELS, planar_to_hwc

SIZES = (32, 64)
FORMATS = ("oord", "npz", "parquet")
CACHE_SPLITS = ("train", "valid")  # the sources' official splits, as cached
_FORMAT = 1  # bump when the cache layout changes
_CHUNK_IMAGES = 4096  # images converted at a time
HELD_OUT_SEED = 0  # which train images the DataModule holds out as `valid`: fixed, not data.seed

# The official file names of each format (download names and what data.path folders are searched for).
SOURCE_FILES = {
    ("oord", 32): ("train_32x32.tar", "valid_32x32.tar"),
    ("oord", 64): ("train_64x64.tar", "valid_64x64.tar"),
    ("npz", 32): ("Imagenet32_train_npz.zip", "Imagenet32_val_npz.zip"),
    ("npz", 64): ("Imagenet64_train_part1_npz.zip", "Imagenet64_train_part2_npz.zip", "Imagenet64_val_npz.zip"),
}
# Where the files were published; both are gone or behind the ImageNet login (data/README.md says what to do).
ORIGINAL_URLS = {"oord": "http://image-net.org/small/", "npz": "http://www.image-net.org/image/downsample/"}
FULL_COUNTS = {"oord": {"train": 1_281_149, "valid": 49_999}, "npz": {"train": 1_281_167, "valid": 50_000}}


class ImageSizeError(ValueError):
    """An image of the source is not `S x S` (or not RGB)."""


class DamagedFileError(ValueError):
    """A source archive is truncated or corrupt."""


# ----------------------------------------------------------------------------------------------- the cache


class ImageNetCache:
    """A finished cache folder: `train.u8` and `valid.u8` (raw `uint8 [N, S, S, 3]`) and `meta.json`
    (size, format, source, image counts, the sha256 of each split file and of each source file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.read_meta(self.path)
        if meta is None:
            raise FileNotFoundError(f"{self.path} holds no finished image cache (meta.json or a split file missing)")
        self.meta: dict = meta
        self.size: int = meta["size"]

    @staticmethod
    def read_meta(folder: Path) -> dict | None:
        """The folder's meta dict if it holds a finished cache (meta.json written, split files complete)."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            image_bytes = CHANNELS * meta["size"] ** 2
            complete = meta["format"] == _FORMAT and all(
                (folder / meta["splits"][s]["file"]).stat().st_size == meta["splits"][s]["images"] * image_bytes
                for s in CACHE_SPLITS)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta if complete else None

    def images(self, split: str) -> int:
        return self.meta["splits"][split]["images"]

    def source(self, split: str, rows: np.ndarray | None = None) -> MemmapImages:
        """The cached `split` ("train" | "valid") as a lazily opened memmap source (optionally the subset `rows`)."""
        return MemmapImages(self.path / self.meta["splits"][split]["file"], self.images(split), self.size, rows)

    def describe(self) -> str:
        """Where the cache is, image counts per split and checksums (what `python -m hier_lm.data prepare` prints)."""
        meta = self.meta
        full = FULL_COUNTS.get(meta["source_format"], {})
        lines = [f"imagenet{self.size} ({meta['source_format']}) cache: {self.path.resolve()}",
                 f"  source: {meta['source']}"]
        for split in CACHE_SPLITS:
            info = meta["splits"][split]
            ref = f" (the full set has {full[split]:,})" if split in full else ""
            lines.append(f"  {split:<5}  {info['file']}: {info['images']:>9,} images{ref}, sha256 {info['sha256']}")
        lines += [f"  source file {name}: sha256 {sha}" for name, sha in meta["source_sha256"].items()]
        return "\n".join(lines)


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(folder: Path) -> None:
    """Clean up after a killed prepare on this host: delete its half-written `.<name>.tmp-*` folder, and
    put back a finished cache that was moved aside (`.<name>.old-*`) but not yet replaced."""
    if not folder.parent.is_dir():
        return
    for leftover in folder.parent.glob(f".{folder.name}.*-{_host_tag()}-*"):
        kind, pid = leftover.name.rsplit(".", 1)[1].split("-", 1)[0], leftover.name.rsplit("-", 1)[1]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and ImageNetCache.read_meta(folder) is None and ImageNetCache.read_meta(leftover):
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(leftover, folder)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _write_cache(folder: Path, splits: Mapping[str, Iterable[np.ndarray]], meta: dict, size: int,
                 progress: bool) -> ImageNetCache:
    """Write the image chunks (`uint8 [n, size, size, 3]`) of each split into a fresh temporary folder,
    `meta.json` last, then swap it in for `folder`: a failed or interrupted write leaves no cache taken for
    finished and never damages the finished one already there (it is moved aside, then deleted, only after
    the new one is complete)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{_host_tag()}-{os.getpid()}"
    tmp, old = folder.parent / f".{folder.name}.tmp-{tag}", folder.parent / f".{folder.name}.old-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        split_meta = {}
        for name, chunks in splits.items():
            digest, count = hashlib.sha256(), 0
            with open(tmp / f"{name}.u8", "wb") as out, tqdm(unit=" images", desc=f"{folder.name} {name}",
                                                             disable=not progress) as bar:
                for chunk in chunks:
                    if chunk.shape[1:] != (size, size, CHANNELS) or chunk.dtype != np.uint8:
                        raise AssertionError(f"bad chunk {chunk.shape} {chunk.dtype}")  # a reader bug, not input
                    data = np.ascontiguousarray(chunk).data
                    out.write(data)
                    digest.update(data)
                    count += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if count == 0:
                raise ValueError(f"{meta['source']} holds no {name} images: pass the complete dataset "
                                 f"({' and '.join(meta['source_files']) or 'train and validation files'})")
            split_meta[name] = {"file": f"{name}.u8", "images": count, "sha256": digest.hexdigest()}
        (tmp / "meta.json.tmp").write_text(json.dumps({**meta, "splits": split_meta}, indent=2) + "\n")
        os.replace(tmp / "meta.json.tmp", tmp / "meta.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return ImageNetCache(folder)


# ------------------------------------------------------------------------------------------ the readers


def _decode_image(data: bytes, name: str, size: int) -> np.ndarray:
    """`uint8 [size, size, 3]` from the bytes of an image file (PNG), or a one-line error naming `name`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _check_image(image, name, size)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # PIL: unreadable or truncated
        raise DamagedFileError(f"{name} is not a readable image ({err}): the archive is damaged; pass an intact "
                               "copy") from err


def _check_image(image, name: str, size: int) -> np.ndarray:
    if image.size != (size, size):
        width, height = image.size
        other = f" (data=imagenet{width} is the {width}x{width} set)" if width == height and width in SIZES else ""
        raise ImageSizeError(f"{name} is {width}x{height}, expected {size}x{size}: this is not the "
                             f"imagenet{size} data{other}")
    if image.mode in ("L", "P", "1"):  # greyscale or palette PNGs are exactly representable in RGB
        image = image.convert("RGB")
    if image.mode != "RGB":
        raise ImageSizeError(f"{name} has mode {image.mode}, expected RGB {size}x{size} images")
    return np.asarray(image, dtype=np.uint8)


def _chunks(images: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Group `[size, size, 3]` images into `[n, size, size, 3]` chunks of up to `_CHUNK_IMAGES`."""
    chunk: list[np.ndarray] = []
    for image in images:
        chunk.append(image)
        if len(chunk) == _CHUNK_IMAGES:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


def _is_png(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(".png") and not base.startswith(".")


def _tar_images(path: Path, size: int) -> Iterator[np.ndarray]:
    """The PNG files of a tar (any compression), in archive order, streamed."""
    found = 0
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if member.isfile() and _is_png(member.name):
                    found += 1
                    yield _decode_image(archive.extractfile(member).read(), f"{path.name}:{member.name}", size)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise DamagedFileError(f"{path} is damaged or truncated ({err}) after {found:,} images: delete it and "
                               "download it again, or pass an intact copy") from err
    if found == 0:
        raise ValueError(f"{path} holds no PNG files: pass the van den Oord archive (train_{size}x{size}.tar or "
                         f"valid_{size}x{size}.tar), or the data.format of this file")


def _folder_images(folder: Path, size: int) -> Iterator[np.ndarray]:
    """The PNG files under an extracted archive folder, sorted by relative path."""
    files = sorted((p for p in folder.rglob("*") if p.is_file() and _is_png(p.name)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"{folder} holds no PNG files")
    for file in files:
        yield _decode_image(file.read_bytes(), str(file), size)


def _oord_splits(source: Path, size: int) -> dict[str, Iterator[np.ndarray]]:
    names = SOURCE_FILES[("oord", size)]
    splits = {}
    for split, name in zip(CACHE_SPLITS, names):
        archive, extracted = source / name, source / name.removesuffix(".tar")
        if archive.is_file():
            splits[split] = _tar_images(archive, size)
        elif extracted.is_dir():
            splits[split] = _folder_images(extracted, size)
        else:
            raise FileNotFoundError(f"data.path={source} has no {name} (nor its extracted folder "
                                    f"{extracted.name}/): pass the folder holding {' and '.join(names)}")
    return {split: _chunks(images, size) for split, images in splits.items()}


_NPZ_PATTERNS = {"train": re.compile(r"(?:^|/)train_data_batch_(\d+)\.npz$"),
                 "valid": re.compile(r"(?:^|/)val_data\.npz$")}


def _npz_rows(file, name: str, size: int) -> Iterator[np.ndarray]:
    """HWC chunks of the `data` array of one npz (a path or a seekable file object), read row by row."""
    length = CHANNELS * size * size
    try:
        with zipfile.ZipFile(file) as npz:
            members = npz.namelist()
            if "data.npy" not in members:
                arrays = [m.removesuffix(".npy") for m in members]
                raise ValueError(f"{name} has no array 'data' (it holds {arrays}): it is not a Chrabaszcz et al. "
                                 "batch; pass the Imagenet*_npz.zip files or the npz files extracted from them")
            with npz.open("data.npy") as f:
                version = np.lib.format.read_magic(f)
                header = np.lib.format.read_array_header_2_0 if version >= (2, 0) else \
                    np.lib.format.read_array_header_1_0
                shape, fortran, dtype = header(f)
                if len(shape) != 2 or shape[1] != length or dtype != np.uint8 or fortran:
                    other = next((s for s in SIZES if len(shape) == 2 and shape[1] == CHANNELS * s * s), None)
                    hint = f" (that is imagenet{other}: use data=imagenet{other})" if other else ""
                    raise ImageSizeError(f"{name}: 'data' is {dtype} {list(shape)}, expected uint8 [N, {length}] "
                                         f"rows of planar {size}x{size} RGB images{hint}")
                left = shape[0]
                while left:
                    n = min(left, _CHUNK_IMAGES)
                    buffer = f.read(n * length)
                    if len(buffer) != n * length:
                        raise EOFError(f"'data' ends {left - len(buffer) // length:,} rows early")
                    yield planar_to_hwc(np.frombuffer(buffer, dtype=np.uint8).reshape(n, length), size)
                    left -= n
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DamagedFileError(f"{name} is damaged or truncated ({err}): delete it and download it again, or "
                               "pass an intact copy") from err


def _npz_splits(source: Path, size: int, scratch: Path | None = None) -> dict[str, Iterator[np.ndarray]]:
    """Find the train batches and val_data among the npz files under `source` and inside its zips. An npz
    compressed inside its zip is first extracted to a temporary file in `scratch` (one at a time): reading
    it in place would decompress it three times (zipfile seeks by decompressing from the start)."""
    found: dict[str, dict[int, tuple[Path, str | None]]] = {"train": {}, "valid": {}}  # batch -> (file, member)

    def add(file: Path, member: str | None, name: str) -> None:
        for split, pattern in _NPZ_PATTERNS.items():
            if match := pattern.search(name):
                found[split].setdefault(int(match.group(1)) if split == "train" else 0, (file, member))

    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    for file in files:
        if file.suffix == ".npz":
            add(file, None, file.name)
        elif file.suffix == ".zip":
            try:
                with zipfile.ZipFile(file) as archive:
                    for member in archive.namelist():
                        add(file, member, member)
            except (zipfile.BadZipFile, OSError) as err:
                raise DamagedFileError(f"{file} is damaged or truncated ({err}): delete it and download it "
                                       "again, or pass an intact copy") from err
    names = " and ".join(SOURCE_FILES[("npz", size)])
    for split, what in (("train", "train_data_batch_K.npz"), ("valid", "val_data.npz")):
        if not found[split]:
            raise FileNotFoundError(f"data.path={source} holds no {what} (loose or inside a zip): pass the folder "
                                    f"holding {names}, or the npz files extracted from them")
    batches = sorted(found["train"])
    if batches != list(range(1, len(batches) + 1)):
        missing = sorted(set(range(1, max(batches) + 1)) - set(batches))
        raise FileNotFoundError(f"data.path={source} lacks train_data_batch_{missing[0]}.npz (it has batches "
                                f"{batches}): pass all of {names}")

    def read(split: str) -> Iterator[np.ndarray]:
        for key in sorted(found[split]):
            file, member = found[split][key]
            if member is None:
                yield from _npz_rows(file, str(file), size)
                continue
            try:
                with zipfile.ZipFile(file) as archive, archive.open(member) as inner:
                    if archive.getinfo(member).compress_type == zipfile.ZIP_STORED:
                        yield from _npz_rows(inner, f"{file.name}:{member}", size)
                        continue
                    if scratch is not None:
                        scratch.mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryFile(dir=scratch) as copy:
                        shutil.copyfileobj(inner, copy, 16 << 20)
                        copy.seek(0)
                        yield from _npz_rows(copy, f"{file.name}:{member}", size)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                raise DamagedFileError(f"{file} is damaged or truncated ({err}): delete it and download it "
                                       "again, or pass an intact copy") from err

    return {split: read(split) for split in CACHE_SPLITS}


_PARQUET_SPLITS = {"train": re.compile(r"(?:^|[/_.-])train(?:ing)?(?:[/_.-]|$)"),
                   "valid": re.compile(r"(?:^|[/_.-])val(?:id|idation)?(?:[/_.-]|$)")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_SPLITS = {"train": "train", "valid": "validation"}


def _image_array(value, name: str, size: int) -> np.ndarray:
    """One value of an `image` column: PNG/JPEG bytes, `{"bytes": ...}`, a PIL image or an HWC array."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_image(bytes(value), name, size)
    if isinstance(value, Image.Image):
        return _check_image(value, name, size)
    array = np.asarray(value)
    if array.shape != (size, size, CHANNELS):
        raise ImageSizeError(f"{name} has shape {list(array.shape)}, expected [{size}, {size}, 3]")
    return array.astype(np.uint8)


def _parquet_images(dataset, what: str, size: int) -> Iterator[np.ndarray]:
    """The `image` column of a streamed `datasets.IterableDataset`, decoded and checked, row by row."""
    from datasets import Image as ImageFeature

    features = dataset.features
    if features is not None:
        if "image" not in features:
            raise ValueError(f"{what} has no 'image' column (columns: {list(features)}): pass a parquet copy of "
                             "downsampled ImageNet with an image column")
        if isinstance(features["image"], ImageFeature):
            dataset = dataset.cast_column("image", ImageFeature(decode=False))  # we decode and check ourselves
    for i, row in enumerate(dataset):
        if "image" not in row:
            raise ValueError(f"{what} has no 'image' column (columns: {list(row)})")
        yield _image_array(row["image"], f"{what} row {i}", size)


def _parquet_splits(source: str | Path, size: int) -> dict[str, Iterator[np.ndarray]]:
    """Local parquet files (split by file name: `train*`, `valid*` / `validation*` / `val*`) or a hub id."""
    from datasets import load_dataset

    source = str(source)
    local = Path(source).expanduser()
    if not local.exists() and _HUB_ID.match(source):
        return {split: _chunks(_hub_images(source, hub_split, size), size) for split, hub_split in HUB_SPLITS.items()}
    files = sorted(local.rglob("*.parquet")) if local.is_dir() else [local]
    by_split = {split: [str(f) for f in files if pattern.search(f.relative_to(local).as_posix() if local.is_dir()
                                                                 else f.name)]
                for split, pattern in _PARQUET_SPLITS.items()}
    for split, chosen in by_split.items():
        if not chosen:
            raise FileNotFoundError(f"data.path={source} has no {split} parquet files (names containing "
                                    f"'{'train' if split == 'train' else 'validation'}'; it holds "
                                    f"{[f.name for f in files][:5]}): pass the folder of the dataset's parquet "
                                    "files, or a Hugging Face hub id")

    def read(split: str) -> Iterator[np.ndarray]:
        dataset = load_dataset("parquet", data_files={split: by_split[split]}, split=split, streaming=True)
        try:
            yield from _parquet_images(dataset, f"{source} ({split})", size)
        except OSError as err:  # pyarrow: not a parquet file, truncated
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DamagedFileError(f"a {split} parquet file under {source} is damaged or truncated ({message}): "
                                   "pass intact files") from err

    return {split: _chunks(read(split), size) for split in CACHE_SPLITS}


def _hub_images(hub_id: str, split: str, size: int) -> Iterator[np.ndarray]:
    from datasets import load_dataset

    def failed(err: Exception) -> DownloadError:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return DownloadError(f"could not read the Hugging Face dataset {hub_id} ({message}): download it on a "
                             f"machine with network (e.g. `huggingface-cli download {hub_id} --repo-type dataset "
                             "--local-dir DIR`) and pass data.path=DIR")

    try:
        dataset = load_dataset(hub_id, split=split, streaming=True)
    except Exception as err:  # offline, unknown id, no access: the hub client raises many types
        raise failed(err) from err
    try:
        yield from _parquet_images(dataset, f"{hub_id} ({split})", size)
    except OSError as err:  # the connection failed while streaming
        raise failed(err) from err


def _local_sha256(source: Path, format: str, names: tuple[str, ...], expected: dict[str, str]) -> dict[str, str]:
    """sha256 of the source's archives (the format's files in a folder, or the file itself), checked against
    `expected` where it names them; extracted image folders are not hashed."""
    if source.is_file():
        files = [source]
    elif format == "parquet":
        files = sorted(source.rglob("*.parquet"))
    else:
        files = [source / name for name in names if (source / name).is_file()]
    hashes = {}
    for file in files:
        name = file.name if source.is_file() else file.relative_to(source).as_posix()
        hashes[name] = file_sha256(file)
        if name in expected and hashes[name] != expected[name]:
            raise ChecksumError(f"{file} has sha256 {hashes[name]}, expected {expected[name]}: pass the right "
                                f"file, or {checksum_hint()}")
    return hashes


# -------------------------------------------------------------------------------------------- prepare


def _plain_sha256(sha256) -> dict[str, str] | None:
    if sha256 is None:
        return None
    if isinstance(sha256, Mapping):
        return {str(k): str(v).lower() for k, v in sha256.items() if v is not None}
    raise ValueError(f"data.sha256 must map file names to sha256 hex digests, e.g. {{train_32x32.tar: ...}}, or be "
                     f"null; got {sha256!r}")


def _check_args(size: int, format: str) -> None:
    if size not in SIZES:
        raise ValueError(f"data.size must be one of {SIZES} (downsampled ImageNet 32x32 or 64x64), got {size}")
    if format not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {format!r}")


def prepare_imagenet(size: int = 32, format: str = "oord", root: str | Path | None = None,
                     path: str | Path | None = None, url: str | None = None,
                     sha256: Mapping[str, str] | None = None, progress: bool = True) -> ImageNetCache:
    """Open the cache `<root>/imagenet<size>/<format>/` (root default: `default_data_root()`), converting
    the source into it first if absent.

    A finished cache is used as it is when no source is given, or when `path` / `url` names the source it
    was made from (no network access then). Otherwise the source is `path` (a local folder of the format's
    files: see `SOURCE_FILES`; for parquet a folder of `.parquet` files or a Hugging Face hub id), or the
    format's files downloaded from the base URL `url` into `<root>/imagenet<size>/downloads/` (resumable,
    kept). `sha256` maps file names to expected sha256 digests (checked for local files too). Every image
    must be `size x size` RGB; a damaged file, a wrong size or a missing file is a one-line error, and the
    finished cache already there is left as it was.
    """
    _check_args(size, format)
    sha256 = _plain_sha256(sha256)
    base = (Path(root).expanduser() if root else default_data_root()) / f"imagenet{size}"
    folder = base / format
    _recover(folder)
    path = None if path is None else os.fspath(path)
    if path is not None:
        local = Path(path).expanduser()
        wanted = str(local.resolve()) if local.exists() or format != "parquet" or not _HUB_ID.match(path) else \
            f"hf:{path}"
    elif url is not None:
        wanted = url
    else:
        wanted = None
    meta = ImageNetCache.read_meta(folder)
    if meta is not None and meta.get("size") == size and (wanted is None or meta.get("source") == wanted):
        return ImageNetCache(folder)

    names = SOURCE_FILES.get((format, size), ())
    where = f"the folder holding {' and '.join(names)}" if names else "a folder of parquet files or a hub id"
    if path is None and url is None:
        dead = f" (the original {ORIGINAL_URLS[format]} is offline or behind the ImageNet login)" \
            if format in ORIGINAL_URLS else ""
        raise FileNotFoundError(f"no imagenet{size} cache in {folder}: pass data.path={where} (--path with `python "
                                f"-m hier_lm.data prepare imagenet{size}`), or data.url=a base URL serving them"
                                f"{dead}; data/README.md says where to get them")
    if path is not None and wanted.startswith("hf:"):
        source, source_sha = path, {}
    elif path is not None:
        source = Path(path).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"data.path={path} does not exist: pass {where}")
        source_sha = _local_sha256(source, format, names, sha256 or {})
    else:
        if format == "parquet":
            raise ValueError("data.url is not used with data.format=parquet: pass data.path=a Hugging Face hub id "
                             "(e.g. benjamin-paine/imagenet-1k-32x32) or a folder of its parquet files")
        source = base / "downloads"
        hint = (f"download them on a machine with network and pass data.path=the folder holding {' and '.join(names)} "
                f"(--path with `python -m hier_lm.data prepare imagenet{size}`)")
        source_sha = {}
        for name in names:
            file = download(url.rstrip("/") + "/" + name, source / name, (sha256 or {}).get(name), desc=name,
                            progress=progress, local_hint=hint)
            source_sha[name] = (sha256 or {}).get(name) or file_sha256(file)
    if format == "npz":
        splits = _npz_splits(source, size, scratch=base)
    else:
        splits = {"oord": _oord_splits, "parquet": _parquet_splits}[format](source, size)
    if progress:
        print(f"imagenet{size}: converting {wanted} ({format}) into {folder}", file=sys.stderr, flush=True)
    meta = {"format": _FORMAT, "dataset": f"imagenet{size}", "size": size, "source_format": format,
            "source": wanted, "source_files": list(names), "source_sha256": source_sha}
    return _write_cache(folder, splits, meta, size, progress and sys.stderr.isatty())


# ------------------------------------------------------------------------------------------ DataModule


class ImageNetDataModule(ImageDataModule):
    """Downsampled ImageNet `size x size` (32 or 64) for image modelling: vocab 256, metric bpd, batches
    `LongTensor[B, 3 * size * size]` of pixel tokens (raster order, R, G, B per pixel; `ImageDataModule`).

    The images come from `prepare_imagenet(size, format, root, path, url, sha256)`. Splits: `test` is the
    source's official validation split (what Hourglass and the other generative papers report bpd on);
    `valid` is `valid_images` images held out of the official train split (a fixed random subset, the same
    for every run and data.seed), and `train` is the rest, so that model selection never looks at the
    reported split. `valid_images=0` makes `valid` the official validation split too (as Trax did) and
    trains on all of train.
    """

    def __init__(self, size: int = 32, format: str = "oord", root: str | Path | None = None,
                 path: str | Path | None = None, url: str | None = None, sha256: Mapping[str, str] | None = None,
                 valid_images: int = 10_000, batch_size: int = 8, eval_batch_size: int | None = None,
                 num_workers: int = 1, seed: int = 0):
        super().__init__()
        _check_args(size, format)
        self._check_sizes(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                          seed=seed)
        if valid_images < 0:
            raise ValueError(f"data.valid_images must be at least 0, got {valid_images}")
        # Plain Python values (not Hydra's DictConfig, not Path) so that checkpoints load with weights_only=True.
        root = None if root is None else os.fspath(root)
        path = None if path is None else os.fspath(path)
        sha256 = _plain_sha256(sha256)
        self.save_hyperparameters()
        self.cache: ImageNetCache | None = None

    def _prepared(self) -> ImageNetCache:
        if self.cache is None:
            h = self.hparams
            self.cache = prepare_imagenet(h.size, h.format, h.root, h.path, h.url, h.sha256)
        return self.cache

    def _open(self) -> dict[str, ImageSource]:
        cache = self._prepared()
        count, held_out = cache.images("train"), self.hparams.valid_images
        if held_out == 0:
            return {"train": cache.source("train"), "valid": cache.source("valid"), "test": cache.source("valid")}
        if held_out >= count:
            raise ValueError(f"data.valid_images={held_out:,} but the train split has only {count:,} images: "
                             "hold out fewer (data.valid_images=0 validates on the official validation split)")
        mask = np.zeros(count, dtype=bool)
        mask[np.random.default_rng(HELD_OUT_SEED).choice(count, held_out, replace=False)] = True
        return {"train": cache.source("train", np.flatnonzero(~mask)),
                "valid": cache.source("train", np.flatnonzero(mask)), "test": cache.source("valid")}
