"""Ahead-of-time compile check of every Triton kernel for sm_80 (A100) and sm_90 (H100), on a machine without a GPU
(hier_lm/ops/aot.py): each kernel reached through its public op's real launcher, forward and backward, compiled with
Triton's compiler and the ptxas of its wheel. Per compiled kernel: shared memory within the target's per-block
limit, grids within CUDA's limits, no register spills for bf16 / fp16 (at most `aot.FP32_SPILL_BOUND` bytes per
thread for fp32), tensor-core instructions in the PTX for bf16 / fp16 and for fp32 when the matmul precision allows
TF32. The checker itself must catch a planted oversize tile and a planted fp32-only dot.

The compiler runs in a subprocess: in this process Triton is interpreted (tests/conftest.py). The default run
compiles `aot.QUICK` (a few minutes on 2 cores the first time, about 2 once Triton's cache holds the kernels); the
covering matrix is marked slow; every combination: `python -m hier_lm.ops.aot --level full`.
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hier_lm.ops import aot
from tests.helpers import subprocess_env

pytest.importorskip("triton")

OPS = Path(aot.__file__).parent


def compiled_env() -> dict:
    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    return env


def compile_matrix(out: Path, level: str) -> dict:
    """`python -m hier_lm.ops.aot --level <level> --json <out>`: every report and the refused configurations."""
    result = subprocess.run([sys.executable, "-m", "hier_lm.ops.aot", "--level", level, "--json", str(out)],
                            env=compiled_env(), capture_output=True, text=True, timeout=3000)
    assert out.exists(), f"the compile check did not finish:\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


def launched_kernels() -> set[str]:
    """The package's @triton.jit functions that a launcher launches (``name[grid](...)``), read from the sources."""
    names = set()
    for path in OPS.rglob("*.py"):
        text = path.read_text()
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+)", text):
            if re.search(rf"\b{name}\[", text):
                names.add(name)
    return names


def assert_clean(result: dict) -> None:
    reports = result["reports"]
    assert not result["refused"], f"configurations refused at launch: {result['refused']}"
    bad = [f"sm_{r['arch']} {r['name']} {r['case']}: {r['problems']}" for r in reports if r["problems"]]
    assert not bad, "\n".join(bad)
    for arch in aot.ARCHS:
        compiled = {r["name"] for r in reports if r["arch"] == arch}
        missing = launched_kernels() - compiled
        assert not missing, f"kernels never compiled for sm_{arch}: {sorted(missing)}"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    return compile_matrix(tmp_path_factory.mktemp("aot") / "quick.json", "quick")


def test_every_kernel_compiles_within_limits_for_sm80_and_sm90(quick):
    assert len(quick["reports"]) >= len(aot.QUICK) * len(aot.ARCHS)
    assert_clean(quick)


def test_tensor_cores_exactly_where_the_precision_allows(quick):
    """Every bf16 / fp16 / TF32 kernel with a dot runs mma instructions, exact fp32 none, and the fp32 dots' precision
    is read off every fp32 kernel (so that the checker's precision rule is never skipped); bf16 on sm_90 takes wgmma
    where the tile allows it (Hopper's warp-group MMA)."""
    for report in quick["reports"]:
        if report["dots"] == 0:
            continue
        case = report["case"]
        exact = case["dtype"] == "float32" and case["precision"] == "highest"
        assert (report["mma"] > 0) != exact, report
        if case["dtype"] == "float32":
            assert report["fp32_dot_precision"] == ("ieee" if exact else "tf32"), report
    assert any(r["wgmma"] > 0 for r in quick["reports"] if r["arch"] == 90 and r["case"]["dtype"] == "bfloat16")


def test_flash_shared_memory_bound_holds_on_each_target(quick):
    """The bound the FLASH launcher picks its tiles by is at least the compiled kernels' shared memory: what makes
    "fits the budget" mean "is not refused at launch"."""
    import torch

    from hier_lm.ops.chunk_attention import triton as kernels

    previous = torch.get_float32_matmul_precision()
    try:
        for r in quick["reports"]:
            case = r["case"]
            if r["name"] not in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dk_kernel", "_bwd_dv_kernel"):
                continue
            torch.set_float32_matmul_precision(case["precision"])
            x = torch.empty(0, dtype=getattr(torch, case["dtype"]))
            chunk = case["chunk"] or aot.RELU2_LENGTH
            cfg = kernels._config(x, chunk, case["s"], case["e"], budget=r["shared_limit"])
            bound = kernels._shared_bytes({**cfg, "bytes": x.element_size()})
            assert r["shared"] <= bound, (r, cfg)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_flash_refuses_at_construction_what_no_gpu_can_tile():
    from hier_lm.models import FLASH

    with pytest.raises(ValueError, match="shared memory per block.*choose a smaller s"):
        FLASH(s=2048, d_model=32, n_layers=1)
    FLASH(s=2048, d_model=32, n_layers=1, attn_impl="torch")  # the reference has no tiles
    FLASH(s=128, d_model=32, n_layers=1)


def test_pick_config_takes_the_first_that_fits():
    from hier_lm.ops.common import pick_config

    candidates = [dict(size=300), dict(size=200), dict(size=100)]
    assert pick_config(candidates, lambda c: c["size"], 250, "k", "fix it") == dict(size=200)
    with pytest.raises(ValueError, match=r"^k needs at least 0 KiB .* more than the 0 KiB this GPU allows: fix it$"):
        pick_config(candidates, lambda c: c["size"], 50, "k", "fix it")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_covering_matrix(tmp_path):
    """Every dtype and matmul precision, head dims 32 / 64 / 128, Nr 16 .. 128 with and without h-RPB, FLASH at the
    model defaults and small sizes, causal and bidirectional, batches past a grid axis (`aot.cases("covering")`,
    about 5 minutes on a quiet 2-core machine, much longer on a busy one)."""
    assert_clean(compile_matrix(tmp_path / "covering.json", "covering"))


