"""LightningDataModules and the datasets behind them; standalone (imports nothing else from hier_lm)."""

from hier_lm.data.corpus import ByteCorpus, resolve_paths, stdlib_files
from hier_lm.data.download import ChecksumError, DownloadError, download
from hier_lm.data.enwik8 import Enwik8DataModule, prepare_enwik8
from hier_lm.data.textfiles import ByteLMDataModule, TextFilesDataModule

__all__ = ["ByteCorpus", "ByteLMDataModule", "ChecksumError", "DownloadError", "Enwik8DataModule",
           "TextFilesDataModule", "download", "prepare_enwik8", "resolve_paths", "stdlib_files"]
