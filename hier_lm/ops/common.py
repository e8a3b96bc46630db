"""What the attention ops share: which implementation runs (`attn_impl="auto" | "torch" | "triton"`), the dtype
and autocast handling of the PyTorch references, and the buffers of the Triton kernels.

`auto` picks the Triton kernel for CUDA tensors (when Triton is installed) and the plain PyTorch reference
otherwise. `triton` on CPU tensors runs only under Triton's interpreter (`TRITON_INTERPRET=1`, set before
Triton is imported), which is how the kernels are tested on machines without a GPU. Nothing here imports
Triton or queries a device at import time.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

__all__ = ["IMPLS", "SCRATCH_FILL", "in_compute_dtype", "no_autocast", "promoted_dtypes", "resolve_impl", "scratch",
           "triton_installed", "triton_interpreted"]

IMPLS = ("auto", "torch", "triton")

# Tests set this to float("nan"): every buffer a kernel must write (outputs, gradients, states) then starts as
# NaN, so that an element a kernel forgets to write shows up. None = torch.empty (the fast path).
SCRATCH_FILL: float | None = None


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_impl(attn_impl: str, tensor: Tensor) -> str:
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


def promoted_dtypes(*tensors: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, compute dtype): the promoted input dtype, and it promoted to at least float32."""
    out = tensors[0].dtype
    for x in tensors[1:]:
        out = torch.promote_types(out, x.dtype)
    return out, torch.promote_types(out, torch.float32)


def no_autocast(device: torch.device):
    """Autocast would cast our float32 matmuls back to half precision; switch it off inside."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def in_compute_dtype(fn: Callable[..., Tensor], tensors: Sequence[Tensor], *args) -> Tensor:
    """``fn(*tensors, *args)`` with the tensors cast to their compute dtype (float32 at least) and autocast off;
    the result is cast back to the tensors' promoted dtype. How the ops run their PyTorch reference."""
    out_dtype, dtype = promoted_dtypes(*tensors)
    with no_autocast(tensors[0].device):
        out = fn(*(x.to(dtype) for x in tensors), *args)
    return out.to(out_dtype)


def scratch(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer a Triton kernel fills: uninitialised, or filled with `SCRATCH_FILL` when a test sets it."""
    if SCRATCH_FILL is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, SCRATCH_FILL, dtype=dtype, device=device)
