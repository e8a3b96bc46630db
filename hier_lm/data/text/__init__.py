"""Byte-level language-modelling data: any local files (`TextFilesDataModule`) and enwik8, cached as a
`ByteCorpus`, served as token windows (`TokenWindowDataModule`, shared with the LM1B subwords)."""

from hier_lm.data.text.corpus import ByteCorpus
from hier_lm.data.text.datamodule import ByteLMDataModule, TokenWindowDataModule
from hier_lm.data.text.enwik8 import Enwik8DataModule, prepare_enwik8
from hier_lm.data.text.paths import resolve_paths, stdlib_files
from hier_lm.data.text.textfiles import TextFilesDataModule

__all__ = ["ByteCorpus", "ByteLMDataModule", "Enwik8DataModule", "TextFilesDataModule", "TokenWindowDataModule",
           "prepare_enwik8", "resolve_paths", "stdlib_files"]
