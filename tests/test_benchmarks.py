"""The benchmark scripts run end to end on tiny settings and write their json, markdown and plot."""

import json
import math

from benchmarks import hourglass_speed, same_compute
from tests.helpers import TINY_MODEL


def test_same_compute_trains_both_models_for_the_budget(corpus_dir, tmp_path):
    data = [f"data.paths=[{corpus_dir}/*.py]", "data.seq_len=32", "data.batch_size=4", "data.num_workers=0"]
    runs = same_compute.main([
        "--budget", "2", "--evals", "2", "--val-bytes", "2048", "--out", str(tmp_path),
        "--run", "hourglass", "quickstart", *data, *TINY_MODEL["hourglass"],
        "--run", "transformer", "quickstart_transformer", *data, *TINY_MODEL["transformer"],
    ])
    assert [r["name"] for r in runs] == ["hourglass", "transformer"]
    for run in runs:
        assert run["steps"] > 0 and len(run["curve"]) == 3  # at 0 s, half-way and at the end
        assert run["curve"][0]["bpc"] > run["curve"][-1]["bpc"]  # it learned something
        assert math.isfinite(run["final_valid_bpc"])
    saved = json.loads((tmp_path / "same_compute.json").read_text())
    assert saved["budget_s"] == 2 and len(saved["runs"]) == 2 and "cpu" in saved["machine"]
    assert "| hourglass |" in (tmp_path / "same_compute.md").read_text()
    assert (tmp_path / "same_compute.png").stat().st_size > 1000


def test_hourglass_speed_baseline_and_generation(tmp_path):
    results = hourglass_speed.main(["--parts", "baseline", "generation", "--lengths", "64", "--d-model", "32",
                                    "--gen-tokens", "12", "--out", str(tmp_path)])
    (row,) = results["baseline"]
    assert row["flop_ratio"] > 1  # 8 of the Hourglass' 12 layers run at a quarter of the length
    assert row["hourglass_tokens_per_s"] > 0 and row["transformer_tokens_per_s"] > 0
    assert all(r["same_tokens"] for r in results["generation"])
    assert json.loads((tmp_path / "hourglass_speed.json").read_text())["generation"][0]["tokens"] == 12
    assert (tmp_path / "hourglass_speed.png").stat().st_size > 1000
