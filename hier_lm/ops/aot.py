"""Ahead-of-time compile check of the Triton kernels for GPUs this machine does not have (sm_80, sm_90).

``compile_only(arch)`` makes a compile-only Triton driver the active one: it reports the target
``GPUTarget("cuda", arch, 32)`` and, instead of launching a kernel, compiles it (Triton's own compiler and the
ptxas of its wheel) and records it with its grid. Inside it the public ops run their real launchers on small CPU
tensors (``attn_impl="triton"``), forward and backward; the outputs are meaningless (nothing runs), what counts is
which kernels the launchers compile, with which tiles. ``inspect`` then reads each compiled kernel: shared memory,
registers and spills (``cuobjdump -res-usage`` on the cubin), tensor-core instructions in the PTX; ``problems``
says what is wrong with it. Run it in a process where Triton is not interpreted (``TRITON_INTERPRET`` unset):

    python -m hier_lm.ops.aot                      # a covering matrix for sm_80 and sm_90, a table on stdout
    python -m hier_lm.ops.aot --level full --json out.json   # every combination (long: ~5 s per case and target)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hier_lm.ops import common

__all__ = ["ARCHS", "BIG_BATCH", "FP32_SPILL_BOUND", "GRID_LIMITS", "LEVELS", "QUICK", "RELU2_LENGTH", "CompiledLaunch",
           "KernelReport", "cases", "compile_only", "inspect", "problems", "run_matrix"]

ARCHS = (80, 90)
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid.x, grid.y, grid.z
RELU2_LENGTH = 70  # the length of the relu2_attention cases (one chunk of L tokens)
FP32_SPILL_BOUND = 512  # bytes of register spills per thread tolerated for fp32 kernels; none for bf16 / fp16


@dataclass
class CompiledLaunch:
    """One launch a launcher asked for: the kernel's name, the target, its grid and the compiled kernel."""

    name: str
    arch: int
    grid: tuple[int, int, int]
    kernel: object  # triton.compiler.CompiledKernel
    case: dict = field(default_factory=dict)  # the op configuration that launched it


@dataclass
class KernelReport:
    """What `inspect` reads off one compiled kernel; `problems` lists what is wrong with it."""

    name: str
    arch: int
    case: dict
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per block
    shared_limit: int
    registers: int
    spill_bytes: int  # bytes of local memory per thread (register spills)
    mma: int  # tensor-core instructions in the PTX: mma.sync (sm_80) + wgmma (sm_90)
    wgmma: int
    dots: int  # tl.dot count in the Triton IR
    fp32_dot_precision: str | None  # "ieee" / "tf32" for dots on fp32 operands, None when none
    problems: list[str] = field(default_factory=list)


def _ptxas_tool(name: str) -> str:
    from triton import knobs

    return str(Path(knobs.nvidia.ptxas.path).with_name(name))


class _Utils:
    """The part of the CUDA driver utilities the JIT asks for before a launch: the device's limits."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": common.SHARED_MEMORY_PER_BLOCK[divmod(self.arch, 10)], "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32}


def _driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        """Reports the target `arch` and a device per target (the JIT keeps its caches per device)."""

        def __init__(self):
            self.utils = _Utils(arch)

        @staticmethod
        def is_active():
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("the compile-only driver builds no launchers")

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return arch

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return divmod(arch, 10)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("the compile-only driver runs nothing")

    return CompileOnlyDriver()


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list[CompiledLaunch]]:
    """Within: Triton compiles for ``sm_<arch>`` and launches nothing; yields the list of launches it records."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if knobs.runtime.interpret or common.triton_interpreted():
        raise RuntimeError("compile_only needs compiled Triton: run it in a process without TRITON_INTERPRET=1")
    if divmod(arch, 10) not in common.SHARED_MEMORY_PER_BLOCK:
        raise ValueError(f"unknown target sm_{arch}; choose one of "
                         f"{sorted(a * 10 + b for a, b in common.SHARED_MEMORY_PER_BLOCK)}")
    launches: list[CompiledLaunch] = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            grid = tuple(grid) + (1,) * (3 - len(grid))
            launches.append(CompiledLaunch(self.fn.__name__, arch, tuple(int(g) for g in grid), kernel))
        return kernel

    previous, previous_driver = common.COMPILE_ONLY, driver._active  # no GPU here: never build the default driver
    driver.set_active(_driver(arch))
    JITFunction.run = record
    common.COMPILE_ONLY = True
    try:
        yield launches
    finally:
        JITFunction.run = run
        common.COMPILE_ONLY = previous
        driver._active = previous_driver


