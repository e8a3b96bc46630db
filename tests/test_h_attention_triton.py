"""The Triton H-Transformer-1D kernels (`hier_lm/ops/h_attention/triton.py`) against the PyTorch reference
`h_attention(..., attn_impl="torch")`: outputs and the gradients of q, k, v and the h-RPB table, causal and
bidirectional, both value coarsenings, lengths that are not multiples of Nr or of the padded length, head
dims 32 / 64 / 128, per-row padding, and every kernel output buffer pre-filled with NaN.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes are
small; `HIER_LM_TEST_DEVICE=cuda pytest tests/test_h_attention_triton.py` runs the same tests on a GPU.
Tolerances (float32 kernels vs the float64 reference on the same inputs): outputs rtol 1e-4 / atol 2e-5,
gradients rtol 1e-4 / atol 1e-4 (gradients are O(1..10)); float16: 2e-2.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")

from hier_lm.models import HTransformer1D  # noqa: E402
from hier_lm.ops import common, h_attention  # noqa: E402
from hier_lm.ops.h_attention import triton as kernels  # noqa: E402

DEVICE = os.environ.get("HIER_LM_TEST_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def nan_scratch(monkeypatch):
    """Every buffer a kernel writes (o, lse, dq, dk, dv) starts as NaN: an element it forgets shows up."""
    monkeypatch.setattr(common, "SCRATCH_FILL", float("nan"))


def make_inputs(length, dim, batch=1, heads=1, nr=8, value_dim=None, rpb=True, seed=0):
    """float32 q, k, v [B, H, L, D] (q, k scaled up: a peaked softmax) and an h-RPB table [H, 4*Nr - 1]."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (2 * torch.randn(batch, heads, length, dim, generator=gen) for _ in range(2))
    v = torch.randn(batch, heads, length, value_dim or dim, generator=gen)
    table = torch.randn(heads, 4 * nr - 1, generator=gen) if rpb else None
    return [x.to(DEVICE) if x is not None else None for x in (q, k, v, table)]


def compare(q, k, v, rpb, nr, causal, value_coarsening="sum", lengths=None):
    """Forward and all gradients of attn_impl="triton" against the float64 reference."""
    leaves = [x for x in (q, k, v, rpb) if x is not None]
    kernel_leaves = [x.clone().requires_grad_(True) for x in leaves]
    ref_leaves = [x.double().requires_grad_(True) for x in leaves]

    def run(tensors, impl):
        table = tensors[3] if rpb is not None else None
        return h_attention(*tensors[:3], nr, causal=causal, value_coarsening=value_coarsening, rpb=table,
                           lengths=lengths, attn_impl=impl)

    out, ref = run(kernel_leaves, "triton"), run(ref_leaves, "torch")
    assert out.dtype == torch.float32 and out.shape == v.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=2e-5)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    got = torch.autograd.grad(out, kernel_leaves, grad_out)
    want = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for name, g, w in zip("q k v rpb".split(), got, want):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
    return out


@pytest.mark.parametrize(
    "length, nr, dim, causal, value_coarsening, heads, with_rpb",
    [
        (37, 8, 32, True, "sum", 2, True),  # L_pad 64, 3 levels; one rpb table per head
        (37, 8, 32, False, "mean", 1, True),
        (100, 16, 64, True, "mean", 1, False),  # L_pad 128, 3 levels
        (100, 16, 64, False, "sum", 1, True),
        (45, 8, 128, True, "sum", 1, True),  # L_pad 64, 3 levels
        (37, 4, 32, False, "sum", 1, True),  # Nr < 16: tiles padded beyond one block; 4 levels
        (5, 8, 32, True, "sum", 1, True),  # L <= 2 Nr: level 0 only, no coarse launch
    ],
)
def test_matches_reference(length, nr, dim, causal, value_coarsening, heads, with_rpb):
    q, k, v, rpb = make_inputs(length, dim, heads=heads, nr=nr, rpb=with_rpb, seed=length + nr + dim)
    compare(q, k, v, rpb, nr, causal, value_coarsening)


