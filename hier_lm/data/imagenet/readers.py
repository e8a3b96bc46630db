"""Readers of the three forms of downsampled ImageNet: each gives, per official split, the images as
`uint8 [n, S, S, 3]` chunks in the source's order, checked to be S x S RGB; a damaged file, a wrong size or
a missing file is a one-line error."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from hier_lm.data.download import DownloadError
from hier_lm.data.imagenet.formats import CACHE_SPLITS, SIZES, SOURCE_FILES
from hier_lm.data.pixels import CHANNELS, planar_to_hwc

_CHUNK_IMAGES = 4096  # images converted at a time


class ImageSizeError(ValueError):
    """An image of the source is not `S x S` (or not RGB)."""


class DamagedFileError(ValueError):
    """A source archive is truncated or corrupt."""


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
_HUB_SPLITS = {"train": "train", "valid": "validation"}


def is_hub_id(path: str) -> bool:
    """Whether `path` looks like a Hugging Face hub id (`owner/name`)."""
    return bool(_HUB_ID.match(path))


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
    if not local.exists() and is_hub_id(source):
        return {split: _chunks(_hub_images(source, hub_split, size), size) for split, hub_split in _HUB_SPLITS.items()}
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


def read_splits(format: str, source: str | Path, size: int,
                scratch: Path | None = None) -> dict[str, Iterator[np.ndarray]]:
    """`{"train", "valid"}` -> the official split's images of `source` in `format` (oord | npz | parquet), as
    `uint8 [n, size, size, 3]` chunks in the source's order, read lazily. npz members compressed inside their
    zip are extracted one at a time to a temporary file in `scratch`."""
    if format == "npz":
        return _npz_splits(Path(source), size, scratch)
    return {"oord": _oord_splits, "parquet": _parquet_splits}[format](source, size)
