"""LightningDataModules and the datasets behind them; standalone (imports nothing else from hier_lm)."""

from hier_lm.data.corpus import ByteCorpus, resolve_paths, stdlib_files
from hier_lm.data.download import ChecksumError, DownloadError, download
from hier_lm.data.enwik8 import Enwik8DataModule, prepare_enwik8
from hier_lm.data.imagenet import ImageNetDataModule, ImageSizeError, prepare_imagenet
from hier_lm.data.images import ImageDataModule, SyntheticImagesDataModule
from hier_lm.data.lm1b import LM1BDataModule, TokenCorpus, prepare_lm1b, tokenizer_from_checkpoint
from hier_lm.data.pixels import IMAGE_VOCAB, decode_images, encode_images, planar_to_hwc
from hier_lm.data.textfiles import ByteLMDataModule, TextFilesDataModule

__all__ = ["ByteCorpus", "ByteLMDataModule", "ChecksumError", "DownloadError", "Enwik8DataModule",
           "TextFilesDataModule", "download", "prepare_enwik8", "resolve_paths", "stdlib_files",
           "IMAGE_VOCAB", "ImageDataModule", "ImageNetDataModule", "ImageSizeError", "SyntheticImagesDataModule",
           "decode_images", "encode_images", "planar_to_hwc", "prepare_imagenet",
           "LM1BDataModule", "TokenCorpus", "prepare_lm1b", "tokenizer_from_checkpoint"]
