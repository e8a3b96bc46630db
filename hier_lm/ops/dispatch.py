"""Which implementation of an attention op runs: `attn_impl="auto" | "torch" | "triton"`.

`auto` picks the Triton kernel for CUDA tensors (when Triton is installed) and the plain PyTorch reference
otherwise. `triton` on CPU tensors runs only under Triton's interpreter (`TRITON_INTERPRET=1`, set before
Triton is imported), which is how the kernels are tested on machines without a GPU. Nothing here imports
Triton or queries a device at import time.
"""

from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_impl(attn_impl: str, tensor: torch.Tensor) -> str:
    """`"torch"` or `"triton"` for an op on `tensor` asked to run with `attn_impl`; a clear error when impossible."""
    if attn_impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {attn_impl!r}; choose one of {IMPLS}")
    if attn_impl == "auto":
        return "triton" if tensor.is_cuda and triton_installed() else "torch"
    if attn_impl == "triton":
        if not triton_installed():
            raise RuntimeError("attn_impl='triton' needs the triton package (pip install triton, Linux only); "
                               "use attn_impl='torch' or 'auto'")
        if not tensor.is_cuda and not triton_interpreted():
            raise RuntimeError(f"attn_impl='triton' got {tensor.device.type} tensors: the Triton kernels run on CUDA "
                               "GPUs, or on the CPU only under the interpreter (set TRITON_INTERPRET=1 before "
                               "importing triton); use attn_impl='torch' or 'auto' on the CPU")
    return attn_impl
