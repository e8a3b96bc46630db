"""The Triton kernels of FLASH's attention (hier_lm/ops/chunk_attention/triton.py) against the PyTorch reference:
outputs and the gradients of every input, causal and bidirectional, lengths that are not multiples of the chunk
or of the kernel tiles, S/E dims 32, 64 and 128 (and odd ones), batch and head dims, NaN-filled buffers; the
`attn_impl=` dispatch; FLASH(attn_impl="triton") against attn_impl="torch".

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a GPU machine:
    HIER_LM_TEST_DEVICE=cuda pytest tests/test_chunk_attention_triton.py
Tolerance (float32): max |kernel - reference| <= 1e-5 * max |reference|, the reference computed in float64 from
the same float32 values (measured: about 5e-7 here). float64 kernels: 1e-12.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from hier_lm.models import FLASH, build_model  # noqa: E402
from hier_lm.ops import common  # noqa: E402
from hier_lm.ops.chunk_attention import mixed_chunk_attention, relu2_attention  # noqa: E402
from hier_lm.ops.chunk_attention import triton as kernels  # noqa: E402

DEVICE = torch.device(os.environ.get("HIER_LM_TEST_DEVICE", "cpu"))
NAMES = ("q_quad", "k_quad", "q_lin", "k_lin", "v")


@pytest.fixture(autouse=True)
def nan_filled_buffers(monkeypatch):
    """Every output, gradient and state buffer starts as NaN: an element no kernel writes fails the test."""
    monkeypatch.setattr(common, "SCRATCH_FILL", float("nan"))


def make_inputs(lead, length, s, e, n_qk=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(*lead, length, s)] * n_qk + [(*lead, length, e)]
    return [torch.randn(shape, generator=g, dtype=dtype).to(DEVICE).requires_grad_() for shape in shapes]


def forward_and_grads(fn, inputs, grad_out, **kwargs):
    out = fn(*inputs, **kwargs)
    return out, torch.autograd.grad(out, inputs, grad_out)


def assert_matches_float64_reference(fn, inputs, names, tol=1e-5, **kwargs):
    """fn(attn_impl="triton") vs fn(attn_impl="torch") on float64 copies: output and every input's gradient."""
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(inputs[-1].shape, generator=g, dtype=inputs[-1].dtype).to(DEVICE)
    out, grads = forward_and_grads(fn, inputs, grad_out, attn_impl="triton", **kwargs)
    high = [x.detach().double().requires_grad_() for x in inputs]
    ref, ref_grads = forward_and_grads(fn, high, grad_out.double(), attn_impl="torch", **kwargs)
    assert out.shape == ref.shape and out.dtype == inputs[0].dtype
    for name, got, want in zip(("out", *names), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element?)"
        atol = tol * want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------ mixed chunk attention

