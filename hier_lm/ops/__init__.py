"""Attention algorithms: a plain PyTorch reference for each (the readable definition, used on CPU)."""
