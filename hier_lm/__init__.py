"""hier_lm: hierarchical long-sequence models (Hourglass, H-Transformer-1D, FLASH) with PyTorch Lightning."""

from hier_lm.checkpoint import export, load
from hier_lm.generation import generate

__version__ = "0.1.0"
__all__ = ["export", "generate", "load"]