# (leading dims, L, C, S, E): L % C != 0, C < tile, C not a power of 2, L < C, L = 1, S/E of 32, 64, 128 and
# non-powers of 2, [B, L, D] and [B, H, L, D].
MIXED = {
    "B2-L45-C16-S32-E64": ((2,), 45, 16, 32, 64),
    "B1H2-L60-C24-S64-E48": ((1, 2), 60, 24, 64, 48),
    "B1-L40-C32-S128-E128": ((1,), 40, 32, 128, 128),
    "B2-L7-C16-S20-E64 (one short chunk)": ((2,), 7, 16, 20, 64),
    "B1-L1-C4-S32-E32": ((1,), 1, 4, 32, 32),
    "B1-L50-C8-S16-E24 (7 chunks, C < tile)": ((1,), 50, 8, 16, 24),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MIXED))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_mixed_chunk_kernel_matches_reference(causal, case):
    lead, length, c, s, e = MIXED[case]
    inputs = make_inputs(lead, length, s, e, seed=length + c)
    assert_matches_float64_reference(mixed_chunk_attention, inputs, NAMES, chunk_size=c, causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_mixed_chunk_kernel_float64_is_exact(causal):
    """float64 in, float64 accumulation: the kernels' algebra equals the reference's up to rounding."""
    inputs = make_inputs((1,), 37, 32, 32, dtype=torch.float64, seed=3)
    assert_matches_float64_reference(mixed_chunk_attention, inputs, NAMES, tol=1e-12, chunk_size=16, causal=causal)


def test_mixed_chunk_kernel_tf32_tiles():
    """With torch's fp32 matmul precision below "highest" the fp32 kernels use TF32 dots and the tensor-core
    tiles (64 rows, as bf16): exact under the interpreter (which ignores TF32), TF32-close on a GPU."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert kernels._config(torch.empty(1, dtype=torch.float32), 64, 32, 64)["BM"] == 64
        inputs = make_inputs((1,), 100, 32, 64, seed=8)
        assert_matches_float64_reference(mixed_chunk_attention, inputs, NAMES, tol=1e-5 if DEVICE.type == "cpu"
                                         else 1e-2, chunk_size=64, causal=True)
    finally:
        torch.set_float32_matmul_precision(previous)


# fp16 runs in the interpreter; bf16 only on a GPU (the interpreter does not support bf16 tl.dot)
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_mixed_chunk_kernel_half_precision(dtype, causal):
    """Half inputs feed tl.dot directly (fp32 accumulation) with the tensor-core tiles (64 rows; exact fp32
    uses 16): L = 100, C = 64, two chunks, the second partial. RMS error vs the float64 result about the
    rounding of the inputs' dtype (fp16: 2^-11, bf16: 2^-8)."""
    inputs = make_inputs((1,), 100, 32, 64, dtype=dtype, seed=4)
    grad_out = torch.randn(inputs[-1].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out, grads = forward_and_grads(mixed_chunk_attention, inputs, grad_out, chunk_size=64, causal=causal,
                                   attn_impl="triton")
    high = [x.detach().double().requires_grad_() for x in inputs]
    ref, ref_grads = forward_and_grads(mixed_chunk_attention, high, grad_out.double(), chunk_size=64, causal=causal,
                                       attn_impl="torch")
    limit = 2e-3 if dtype == torch.float16 else 1.5e-2
    for name, got, want in zip(("out", *NAMES), (out, *grads), (ref, *ref_grads)):
        assert got.dtype == dtype
        ratio = ((got.double() - want).square().mean().sqrt() / want.square().mean().sqrt()).item()
        assert ratio < limit, f"{name}: RMS error ratio {ratio:.2e}"


def test_mixed_dtypes_promote_and_gradients_keep_each_dtype():
    """Under autocast FLASH gives float32 q/k and half v: computed in the promoted dtype, like the reference."""
    qq, kq, ql, kl, v = make_inputs((2,), 21, 16, 32, seed=5)
    v16 = v.detach().half().requires_grad_()
    out = mixed_chunk_attention(qq, kq, ql, kl, v16, chunk_size=8, attn_impl="triton")
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.sum(), (qq, v16))
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.float16
    ref = mixed_chunk_attention(qq, kq, ql, kl, v16, chunk_size=8, attn_impl="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kernel_causality():
    """L = 45, C = 16: perturbing every input at a position (chunk starts and ends, the padded last chunk)
    leaves the kernel's earlier outputs bit-identical and changes the output there."""
    inputs = [x.detach() for x in make_inputs((1,), 45, 16, 32, seed=6)]
    before = mixed_chunk_attention(*inputs, chunk_size=16, attn_impl="triton")
    for position in (0, 15, 16, 33, 44):
        perturbed = [x.clone() for x in inputs]
        for x in perturbed:
            x[:, position] += 1.0
        after = mixed_chunk_attention(*perturbed, chunk_size=16, attn_impl="triton")
        assert torch.equal(before[:, :position], after[:, :position]), f"outputs before {position} changed"
        assert not torch.allclose(before[:, position], after[:, position])


def test_empty_sequence():
    inputs = make_inputs((2,), 0, 8, 16)
    for causal in (True, False):
        assert mixed_chunk_attention(*inputs, chunk_size=4, causal=causal, attn_impl="triton").shape == (2, 0, 16)
        q, k, _, _, v = inputs
        assert relu2_attention(q, k, v, causal=causal, norm=4, attn_impl="triton").shape == (2, 0, 16)


# ------------------------------------------------------------------------------ relu^2 (FLASH-Quad)

QUAD = {
    "B1-L100-S32-E64 (several query tiles)": ((1,), 100, 32, 64),
    "B1H2-L37-S128-E32": ((1, 2), 37, 128, 32),
    "B2-L19-S64-E80": ((2,), 19, 64, 80),
}


@pytest.mark.parametrize("case", sorted(QUAD))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_relu2_kernel_matches_reference(causal, case):
    lead, length, s, e = QUAD[case]
    inputs = make_inputs(lead, length, s, e, n_qk=2, seed=length)
    assert_matches_float64_reference(relu2_attention, inputs, ("q", "k", "v"), causal=causal, norm=128)


# ------------------------------------------------------------------------------ dispatch


def test_dispatch(monkeypatch):
    """auto on CPU tensors is the reference (no kernel launched); triton runs the kernel module; bad values and
    triton on CPU without the interpreter fail with the fix in the message."""
    inputs = [x.detach() for x in make_inputs((1,), 20, 8, 16, seed=7)]
    calls = []
    real = kernels.mixed_chunk_attention_triton

    def spy(*args, **kwargs):
        calls.append(args[-2:])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "mixed_chunk_attention_triton", spy)
    reference = mixed_chunk_attention(*inputs, chunk_size=8, attn_impl="torch")
    if DEVICE.type == "cpu":
        assert torch.equal(mixed_chunk_attention(*inputs, chunk_size=8), reference) and calls == []
    else:
        mixed_chunk_attention(*inputs, chunk_size=8)
        assert calls == [(8, True)]
        calls.clear()
    torch.testing.assert_close(mixed_chunk_attention(*inputs, chunk_size=8, causal=False, attn_impl="triton"),
                               mixed_chunk_attention(*inputs, chunk_size=8, causal=False, attn_impl="torch"))
    assert calls == [(8, False)]

    with pytest.raises(ValueError, match="unknown attention implementation 'cuda'"):
        mixed_chunk_attention(*inputs, chunk_size=8, attn_impl="cuda")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        relu2_attention(inputs[0], inputs[1], inputs[4], norm=8, attn_impl="fast")
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="use attn_impl='torch' or 'auto' on the CPU"):
            mixed_chunk_attention(*inputs, chunk_size=8, attn_impl="triton")
        with pytest.raises(RuntimeError, match="use attn_impl='torch' or 'auto' on the CPU"):
            relu2_attention(inputs[0], inputs[1], inputs[4], norm=8, attn_impl="triton")


