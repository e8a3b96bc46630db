"""Device launches of one H-attention call, forward plus backward, with the Triton kernels: at most 40 (ATen ops
that run a kernel plus Triton launches) at every length, counted by `benchmarks.launch_count` (a
`TorchDispatchMode` and a counter at Triton's launcher).

Up to L = 64k the kernels are counted without being run (the interpreter would take minutes); that this gives
the counts of a real run is checked at a small length, where both are taken.
"""

import json

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")

from benchmarks import h_attention_launches  # noqa: E402
from benchmarks.launch_count import count_launches  # noqa: E402
from hier_lm.ops import h_attention  # noqa: E402

BUDGET = 40


def call(length, causal=True, rpb=True, nr=16, batch=1, heads=2, dim=16, impl="triton", lengths=None):
    """A closure running h_attention forward and backward on fresh leaves (no gradient accumulation)."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen).requires_grad_() for _ in range(3))
    table = torch.randn(heads, 4 * nr - 1, generator=gen).requires_grad_() if rpb else None
    grad = torch.randn(batch, heads, length, dim, generator=gen)
    leaves = [x for x in (q, k, v, table) if x is not None]

    def run():
        for x in leaves:
            x.grad = None
        h_attention(q, k, v, nr, causal=causal, rpb=table, lengths=lengths, attn_impl=impl).backward(grad)
    return run


@pytest.mark.parametrize("length", [1, 100, 1024, 8192, 65536])
@pytest.mark.parametrize("causal, rpb", [(True, True), (False, False)], ids=["causal-rpb", "bidir"])
def test_one_call_stays_within_the_launch_budget(length, causal, rpb):
    run = call(length, causal, rpb)
    count_launches(run, execute=False)  # the first call builds the cached tile tables
    count = count_launches(run, execute=False)
    assert count.device_launches <= BUDGET, (count.aten, count.triton)
    assert count.aten_kernels <= 2, count.aten  # the h-RPB gradient's sum (and its zero fill) only
    assert {"_attention_kernel", "_dq_kernel", "_dkdv_kernel"} <= set(count.triton), count.triton


def test_counting_without_running_the_kernels_gives_a_real_runs_counts():
    run = call(40, nr=8, dim=16, heads=1, lengths=torch.tensor([40]))
    count_launches(run, execute=False)
    executed, counted = count_launches(run, execute=True), count_launches(run, execute=False)
    assert executed.aten == counted.aten and executed.triton == counted.triton
    assert executed.bytes_written == counted.bytes_written > 0
    assert sum(executed.triton.values()) >= 6  # pyramid, coarse + fine forward, grad pyramid, dq, dkdv


def test_the_counter_sees_pytorch_ops():
    """The PyTorch reference runs hundreds of ops for the same call: the counter is not blind to them."""
    count = count_launches(call(300, impl="torch"))
    assert count.device_launches > 4 * BUDGET and not count.triton


def test_the_benchmark_records_launches_and_bytes(tmp_path):
    h_attention_launches.main(h_attention_launches.QUICK + ["--out", str(tmp_path)])
    rows = json.loads((tmp_path / "h_attention_launches.json").read_text())["rows"]
    assert [(r["length"], r["impl"]) for r in rows] == [(1024, "triton"), (1024, "torch"), (4096, "triton")]
    assert all(r["device_launches"] <= BUDGET for r in rows if r["impl"] == "triton")
    assert rows[1]["device_launches"] > BUDGET and rows[2]["mb_written"] > rows[0]["mb_written"] > 0
    assert (tmp_path / "h_attention_launches.png").stat().st_size > 0