@functools.lru_cache(maxsize=None)
def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local memory bytes per thread) of a cubin, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_ptxas_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out!r}")
    return int(match[1]), int(match[2]) + int(match[3])


def _fp32_dot_precision(ttir: str) -> str | None:
    """The input precision of the fp32 dots in the Triton IR (None when no dot takes fp32 operands)."""
    precisions = set()
    for line in ttir.splitlines():
        if "tt.dot " in line and re.search(r": tensor<\d+x\d+xf32> \* tensor<\d+x\d+xf32>", line):
            match = re.search(r"inputPrecision = (\w+)", line)  # not printed: the default, ieee
            precisions.add(match[1] if match else "ieee")
    if not precisions:
        return None
    return "ieee" if "ieee" in precisions else precisions.pop()


def inspect(launch: CompiledLaunch) -> KernelReport:
    """Read one compiled kernel; fills `problems` (see there)."""
    kernel, meta = launch.kernel, launch.kernel.metadata
    registers, spills = _resource_usage(kernel.asm["cubin"])
    ptx, ttir = kernel.asm["ptx"], kernel.asm["ttir"]
    report = KernelReport(
        name=launch.name, arch=launch.arch, case=dict(launch.case), grid=launch.grid, num_warps=meta.num_warps,
        num_stages=meta.num_stages, shared=meta.shared,
        shared_limit=common.SHARED_MEMORY_PER_BLOCK[divmod(launch.arch, 10)], registers=registers,
        spill_bytes=spills, mma=len(re.findall(r"\bmma\.sync\.", ptx)) + len(re.findall(r"\bwgmma\.mma_async", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), dots=len(re.findall(r"\btt\.dot\b", ttir)),
        fp32_dot_precision=_fp32_dot_precision(ttir))
    report.problems = problems(report)
    return report


def problems(report: KernelReport) -> list[str]:
    """What is wrong with a compiled kernel (empty when nothing is):

    * shared memory over the target's per-block limit (the launch would be refused);
    * a grid dimension over CUDA's limits;
    * register spills: none for bf16 / fp16 kernels, at most `FP32_SPILL_BOUND` bytes per thread for fp32 ones;
    * dots without tensor-core instructions where the dtype and matmul precision allow them (bf16 / fp16, and fp32
      unless the matmul precision is "highest"), or fp32 dots at a precision other than the case asks for.
    """
    out, case = [], report.case
    if report.shared > report.shared_limit:
        out.append(f"shared memory {report.shared} B over the sm_{report.arch} limit {report.shared_limit} B")
    for axis, (size, limit) in enumerate(zip(report.grid, GRID_LIMITS)):
        if size > limit:
            out.append(f"grid dimension {axis} = {size} over CUDA's limit {limit}")
    exact = case.get("dtype") == "float32" and case.get("precision") == "highest"
    bound = FP32_SPILL_BOUND if case.get("dtype") == "float32" else 0
    if report.spill_bytes > bound:
        out.append(f"{report.spill_bytes} B of register spills per thread (at most {bound} B allowed)")
    if report.dots and not exact and report.mma == 0:
        out.append(f"{report.dots} dots but no tensor-core instruction (mma / wgmma) in the PTX")
    if case.get("dtype") == "float32" and report.fp32_dot_precision is not None:
        want = "ieee" if exact else "tf32"
        if report.fp32_dot_precision != want:
            out.append(f"fp32 dots at precision {report.fp32_dot_precision}, expected {want} for matmul precision "
                       f"{case.get('precision')!r}")
    return out


# ----------------------------------------------------------------------------------------- the matrix


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _precisions(full: bool) -> list[tuple[str, str]]:
    """(dtype, fp32 matmul precision) pairs: half dtypes once, fp32 at each precision."""
    fp32 = ["highest", "high", "medium"] if full else ["highest", "high"]
    return [("bfloat16", "high"), ("float16", "high")] + [("float32", p) for p in fp32]


def _flash_cases(full: bool) -> list[dict]:
    """FLASH: the model defaults (s = 128, e = 2 * 512, C = 256) and small sizes; FLASH-Quad's relu2_attention.
    Covering: each dtype and precision once causal at the defaults, once bidirectional small, relu2 once."""
    cases = []
    for i, ((dtype, precision), causal) in enumerate(itertools.product(_precisions(full), (True, False))):
        sizes = [(128, 1024, 256), (32, 64, 16), (64, 128, 64), (128, 256, 128)]
        if not full:
            sizes = [sizes[0] if causal else sizes[1 + i % 3]]
        for s, e, chunk in sizes:
            cases.append(dict(op="mixed_chunk_attention", dtype=dtype, precision=precision, causal=causal, s=s, e=e,
                              chunk=chunk))
        if full or causal:
            cases.append(dict(op="relu2_attention", dtype=dtype, precision=precision,
                              causal=causal if full else i % 4 == 0, s=128, e=256, chunk=0))
    return cases


def _h_cases(full: bool) -> list[dict]:
    """H-attention: head dims 32 / 64 / 128, Nr from 16 to 128, with and without h-RPB. Covering: per dtype and
    precision, each head dim once, with Nr and h-RPB and the direction rotating."""
    cases = []
    dims, blocks = (32, 64, 128), (16, 32, 64, 128)
    for i, (dtype, precision) in enumerate(_precisions(full)):
        if full:
            combos = itertools.product(dims, blocks, (False, True), (True, False))
        else:
            combos = [(d, blocks[(i + j) % 4], (i + j) % 2 == 1, j != 1) for j, d in enumerate(dims)]
        for d, nr, rpb, causal in combos:
            cases.append(dict(op="h_attention", dtype=dtype, precision=precision, causal=causal, d=d, block_size=nr,
                              rpb=rpb))
    return cases


# More sequences than CUDA's grid allows on its second and third axes (65,535): the launchers must fold them.
BIG_BATCH = {
    "mixed_chunk_attention": dict(op="mixed_chunk_attention", dtype="float16", precision="high", causal=True, s=16,
                                  e=16, chunk=16, batch=70_000, length=3),
    "h_attention": dict(op="h_attention", dtype="float16", precision="high", causal=True, d=16, block_size=16,
                        rpb=False, batch=35_000, length=3),
}

# The test suite's default: each kernel in each dtype family, causal and bidirectional, the model defaults and
# small sizes, the largest tiles (head dim 128, Nr 64 with h-RPB), exact fp32, and FLASH over a batch too large for
# a grid axis.
QUICK = [
    dict(op="mixed_chunk_attention", dtype="bfloat16", precision="high", causal=True, s=128, e=1024, chunk=256),
    dict(op="mixed_chunk_attention", dtype="float32", precision="highest", causal=False, s=32, e=64, chunk=16),
    dict(op="mixed_chunk_attention", dtype="float32", precision="high", causal=True, s=128, e=1024, chunk=256),
    dict(op="relu2_attention", dtype="float16", precision="high", causal=False, s=128, e=256, chunk=0),
    dict(op="h_attention", dtype="bfloat16", precision="high", causal=True, d=64, block_size=16, rpb=True),
    dict(op="h_attention", dtype="float32", precision="high", causal=False, d=128, block_size=64, rpb=True),
    dict(op="h_attention", dtype="float32", precision="highest", causal=True, d=128, block_size=16, rpb=False),
    dict(op="h_attention", dtype="float16", precision="high", causal=False, d=32, block_size=32, rpb=False),
    BIG_BATCH["mixed_chunk_attention"],
]
LEVELS = ("quick", "covering", "full")


def cases(level: str = "covering") -> list[dict]:
    """The op configurations to compile: `QUICK`, a covering subset of every combination, or all of them."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")
    if level == "quick":
        return [dict(case) for case in QUICK]
    full = level == "full"
    return _flash_cases(full) + _h_cases(full) + [dict(case) for case in BIG_BATCH.values()]


def _run_case(case: dict) -> None:
    """Run the op of `case` forward and backward on small CPU tensors (the kernels are compiled, not run); an
    optional ``batch`` (B, or B x H for h_attention: more than CUDA's 65,535 checks the grids) and ``length``."""
    from hier_lm import ops

    dtype = _DTYPES[case["dtype"]]
    torch.set_float32_matmul_precision(case["precision"])

    def leaf(*shape):
        return torch.zeros(*shape, dtype=dtype).requires_grad_()

    batch = case.get("batch", 1)
    if case["op"] == "h_attention":
        length = case.get("length", 4 * case["block_size"] + 3)  # a few levels, a partial last block
        q, k, v = (leaf(batch, 2, length, case["d"]) for _ in range(3))
        rpb = leaf(2, 4 * case["block_size"] - 1).float() if case["rpb"] else None
        out = ops.h_attention(q, k, v, case["block_size"], case["causal"], rpb=rpb, attn_impl="triton")
    elif case["op"] == "mixed_chunk_attention":
        length = case.get("length", 2 * case["chunk"] + 5)
        qk = [leaf(batch, length, case["s"]) for _ in range(4)]
        out = ops.mixed_chunk_attention(*qk, leaf(batch, length, case["e"]), case["chunk"], case["causal"],
                                        attn_impl="triton")
    else:
        q, k = (leaf(batch, RELU2_LENGTH, case["s"]) for _ in range(2))
        out = ops.relu2_attention(q, k, leaf(batch, RELU2_LENGTH, case["e"]), case["causal"], norm=float(RELU2_LENGTH),
                                  attn_impl="triton")
    out.float().sum().backward()


def run_matrix(case_list: list[dict], archs=ARCHS, progress: bool = False
               ) -> tuple[list[KernelReport], list[dict]]:
    """Compile every case for every target: one report per compiled kernel and case, and the cases the op
    refused with a ValueError (a configuration it does not accept: ``dict(arch, case, error)``)."""
    from tqdm import tqdm

    reports, refused = [], []
    precision = torch.get_float32_matmul_precision()
    try:
        for arch, case in tqdm(list(itertools.product(archs, case_list)), desc="compiling", disable=not progress):
            with compile_only(arch) as launches:
                try:
                    _run_case(case)
                except ValueError as error:
                    refused.append(dict(arch=arch, case=case, error=str(error)))
            distinct: dict[int, CompiledLaunch] = {}  # a kernel launched twice: one report, its largest grid
            for launch in launches:
                first = distinct.setdefault(id(launch.kernel), launch)
                first.grid = tuple(max(a, b) for a, b in zip(first.grid, launch.grid))
            for launch in distinct.values():
                launch.case = case
                reports.append(inspect(launch))
    finally:
        torch.set_float32_matmul_precision(precision)
    return reports, refused


def _table(reports: list[KernelReport]) -> str:
    lines = ["| arch | kernel | case | warps/stages | shared KiB | regs | spill B | mma | problems |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        case = ", ".join(f"{k}={v}" for k, v in r.case.items() if k != "op")
        lines.append(f"| sm_{r.arch} | {r.name} | {r.case['op']}: {case} | {r.num_warps}/{r.num_stages} | "
                     f"{r.shared / 1024:.1f} | {r.registers} | {r.spill_bytes} | {r.mma} | "
                     f"{'; '.join(r.problems) or 'ok'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hier_lm.ops.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        choices=sorted(major * 10 + minor for major, minor in common.SHARED_MEMORY_PER_BLOCK),
                        help="targets (compute capability x 10; default: 80 90)")
    parser.add_argument("--level", choices=LEVELS, default="covering",
                        help="which configurations: the tests' quick set, a covering subset (default) or all")
    parser.add_argument("--json", type=Path, help="also write every report to this JSON file")
    args = parser.parse_args(argv)
    if common.triton_interpreted():
        print("error: TRITON_INTERPRET is set: the compile check needs compiled Triton; run it without that variable",
              file=sys.stderr)
        return 2
    reports, refused = run_matrix(cases(args.level), args.arch, progress=True)
    print(_table(reports))
    for item in refused:
        print(f"refused on sm_{item['arch']}: {item['case']}: {item['error']}")
    if args.json is not None:
        from hier_lm.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(dict(reports=[asdict(r) for r in reports], refused=refused),
                                                indent=1))
    bad = sum(bool(r.problems) for r in reports)
    print(f"{len(reports)} compiled kernels, {bad} with problems, {len(refused)} configurations refused",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
