"""Long Range Arena (Tay et al. 2021) as DataModules: ListOps, Text (IMDB bytes), Retrieval (AAN pairs), Image
(CIFAR-10 grayscale pixels) and Pathfinder (32x32), each read from its release layout and cached once as
memmaps (`examples.LRACache`); batches of right-padded sequences with `lengths` and labels. ListOps can also
be generated (`listops.generate_listops`)."""

from hier_lm.data.lra.datamodule import LRADataModule
from hier_lm.data.lra.examples import LRACache
from hier_lm.data.lra.image import LRAImageDataModule
from hier_lm.data.lra.listops import ListOpsDataModule, generate_listops
from hier_lm.data.lra.pathfinder import PathfinderDataModule
from hier_lm.data.lra.retrieval import RetrievalDataModule
from hier_lm.data.lra.text import LRATextDataModule

__all__ = ["LRACache", "LRADataModule", "LRAImageDataModule", "LRATextDataModule", "ListOpsDataModule",
           "PathfinderDataModule", "RetrievalDataModule", "generate_listops"]
