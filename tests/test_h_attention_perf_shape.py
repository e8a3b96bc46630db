"""What the H-attention Triton launchers ask of a GPU: a 1-D grid within CUDA's limits at any batch x heads, tiles
that fit the shared memory (a head dim no GPU can tile is refused when the model is built), dots at the precision
`torch.get_float32_matmul_precision()` and autocast ask for. The launches are intercepted at Triton's launcher
(under the interpreter, tests/conftest.py), recording the grid, the arguments and the compile-time constants."""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from hier_lm.models import HTransformer1D  # noqa: E402
from hier_lm.ops import h_attention  # noqa: E402
from hier_lm.ops.aot import GRID_LIMITS  # noqa: E402
from hier_lm.ops.common import SHARED_MEMORY_PER_BLOCK  # noqa: E402
from hier_lm.ops.h_attention import check_kernel_fits  # noqa: E402
from hier_lm.ops.h_attention.tiles import attention_tiles  # noqa: E402


class _Seen(list):
    """The recorded launches, and `control.execute` (whether they run)."""


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, grid, positional args, keyword args) of every launch; runs them only when
    `launches.execute` is True."""
    run = InterpretedFunction.run
    seen = _Seen()

    def record(self, *args, grid, warmup, **kwargs):
        if not warmup:
            seen.append((self.fn.__name__, tuple(grid), args, kwargs))
            if not record.execute:
                return None
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    record.execute = False
    monkeypatch.setattr(InterpretedFunction, "run", record)
    seen.control = record
    return seen


def test_grid_stays_within_cuda_limits_at_any_batch_times_heads(launches):
    """B * H = 70 000 > 65 535 (CUDA's limit on grid y and z): the grid is 1-D, tiles x batch x heads."""
    batch, length = 70_000, 40
    q = torch.zeros(1, 1, length, 16).expand(batch, 1, length, 16).requires_grad_()  # no memory per row
    h_attention(q, q, q, 8, causal=True, attn_impl="triton").sum().backward()
    names = {name for name, *_ in launches}
    assert {"_pyramid_kernel", "_attention_kernel", "_dq_kernel", "_dkdv_kernel", "_grad_pyramid_kernel"} <= names
    for name, grid, *_ in launches:
        assert len(grid) == 1 and batch <= grid[0] <= GRID_LIMITS[0], (name, grid)


@pytest.mark.parametrize("precision, want", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dots_follow_the_matmul_precision(launches, precision, want):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        q = torch.randn(1, 1, 40, 16, requires_grad=True)
        h_attention(q, q, q, 8, attn_impl="triton").sum().backward()
    finally:
        torch.set_float32_matmul_precision(previous)
    dots = [kwargs["PREC"] for name, _, _, kwargs in launches if "PREC" in kwargs]
    assert len(dots) == 6 and set(dots) == {want}


def test_autocast_runs_the_kernels_in_the_autocast_dtype(launches):
    """float32 inputs under float16 autocast: the kernels' operands are float16 (fp32 accumulation); the output
    keeps the inputs' dtype and matches the reference at float16's tolerance, forward and backward."""
    launches.control.execute = True
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1, 1, 37, 16, generator=gen).requires_grad_() for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.float16):
        out = h_attention(*leaves, 8, causal=True, attn_impl="triton")
    assert out.dtype == torch.float32
    q_dtypes = {args[0].dtype for name, _, args, _ in launches if name == "_attention_kernel"}
    assert q_dtypes == {torch.float16}
    ref_leaves = [x.detach().half().double().requires_grad_() for x in leaves]
    ref = h_attention(*ref_leaves, 8, causal=True, attn_impl="torch")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("block_size", [16, 64, 66, 128, 256])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_tiles_fit_every_gpu_whatever_the_block_size(block_size, dim):
    """Nr >= 65 with h-RPB once needed 240-448 KB: the tiles no longer grow with Nr (coarse tiles hold at most
    min(Nr, 64) rows) and fit the smallest budget of the GPUs we list, in float32."""
    smallest = min(SHARED_MEMORY_PER_BLOCK.values())
    for fine in (True, False):
        tiles = attention_tiles(block_size, dim, dim, 4, fine, smallest)
        assert tiles["rows"] <= 64 and tiles["cols"] <= 64
    check_kernel_fits(block_size, dim)


def test_the_model_refuses_a_head_dim_no_gpu_can_tile():
    with pytest.raises(ValueError, match="shared memory.*smaller head dim"):
        HTransformer1D(vocab_size=10, d_model=1024, n_layers=1, n_heads=1, d_ff=16, block_size=16)
    with pytest.raises(ValueError, match="shared memory"):
        HTransformer1D(vocab_size=10, d_model=1024, n_layers=1, n_heads=1, d_ff=16, attn_impl="triton")
    HTransformer1D(vocab_size=10, d_model=1024, n_layers=1, n_heads=1, d_ff=16, attn_impl="torch")  # no kernel: no limit