# The planted faults: the FLASH launcher with a tile no GPU holds (its shared-memory estimate silenced), and the
# launcher of the old FLASH bug (bf16 inputs promoted to fp32, exact fp32 dots).
PLANT = textwrap.dedent("""
    import json, sys
    import torch
    from dataclasses import asdict
    from hier_lm.ops import aot
    from hier_lm.ops.chunk_attention import triton as kernels

    plant, out = sys.argv[1], sys.argv[2]
    case = dict(op="mixed_chunk_attention", dtype="bfloat16", precision="high", causal=True, s=128, e=256, chunk=256)
    if plant == "oversize":
        candidates = kernels._candidates
        kernels._candidates = lambda *a: [dict(c, BM=256, BN=256, BE=256, num_stages=4) for c in candidates(*a)]
        kernels._shared_bytes = lambda cfg: 0
    else:
        kernels.kernel_dtype = lambda *tensors: torch.float32
        kernels.dot_precision = lambda dtype: "ieee"
    reports, refused = aot.run_matrix([case], archs=(80,))
    open(out, "w").write(json.dumps([asdict(r) for r in reports]))
""")


@pytest.mark.parametrize("plant, expected", [("oversize", "shared memory"), ("fp32_dot", "tensor-core")])
def test_checker_catches_planted_faults(tmp_path, plant, expected):
    script, out = tmp_path / "plant.py", tmp_path / "reports.json"
    script.write_text(PLANT)
    result = subprocess.run([sys.executable, str(script), plant, str(out)], env=compiled_env(), capture_output=True,
                            text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert out.exists(), result.stderr[-3000:]
    reports = json.loads(out.read_text())
    flagged = [r["name"] for r in reports if any(expected in p for p in r["problems"])]
    assert {"_fwd_kernel", "_bwd_dv_kernel"} <= set(flagged), reports


def test_problems_reads_each_limit():
    """The checker's rules on hand-made reports: the exact limits, spill bounds per precision, TF32 expected."""
    base = dict(name="k", arch=80, grid=(1, 1, 1), num_warps=4, num_stages=2, shared=163 * 1024,
                shared_limit=163 * 1024, registers=128, spill_bytes=0, mma=4, wgmma=0, dots=2,
                fp32_dot_precision=None)
    half = dict(dtype="bfloat16", precision="high")
    exact = dict(dtype="float32", precision="highest")
    assert aot.problems(aot.KernelReport(case=half, **base)) == []
    assert aot.problems(aot.KernelReport(case=half, **{**base, "shared": 163 * 1024 + 1}))
    assert aot.problems(aot.KernelReport(case=half, **{**base, "grid": (1, 65536, 1)}))
    assert aot.problems(aot.KernelReport(case=half, **{**base, "spill_bytes": 4}))
    assert aot.problems(aot.KernelReport(case=dict(dtype="float32", precision="high"),
                                         **{**base, "spill_bytes": aot.FP32_SPILL_BOUND + 4}))
    assert aot.problems(aot.KernelReport(case=half, **{**base, "mma": 0}))
    assert aot.problems(aot.KernelReport(case=exact, **{**base, "mma": 0, "fp32_dot_precision": "ieee",
                                                         "spill_bytes": aot.FP32_SPILL_BOUND})) == []
    assert aot.problems(aot.KernelReport(case=exact, **{**base, "spill_bytes": aot.FP32_SPILL_BOUND + 4}))
    tf32 = dict(dtype="float32", precision="high")
    assert aot.problems(aot.KernelReport(case=tf32, **{**base, "fp32_dot_precision": "ieee"}))
    assert aot.problems(aot.KernelReport(case=tf32, **{**base, "fp32_dot_precision": "tf32"})) == []


# Exact fp32 H-attention at head dim 64 once took 64-row tiles and spilled 0.5-4 KB per thread in its backward (an FMA
# dot holds each thread's rows and columns of both operands over the whole reduction, here the 64 streamed rows).
SPILLED = [dict(op="h_attention", dtype="float32", precision="highest", causal=causal, d=64, block_size=nr, rpb=rpb)
           for causal, nr, rpb in ((False, 128, True), (True, 16, True), (True, 64, False))]
COMPILE = ("import json, sys; from dataclasses import asdict; from hier_lm.ops import aot; "
           "reports, refused = aot.run_matrix(json.loads(sys.argv[1])); "
           "open(sys.argv[2], 'w').write(json.dumps(dict(reports=[asdict(r) for r in reports], refused=refused)))")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_exact_fp32_h_attention_backward_stays_within_the_spill_bound(tmp_path):
    out = tmp_path / "spilled.json"
    result = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(SPILLED), str(out)], env=compiled_env(),
                            capture_output=True, text=True, timeout=1200, cwd=Path(__file__).parents[1])
    assert out.exists(), result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not data["refused"], data["refused"]
    backward = [r for r in data["reports"] if r["name"] in ("_dq_kernel", "_dkdv_kernel")]
    assert len(backward) == 2 * 2 * len(SPILLED) * len(aot.ARCHS)  # coarse and level-0, per case and target
    bad = [f"sm_{r['arch']} {r['name']} {r['case']}: {r['problems']}" for r in data["reports"] if r["problems"]]
    assert not bad, "\n".join(bad)
