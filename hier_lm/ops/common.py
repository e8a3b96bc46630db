"""What the attention ops share: which implementation runs (`attn_impl="auto" | "torch" | "triton"`), the dtype
and autocast handling of the PyTorch references, and the buffers of the Triton kernels.

`auto` picks the Triton kernel for CUDA tensors (when Triton is installed) and the plain PyTorch reference
otherwise. `triton` on CPU tensors runs only under Triton's interpreter (`TRITON_INTERPRET=1`, set before
Triton is imported), which is how the kernels are tested on machines without a GPU. Nothing here imports
Triton or queries a device at import time.

Two policies both kernels follow: the precision of their dots (`dot_precision`) and their tile sizes, picked
from the launch target's shared memory per block (`shared_memory_budget`, `pick_config`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

__all__ = ["IMPLS", "SCRATCH_FILL", "SHARED_MEMORY_PER_BLOCK", "construction_budget", "dot_precision",
           "in_compute_dtype", "kernel_dtype", "no_autocast", "pick_config", "promoted_dtypes", "resolve_impl",
           "scratch", "shared_memory_budget", "triton_installed", "triton_interpreted"]

IMPLS = ("auto", "torch", "triton")

# Tests set this to float("nan"): every buffer a kernel must write (outputs, gradients, states) then starts as
# NaN, so that an element a kernel forgets to write shows up. None = torch.empty (the fast path).
SCRATCH_FILL: float | None = None

# The most shared memory one thread block may use (the opt-in maximum of dynamic shared memory, in bytes), per CUDA
# compute capability: the limit Triton checks when it loads a kernel. sm_80 (A100): 163 KiB; sm_86 / sm_89 / sm_120
# (consumer cards): 99 KiB; sm_90 (H100) and sm_100: 227 KiB.
SHARED_MEMORY_PER_BLOCK = {(7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024,
                           (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024,
                           (12, 0): 99 * 1024}

# Set by `hier_lm.ops.aot.compile_only` while it compiles the kernels for a GPU target without launching them:
# the ops then accept CPU tensors for attn_impl="triton" (their launchers run; nothing is executed on a device).
COMPILE_ONLY: bool = False

_BUDGETS: dict[tuple[int, int], int] = {}  # shared_memory_budget's answers per (driver, device)


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
        if not tensor.is_cuda and not triton_interpreted() and not COMPILE_ONLY:
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


# ----------------------------------------------------------------------------------------- kernel policies


def dot_precision(dtype: torch.dtype) -> str | None:
    """``input_precision`` of the kernels' ``tl.dot`` for operands of `dtype`.

    float32 follows ``torch.get_float32_matmul_precision()`` as PyTorch's own matmuls do: "highest" -> exact
    ``"ieee"`` (FMA units), "high" / "medium" -> ``"tf32"`` (tensor cores). float64 -> ``"ieee"``; float16 and
    bfloat16 -> None (Triton's default: tensor cores). Accumulation is float32 (float64 for float64) in all cases.
    """
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "ieee" if dtype == torch.float64 else None


def kernel_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the kernels' operands take: the autocast dtype when autocast is on for the tensors' device (the
    matmuls then run in half precision with float32 accumulation, as autocast's own matmuls do), otherwise the
    tensors' promoted dtype."""
    device = tensors[0].device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return promoted_dtypes(*tensors)[0]


def shared_memory_budget(device: torch.device | int | None = None) -> int:
    """Bytes of shared memory one thread block may use on the GPU the kernels launch on (`device`: a CUDA device
    or its index, None = the current one): what Triton checks before it launches a kernel, so a launcher that keeps
    its tiles within this budget is never refused. Under Triton's interpreter (no GPU, no limit) the launchers
    tile as for an H100 (sm_90), so that the CPU tests run the tiling an H100 runs."""
    if triton_interpreted():
        return SHARED_MEMORY_PER_BLOCK[(9, 0)]
    from triton.runtime import driver

    active = driver.active
    index = device.index if isinstance(device, torch.device) else device
    if index is None:
        index = active.get_current_device()
    key = (id(active), index)  # asked at every launch: ask the driver once per device
    if key not in _BUDGETS:
        _BUDGETS[key] = int(active.utils.get_device_properties(index)["max_shared_mem"])
    return _BUDGETS[key]


def construction_budget() -> int:
    """The shared-memory budget a model checks its kernel configuration against when it is built: the current
    GPU's when CUDA is available (and Triton installed), otherwise the largest of any GPU, so that a machine without
    one refuses only configurations that no GPU could run."""
    if torch.cuda.is_available() and triton_installed() and not triton_interpreted():
        return shared_memory_budget()
    return max(SHARED_MEMORY_PER_BLOCK.values())


def pick_config(candidates: Sequence[dict], shared_bytes: Callable[[dict], int], budget: int, what: str,
                fix: str) -> dict:
    """The first of `candidates` (kernel configurations, best first: larger tiles and more pipeline stages before
    smaller ones) whose shared memory `shared_bytes(config)` (an upper bound, in bytes) fits `budget`.

    Launchers call it with `shared_memory_budget()`; the models call it at construction (through their op's check
    function) so that a configuration no GPU can run is refused there, not at the first step. No candidate fits:
    a ValueError naming `what` needs how much, the budget, and `fix` (what the user can change).
    """
    for config in candidates:
        if shared_bytes(config) <= budget:
            return config
    least = min(shared_bytes(config) for config in candidates)
    raise ValueError(f"{what} needs at least {least / 1024:.0f} KiB of GPU shared memory per block, more than the "
                     f"{budget / 1024:.0f} KiB this GPU allows: {fix}")