def test_shared_rpb_table():
    q, k, v, rpb = make_inputs(37, 32, heads=2, nr=8)
    compare(q, k, v, rpb[0], 8, causal=False)  # one [4*Nr - 1] table shared by the heads


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_per_row_lengths_and_value_dim(causal):
    """A right-padded batch (one row empty, one full) with E != D: padding outputs are zero, real rows match."""
    q, k, v, rpb = make_inputs(37, 32, batch=3, nr=8, value_dim=16)
    lengths = torch.tensor([37, 20, 0], device=DEVICE)
    out = compare(q, k, v, rpb, 8, causal, lengths=lengths)
    assert torch.equal(out[1, :, 20:], torch.zeros_like(out[1, :, 20:])) and not out[2].any()


def test_float16():
    q, k, v, rpb = make_inputs(37, 32, nr=8)
    half = [x.half() for x in (q, k, v)]
    out = h_attention(*half, 8, causal=True, rpb=rpb, attn_impl="triton")
    assert out.dtype == torch.float16
    ref = h_attention(*(x.double() for x in half), 8, causal=True, rpb=rpb.double(), attn_impl="torch")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu  # Triton's CPU interpreter multiplies bf16 tl.dot operands as raw bits
def test_bfloat16_forward_backward():
    q, k, v, rpb = make_inputs(300, 64, batch=2, heads=2, nr=16)
    leaves = [x.bfloat16().requires_grad_(True) for x in (q, k, v)]
    out = h_attention(*leaves, 16, causal=True, rpb=rpb, attn_impl="triton")
    assert out.dtype == torch.bfloat16
    ref = h_attention(*(x.double() for x in leaves), 16, causal=True, rpb=rpb.double(), attn_impl="torch")
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)
    out.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


# --------------------------------------------------------------------------------- dispatch


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("attn_impl='auto' ran the Triton kernel on CPU tensors")

    monkeypatch.setattr(kernels, "h_attention_triton", fail)
    q = torch.randn(1, 1, 20, 8)
    out = h_attention(q, q, q, 4, attn_impl="auto")
    torch.testing.assert_close(out, h_attention(q, q, q, 4, attn_impl="torch"), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="ran the Triton kernel"):  # the patch is what "triton" calls
        h_attention(q, q, q, 4, attn_impl="triton")


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 20, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        h_attention(q, q, q, 4, attn_impl="triton")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        h_attention(q, q, q, 4, attn_impl="cuda")


def test_float64_has_no_kernel():
    q = torch.randn(1, 1, 20, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="attn_impl='torch'"):
        h_attention(q, q, q, 4, attn_impl="triton")


# --------------------------------------------------------------------------------- the model


def test_model_with_triton_attention_matches_torch_attention():
    """HTransformer1D(attn_impl="triton"): logits and every parameter gradient (h-RPB tables included)
    equal those of attn_impl="torch" with the same weights."""
    config = dict(vocab_size=50, d_model=64, n_layers=1, n_heads=2, d_ff=64, dropout=0.0, block_size=8,
                  max_len=64)
    models = {impl: HTransformer1D(**config, attn_impl=impl).to(DEVICE) for impl in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    tokens = torch.randint(0, 50, (1, 45), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits = {}
    for impl, model in models.items():
        logits[impl] = model(tokens)
        logits[impl].logsumexp(-1).sum().backward()
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
    for (name, p_torch), p_triton in zip(models["torch"].named_parameters(), models["triton"].parameters()):
        torch.testing.assert_close(p_triton.grad, p_torch.grad, rtol=1e-3, atol=1e-4, msg=name)
    assert models["torch"].blocks[0].attn.rpb.grad.abs().sum() > 0


def test_configs_without_attn_impl_still_build():
    """Checkpoints written before `attn_impl` existed store a model config without it: the default is auto."""
    from hier_lm.config import compose_train_config
    from hier_lm.models import build_model

    model = build_model({"name": "h_transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "block_size": 4})
    assert model.blocks[0].attn.attn_impl == "auto"
    assert compose_train_config(["recipe=quickstart_h_transformer"]).model.attn_impl == "auto"
    with pytest.raises(ValueError, match="attn_impl"):
        HTransformer1D(d_model=16, n_layers=1, n_heads=2, attn_impl="cuda")
