"""What one call puts on the device: the PyTorch (ATen) ops it dispatches, counted by a `TorchDispatchMode`, the
Triton kernels it launches, counted at Triton's launcher, and the bytes written (the outputs of the ATen ops,
which include every buffer a kernel fills: the launchers allocate them through ATen).

A "device launch" is an ATen op that runs a kernel plus a Triton launch: views (outputs aliasing an input)
bare allocations (`empty`, `empty_strided`) and ops that return no tensor run none and are left out of `device_launches`, though their
bytes count as written (a kernel writes them). With `execute=False` the Triton kernels are counted but not run
(their outputs are then garbage): the host code of the ops never reads device data, so the counts are those of a
real run, at lengths the interpreter could not run in a test's time. Used by the launch-count test and the
`h_attention_kernel` benchmark.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCount", "count_launches"]

_ALLOCATIONS = {"empty", "empty_strided"}


@dataclass
class LaunchCount:
    """What `count_launches` saw during one call."""

    aten: Counter = field(default_factory=Counter)  # ATen op name -> calls (views and allocations included)
    triton: Counter = field(default_factory=Counter)  # Triton kernel name -> launches
    bytes_written: int = 0  # bytes of every non-view ATen output
    free: set = field(default_factory=set)  # names of the view and allocation ops seen (they run no kernel)

    @property
    def aten_kernels(self) -> int:
        """ATen ops that run a device kernel: neither views nor bare allocations."""
        return sum(n for name, n in self.aten.items() if name not in self.free)

    @property
    def device_launches(self) -> int:
        return self.aten_kernels + sum(self.triton.values())


class _Counter(TorchDispatchMode):
    def __init__(self, count: LaunchCount):
        super().__init__()
        self.count = count
        self.paused = False  # inside a Triton launch: the interpreter's own copies are not the op's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        name = func.overloadpacket.__name__
        self.count.aten[name] += 1
        returns_tensor = any(isinstance(x, torch.Tensor) for x in (out if isinstance(out, (tuple, list)) else (out,)))
        if func.is_view or name in _ALLOCATIONS or not returns_tensor:  # no kernel (promote_types: a dtype)
            self.count.free.add(name)
        if not func.is_view:
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor):
                    self.count.bytes_written += x.numel() * x.element_size()
        return out


@contextlib.contextmanager
def _triton_counter(count: LaunchCount, mode: _Counter, execute: bool):
    """Count every Triton launch (compiled `JITFunction` or interpreted `InterpretedFunction`); run it or not."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def patched(cls):
        def run(self, *args, grid, warmup, **kwargs):
            if not warmup:
                count.triton[self.fn.__name__] += 1
                if not execute:
                    return None
            mode.paused = True
            try:
                return originals[cls](self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                mode.paused = False
        return run

    for cls in originals:
        cls.run = patched(cls)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def count_launches(fn: Callable[[], object], execute: bool = True) -> LaunchCount:
    """Run `fn()` (e.g. a forward and its backward) once, counting what it dispatches and launches."""
    count = LaunchCount()
    mode = _Counter(count)
    with _triton_counter(count, mode, execute), mode:
        fn()
    return count
