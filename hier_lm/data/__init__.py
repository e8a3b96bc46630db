"""LightningDataModules and the datasets behind them; standalone (imports nothing else from hier_lm)."""

from hier_lm.data.corpus import ByteCorpus, resolve_paths, stdlib_files
from hier_lm.data.textfiles import TextFilesDataModule

__all__ = ["ByteCorpus", "TextFilesDataModule", "resolve_paths", "stdlib_files"]
