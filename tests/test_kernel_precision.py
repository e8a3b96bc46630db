"""The kernels' precision policy (hier_lm/ops/common.py): fp32 dots follow torch.get_float32_matmul_precision()
("highest" exact, "high" / "medium" TF32), under autocast the operands take the autocast dtype (fp32 accumulation),
and each precision's results against the float64 reference within its own tolerance.

On CPU the kernels run in Triton's interpreter, which computes TF32 dots exactly and has no bf16 dot: there the
TF32 and bf16 tolerances are checked on a GPU only (HIER_LM_TEST_DEVICE=cuda); that the compiled kernels really
take TF32 / tensor-core instructions is tests/test_aot_compile.py's part.
"""

import os

import pytest
import torch

from hier_lm.ops import common
from hier_lm.ops.chunk_attention import mixed_chunk_attention

kernels = pytest.importorskip("hier_lm.ops.chunk_attention.triton")

DEVICE = torch.device(os.environ.get("HIER_LM_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"


@pytest.fixture
def matmul_precision():
    """Set torch's fp32 matmul precision for one test, restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("precision, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dots_follow_torch_matmul_precision(matmul_precision, precision, expected):
    matmul_precision(precision)
    assert common.dot_precision(torch.float32) == expected
    assert common.dot_precision(torch.float64) == "ieee"
    assert common.dot_precision(torch.bfloat16) is None and common.dot_precision(torch.float16) is None


def test_kernel_dtype_is_the_autocast_dtype_under_autocast():
    q, v = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float16)
    assert common.kernel_dtype(q, v) == torch.float32  # promoted, as the reference computes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert common.kernel_dtype(q, v) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert common.kernel_dtype(q, v) == torch.float32


def inputs(dtype, seed=0, length=100, s=32, e=64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, length, s)] * 4 + [(1, length, e)]
    return [torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_() for shape in shapes]


def rms_errors(inputs_, **kwargs) -> dict[str, float]:
    """RMS error / RMS of the float64 reference, output and every gradient, of the Triton kernels on `inputs_`."""
    grad_out = torch.randn(inputs_[-1].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = mixed_chunk_attention(*inputs_, attn_impl="triton", **kwargs)
    grads = torch.autograd.grad(out, inputs_, grad_out.to(out.dtype))
    high = [x.detach().double().requires_grad_() for x in inputs_]
    ref = mixed_chunk_attention(*high, attn_impl="torch", **kwargs)
    ref_grads = torch.autograd.grad(ref, high, grad_out.double())
    return {name: ((got.double() - want).square().mean().sqrt() / want.square().mean().sqrt()).item()
            for name, got, want in zip(("out", "dqq", "dkq", "dql", "dkl", "dv"), (out, *grads), (ref, *ref_grads))}


# (dtype, fp32 matmul precision, RMS error bound): about the rounding of the operands' format (fp32 exact: 2^-24 of
# accumulation error; TF32 and fp16: 2^-11; bf16: 2^-8). TF32 and bf16 are only distinct on a GPU.
PRECISIONS = [
    (torch.float32, "highest", 1e-6),
    pytest.param(torch.float32, "high", 2e-3, marks=pytest.mark.gpu),
    (torch.float16, "highest", 2e-3),
    pytest.param(torch.bfloat16, "highest", 1.5e-2, marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("dtype, precision, bound", PRECISIONS, ids=str)
def test_flash_kernels_within_the_tolerance_of_each_precision(matmul_precision, dtype, precision, bound):
    matmul_precision(precision)
    errors = rms_errors(inputs(dtype), chunk_size=64, causal=True)
    assert max(errors.values()) < bound, errors


@pytest.mark.parametrize("autocast_dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=str)
def test_flash_under_autocast_runs_in_the_autocast_dtype(monkeypatch, autocast_dtype):
    """As the GAU hands them over under bf16-mixed: q/k in fp32, v in half. The kernels take every operand in the
    autocast dtype (tensor-core dots, fp32 accumulation) rather than promoting all to exact fp32; the output keeps
    the inputs' promoted dtype (as the reference's), each gradient its input's dtype, and the error is that of the
    half format."""
    launched = []
    apply = kernels._MixedChunkAttention.apply
    monkeypatch.setattr(kernels._MixedChunkAttention, "apply",
                        lambda *args: launched.append({x.dtype for x in args[:5]}) or apply(*args))
    qq, kq, ql, kl, v = inputs(torch.float32, seed=2)
    v_half = v.detach().to(autocast_dtype).requires_grad_()
    with torch.autocast(DEVICE.type, dtype=autocast_dtype):
        out = mixed_chunk_attention(qq, kq, ql, kl, v_half, chunk_size=64, causal=True, attn_impl="triton")
    assert launched == [{autocast_dtype}] and out.dtype == torch.float32
    grads = torch.autograd.grad(out.float().square().sum(), (qq, v_half))
    assert grads[0].dtype == torch.float32 and grads[1].dtype == autocast_dtype
    ref = mixed_chunk_attention(qq.double(), kq.double(), ql.double(), kl.double(), v_half.double(), chunk_size=64,
                                causal=True, attn_impl="torch")
    error = ((out.double() - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()
    bound = 2e-3 if autocast_dtype == torch.float16 else 1.5e-2
    assert error < bound


def h_attention_errors(dtype, autocast_dtype=None) -> dict[str, float]:
    """RMS error / RMS of the float64 reference of the Triton h_attention (L = 100, Nr = 16, D = 32, causal, h-RPB),
    output and gradients; the inputs in `dtype`, optionally under autocast to `autocast_dtype`."""
    from hier_lm.ops import h_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 100, 32, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    rpb = (0.1 * torch.randn(2, 63, generator=g)).to(DEVICE).requires_grad_()
    grad_out = torch.randn(1, 2, 100, 32, generator=g).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        out = h_attention(q, k, v, 16, causal=True, rpb=rpb, attn_impl="triton")
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v, rpb), grad_out.to(out.dtype))
    high = [x.detach().double().requires_grad_() for x in (q, k, v, rpb)]
    ref = h_attention(*high[:3], 16, causal=True, rpb=high[3], attn_impl="torch")
    ref_grads = torch.autograd.grad(ref, high, grad_out.double())
    return {name: ((got.double() - want).square().mean().sqrt() / want.square().mean().sqrt()).item()
            for name, got, want in zip(("out", "dq", "dk", "dv", "drpb"), (out, *grads), (ref, *ref_grads))}


@pytest.mark.parametrize("dtype, precision, bound", PRECISIONS, ids=str)
def test_h_attention_kernels_within_the_tolerance_of_each_precision(matmul_precision, dtype, precision, bound):
    matmul_precision(precision)
    errors = h_attention_errors(dtype)
    assert max(errors.values()) < bound, errors


@pytest.mark.parametrize("autocast_dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
                         ids=str)
def test_h_attention_under_autocast_computes_in_the_autocast_dtype(autocast_dtype):
    """fp32 inputs under autocast: the error is that of the half format (fp32 dots would be 1e-6 or better), the
    output fp32 as the inputs."""
    errors = h_attention_errors(torch.float32, autocast_dtype)
    bound = 2e-3 if autocast_dtype == torch.float16 else 1.5e-2
    assert 1e-5 < errors["out"] and max(errors.values()) < bound, errors
