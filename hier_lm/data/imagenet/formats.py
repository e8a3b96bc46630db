"""The three distributed forms of downsampled ImageNet (`data.format`), their file names and image counts."""

SIZES = (32, 64)
FORMATS = ("oord", "npz", "parquet")
CACHE_SPLITS = ("train", "valid")  # the sources' official splits, as cached

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
