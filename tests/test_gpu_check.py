"""benchmarks/gpu_check.py: without a CUDA GPU it exits with status 2 and one line; its report renders every part.
(On a GPU machine the check itself is the test: `python -m benchmarks run gpu_check`.)"""

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_exits_2_with_one_line_without_a_gpu(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "CUDA" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_report_names_the_device_and_every_part():
    results = {
        "device": "NVIDIA H100 80GB HBM3", "parts": list(gpu_check.PARTS), "seconds": 400.0,
        "tests": {"command": "pytest tests/x.py", "returncode": 1, "seconds": 90.0,
                  "counts": {"passed": 40, "failed": 1}, "failures": ["FAILED tests/x.py::test_y - boom"]},
        "kernels": [{"op": "h_attention", "dtype": "bfloat16", "length": 4096, "triton_ms": 2.0, "reference_ms": 9.0,
                     "sdpa_ms": 1.0, "triton_vs_sdpa": 0.5, "triton_peak_mb": 10.0, "reference_peak_mb": 90.0,
                     "sdpa_peak_mb": 8.0},
                    {"op": "h_attention", "dtype": "bfloat16", "length": 65536, "error": "out of memory: x"}],
        "models": [{"family": "flash", "length": 2048, "params_m": 12.5, "loss": 5.5, "step_ms": 80.0},
                   {"family": "hourglass", "length": 2048, "params_m": 9.0, "error": "RuntimeError: y"}],
    }
    text = gpu_check.markdown(results)
    for needle in ("NVIDIA H100", "40 passed, 1 failed", "FAILED tests/x.py::test_y", "| h_attention | bfloat16 | 4096",
                   "L=65536: out of memory", "| flash | 2048", "RuntimeError: y"):
        assert needle in text, needle
    assert gpu_check.headlines(results) == [
        "h_attention Triton vs SDPA (FlashAttention) on NVIDIA H100 80GB HBM3 at L=4096 (bf16, causal fwd+bwd): "
        "0.50x SDPA's speed"]