def test_reference_checks_run_before_dispatch():
    qq, kq, ql, kl, v = make_inputs((1,), 8, 8, 8)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        mixed_chunk_attention(qq, kq, ql, kl, v, chunk_size=0, attn_impl="triton")
    with pytest.raises(ValueError, match="v must share the leading dims"):
        mixed_chunk_attention(qq, kq, ql, kl, v[:, :7], chunk_size=4, attn_impl="triton")
    with pytest.raises(ValueError, match="norm must be a finite number > 0"):
        relu2_attention(qq, kq, v, norm=0, attn_impl="triton")


# ------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("mode", ["chunk", "quad"])
def test_flash_model_triton_equals_torch(mode):
    """A tiny one-layer FLASH (d 32, s 16, e 64, C 8, L 29: a padded last chunk): logits and every parameter's
    gradient."""
    torch.manual_seed(0)
    config = dict(vocab_size=32, d_model=32, n_layers=1, s=16, mode=mode, chunk_size=8, max_len=64)
    models = {impl: FLASH(**config, attn_impl=impl).to(DEVICE) for impl in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    with torch.no_grad():  # O(1) attention weights (at the N(0, 0.02) init its share of the logits is ~1e-7)
        for model in models.values():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, p.shape[1] ** -0.5, generator=torch.Generator(DEVICE).manual_seed(p.numel()))
    tokens = torch.randint(0, 32, (2, 29), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for impl, model in models.items():
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        results[impl] = (logits, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


def test_flash_attn_impl_argument():
    with pytest.raises(ValueError, match="attn_impl must be one of 'auto', 'torch', 'triton'; got 'flash'"):
        FLASH(vocab_size=8, d_model=8, n_layers=1, s=4, attn_impl="flash")
    # a checkpoint's model config written before attn_impl existed still builds, with the default "auto"
    old = build_model({"name": "flash", "vocab_size": 8, "d_model": 8, "n_layers": 1, "s": 4, "chunk_size": 4})
    assert all(block.gau.attn_impl == "auto" for block in old.blocks)
