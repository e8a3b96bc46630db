"""The CPU path of `h_attention` (`hier_lm/ops/h_attention/recompute.py`: the reference's forward without a graph,
a hand-derived recomputing backward) against the definition differentiated by autograd
(`reference.h_attention`), in float64: outputs and the gradients of q, k, v and the h-RPB table, causal and
bidirectional, both value coarsenings, per-row padding, one table shared by the heads, E != D, several levels, and
steps of a few rows (steps that cross head boundaries and the ends of the run of blocks)."""

import pytest
import torch

from benchmarks.common import cpu_allocation_profile
from hier_lm.ops import h_attention
from hier_lm.ops.h_attention import recompute, reference


def _leaves(batch, heads, length, dim, value_dim, block_size, shared_rpb, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (2 * torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(batch, heads, length, value_dim, generator=gen, dtype=torch.float64)
    rpb = torch.randn(1 if shared_rpb else heads, 4 * block_size - 1, generator=gen, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, rpb)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("value_coarsening", ["sum", "mean"])
@pytest.mark.parametrize("padded, shared_rpb", [(False, False), (True, True)], ids=["full-rows", "padded-rows"])
def test_matches_the_definition_and_its_autograd_gradient(causal, value_coarsening, padded, shared_rpb):
    leaves = _leaves(3, 2, 45, 8, 5, 4, shared_rpb)  # L_pad 64, Nr 4: 4 levels
    lengths = torch.tensor([45, 20, 0]) if padded else None
    want = reference.h_attention(*leaves[:3], 4, causal, value_coarsening, leaves[3], lengths)
    got = recompute.h_attention(*leaves[:3], 4, causal, leaves[3], lengths)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, g, w in zip("q k v rpb".split(), torch.autograd.grad(got, leaves, grad),
                          torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("chunk_rows", [4, 12])
@pytest.mark.parametrize("padded, shared_rpb", [(False, False), (True, True), (True, False)],
                         ids=["full-rows", "padded-shared-rpb", "padded"])
def test_small_steps_match_the_definition(monkeypatch, causal, chunk_rows, padded, shared_rpb):
    """Steps of 1 or 3 blocks of 4 rows: some hold blocks of two heads (gathered h-RPB rows), some start at a
    block without a left neighbour in the run."""
    monkeypatch.setattr(recompute, "CHUNK_ROWS", chunk_rows)
    leaves = _leaves(2, 3, 45, 8, 5, 4, shared_rpb, seed=2)
    lengths = torch.tensor([45, 17]) if padded else None
    want = reference.h_attention(*leaves[:3], 4, causal, "mean", leaves[3], lengths)
    got = recompute.h_attention(*leaves[:3], 4, causal, leaves[3], lengths)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name, g, w in zip("q k v rpb".split(), torch.autograd.grad(got, leaves, grad),
                          torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


def test_public_torch_path_runs_it_without_dropout(monkeypatch):
    """`attn_impl="torch"` runs the recomputing path when dropout_p is 0, the definition otherwise."""
    calls = []
    monkeypatch.setattr(recompute, "h_attention", lambda *args: calls.append("recompute") or reference.h_attention(
        *args[:3], args[3], args[4], "sum", *args[5:]))
    q = torch.randn(1, 1, 20, 4)
    h_attention(q, q, q, 4, attn_impl="torch")
    assert calls == ["recompute"]
    h_attention(q, q, q, 4, attn_impl="torch", dropout_p=0.5)
    assert calls == ["recompute"]


def test_keeps_less_memory_than_the_definition():
    """Between forward and backward it keeps the output and its log-sum-exp only, not autograd's graph."""
    leaves = [x.detach().float().requires_grad_() for x in _leaves(1, 2, 512, 32, 32, 16, False)]
    grad = torch.randn(1, 2, 512, 32)

    def run(fn):
        return cpu_allocation_profile(lambda: fn().backward(grad))[1]

    lean = run(lambda: recompute.h_attention(*leaves[:3], 16, True, leaves[3], None))
    graph = run(lambda: reference.h_attention(*leaves[:3], 16, True, "sum", leaves[3], None))
    assert lean < 0.8 * graph, (lean, graph)
