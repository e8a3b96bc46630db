"""LightningDataModules and the datasets behind them; standalone (of hier_lm it imports `hier_lm.files` only).

Shared pieces: `base` (the resumable DataModule base: loaders, ranks, training position, evaluation sharded
exactly over the ranks), `cache` (the one writer and reader of the dataset caches), `settings` (argument
checks), `download`, `pixels` (the pixel-token codec), `images` (the image DataModule base). Datasets:
`text` (any files, enwik8), `lm1b`, `imagenet`, `synthetic_images`, `lra` (Long Range Arena).
`python -m hier_lm.data prepare <name>` caches a dataset ahead of training.
"""

from hier_lm.data.download import ChecksumError, DownloadError, download
from hier_lm.data.imagenet import ImageNetDataModule, ImageSizeError, prepare_imagenet
from hier_lm.data.images import ImageDataModule
from hier_lm.data.lm1b import LM1BDataModule, TokenCorpus, prepare_lm1b, tokenizer_from_checkpoint
from hier_lm.data.lra import (LRACache, LRADataModule, LRAImageDataModule, LRATextDataModule, ListOpsDataModule,
                              PathfinderDataModule, RetrievalDataModule, generate_listops)
from hier_lm.data.pixels import IMAGE_VOCAB, decode_images, encode_images, planar_to_hwc
from hier_lm.data.synthetic_images import SyntheticImagesDataModule
from hier_lm.data.text import (ByteCorpus, ByteLMDataModule, Enwik8DataModule, TextFilesDataModule, prepare_enwik8,
                               resolve_paths, stdlib_files)

__all__ = ["ByteCorpus", "ByteLMDataModule", "ChecksumError", "DownloadError", "Enwik8DataModule",
           "TextFilesDataModule", "download", "prepare_enwik8", "resolve_paths", "stdlib_files",
           "IMAGE_VOCAB", "ImageDataModule", "ImageNetDataModule", "ImageSizeError", "SyntheticImagesDataModule",
           "decode_images", "encode_images", "planar_to_hwc", "prepare_imagenet",
           "LM1BDataModule", "TokenCorpus", "prepare_lm1b", "tokenizer_from_checkpoint",
           "LRACache", "LRADataModule", "LRAImageDataModule", "LRATextDataModule", "ListOpsDataModule",
           "PathfinderDataModule", "RetrievalDataModule", "generate_listops"]
