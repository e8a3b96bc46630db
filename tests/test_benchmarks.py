"""The benchmark scripts run end to end on tiny settings and write their json, markdown and plot."""

import json
import math

import pytest
import torch

from benchmarks import (attention_scaling, data_throughput, generation_speed, hourglass_speed, model_throughput,
                        peers, same_compute, scaling_study)
from benchmarks import __main__ as suite
from tests.helpers import TINY_MODEL


@pytest.mark.slow
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


@pytest.mark.slow
def test_scaling_study_gives_every_model_the_same_flop_budgets(corpus_dir, tmp_path):
    tiny = ["model.d_model=32", "model.d_ff=64", "model.n_heads=2", f"data.paths=[{corpus_dir}/*.py]",
            "data.num_workers=0"]
    results = scaling_study.main([
        "--contexts", "32", "--budgets", "0.02", "0.04", "--batch-tokens", "128", "--val-bytes", "2048",
        "--calibration-steps", "1", "--warmup-steps", "2", "--models", "transformer", "hourglass", "--set", *tiny,
        "--variant", "hourglass_k2", "hourglass", "model.hierarchy='1@1 4@2 1@1'", "--out", str(tmp_path)])
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["transformer", "hourglass", "hourglass_k2"]
    budgets = [p["budget_flops"] for p in runs["transformer"]["points"]]
    assert len(budgets) == 2 and budgets[1] == pytest.approx(2 * budgets[0])
    for run in runs.values():
        assert [p["budget_flops"] for p in run["points"]] == budgets  # the same FLOPs for every model
        for point in run["points"]:  # a budget's steps spend its FLOPs (at least the warm-up's worth)
            assert point["flops"] == point["steps"] * run["flops_per_token"] * run["batch_size"] * 32
            assert point["flops"] <= max(point["budget_flops"], 4 * run["flops_per_token"] * run["batch_size"] * 32)
            assert math.isfinite(point["bpc"])
        assert run["points"][1]["steps"] > run["points"][0]["steps"]  # twice the FLOPs: more steps
    # the Hourglass shortens 4x in the middle: fewer FLOPs per byte than the Transformer at equal parameters
    assert runs["hourglass"]["flops_per_token"] < runs["transformer"]["flops_per_token"]
    assert "| hourglass_k2 |" in (tmp_path / "scaling_study.md").read_text()
    assert (tmp_path / "scaling_study.png").stat().st_size > 1000

    # --merge: a later ablation arm joins the results at exactly the budgets measured before, the others kept
    study = ["--contexts", "32", "--budgets", "9", "--batch-tokens", "128", "--val-bytes", "2048", "--warmup-steps",
             "2", "--set", *tiny, "--out", str(tmp_path), "--merge"]
    merged = scaling_study.main([*study, "--models", "--variant", "hourglass_k2", "hourglass",
                                 "model.hierarchy='1@1 2@2 1@1'"])
    assert [r["name"] for r in merged["runs"]] == ["transformer", "hourglass", "hourglass_k2"]
    assert [p["budget_flops"] for p in merged["runs"][2]["points"]] == budgets  # not calibrated again
    assert merged["runs"][2]["overrides"][-1] == "model.hierarchy='1@1 2@2 1@1'"  # replaced
    assert merged["runs"][0] == runs["transformer"]
    with pytest.raises(SystemExit, match="other lr"):
        scaling_study.main([*study, "--lr", "1e-3", "--models", "transformer"])
    assert [r["seed"] for r in merged["runs"]] == [0, 0, 0]  # the recipes' seed, recorded with each arm


def test_scaling_study_compares_each_seed_with_the_transformer_of_that_seed(tmp_path):
    """Arms that differ only in `seed=` are one model: 'vs Transformer' pairs seeds, and a table of seeds gives
    each such model's mean, spread and mean paired difference."""
    def arm(name, recipe, overrides, seed, bpcs):
        return {"name": name, "context": 64, "recipe": recipe, "overrides": overrides, "seed": seed,
                "non_embedding_parameters": 1000, "flops_per_token": 1e6, "budget_minutes": [1, 2],
                "points": [{"steps": 1, "tokens": 64, "seconds": 1.0, "flops": f, "bpc": b}
                           for f, b in zip((1e9, 2e9), bpcs)]}
    runs = [arm("transformer", "t", ["x=1"], 0, [3.0, 2.0]), arm("hourglass", "h", ["x=1"], 0, [2.5, 1.9]),
            arm("hourglass_seed1", "h", ["x=1", "seed=1"], 1, [2.7, 1.5]),
            arm("transformer_seed1", "t", ["x=1", "seed=1"], 1, [3.2, 2.1]),
            arm("flash_seed1", "f", ["seed=1"], 1, [2.0, 1.0])]
    results = {"val_bytes": 4096, "runs": runs}
    text = scaling_study.markdown(results)
    main, seeds = text.split("## Seeds")
    assert "| 64 | hourglass_seed1 | 1 |" in main and "| 1.5 | -0.6000 |" in main  # 1.5 - 2.1, not 1.5 - 2.0
    assert "| 64 | flash_seed1 | 1 |" in main and "| 1 | -1.1000 |" in main  # its seed's Transformer
    names = [line.split(" | ")[1] for line in main.splitlines() if line.startswith("| 64 |")]
    assert names == ["transformer"] * 2 + ["transformer_seed1"] * 2 + ["hourglass"] * 2 + ["hourglass_seed1"] * 2 \
        + ["flash_seed1"] * 2  # the seeds of a model side by side
    # hourglass at 2 min: 1.9 / 1.5, mean 1.7, spread 0.4, paired differences -0.1 and -0.6: mean -0.35
    assert "| 64 | hourglass | 0, 1 | 2 min | 1.900 / 1.500 | 1.700 | 0.400 | -0.350 |" in seeds
    assert "| 64 | transformer | 0, 1 | 1 min | 3.000 / 3.200 | 3.100 | 0.200 | +0.000 |" in seeds
    assert "flash" not in seeds  # one seed only
    scaling_study.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.slow
def test_hourglass_speed_baseline_and_generation(tmp_path):
    results = hourglass_speed.main(["--parts", "baseline", "generation", "--lengths", "64", "--d-model", "32",
                                    "--gen-tokens", "12", "--out", str(tmp_path)])
    (row,) = results["baseline"]
    assert row["flop_ratio"] > 1  # 8 of the Hourglass' 12 layers run at a quarter of the length
    assert row["hourglass_tokens_per_s"] > 0 and row["transformer_tokens_per_s"] > 0
    assert all(r["same_tokens"] for r in results["generation"])
    assert json.loads((tmp_path / "hourglass_speed.json").read_text())["generation"][0]["tokens"] == 12
    assert (tmp_path / "hourglass_speed.png").stat().st_size > 1000


# -- the suite: attention scaling, peers, model throughput, generation speed, data throughput, the entry point --


def _written(folder, name: str) -> dict:
    """The benchmark's json (its machine and load recorded), after checking that its md and png exist."""
    saved = json.loads((folder / f"{name}.json").read_text())
    assert saved["benchmark"] == name and "cpu" in saved["machine"] and saved["load_1min_before"] >= 0
    assert (folder / f"{name}.md").read_text().startswith(f"# {name}\n")
    assert (folder / f"{name}.png").stat().st_size > 1000
    return saved


@pytest.fixture
def one_thread():
    """One torch thread while a benchmark smoke-runs: on a shared 2-core machine, two threads contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scaling_dir(tmp_path_factory):
    """attention_scaling run through the suite's entry point with --quick (L = 64 and 128, one thread)."""
    out = tmp_path_factory.mktemp("suite")
    threads = torch.get_num_threads()
    suite.main(["run", "attention_scaling", "--quick", "--threads", "1", "--out", str(out)])
    torch.set_num_threads(threads)
    return out


def test_attention_scaling_quick_run_through_the_suite(scaling_dir):
    saved = _written(scaling_dir, "attention_scaling")
    assert [r["length"] for r in saved["rows"]] == [64, 128]
    for row in saved["rows"]:
        assert not row["skipped"]
        for method in attention_scaling.METHODS:
            assert row[f"{method}_s"] > 0 and row[f"{method}_peak_mb"] > 0
        assert row["sdpa_over_h_attention_time"] == pytest.approx(row["sdpa_s"] / row["h_attention_s"])
    big = saved["rows"][1]
    assert big["softmax_peak_mb"] > 3 * saved["rows"][0]["softmax_peak_mb"]  # its L x L buffers: 4x at 2x L
    assert saved["slopes"]["softmax"]["memory"] > 1.5 and saved["slopes"]["h_attention"]["points"] == 2
    assert "| 128 |" in (scaling_dir / "attention_scaling.md").read_text()


def test_attention_scaling_skips_points_over_the_budget_or_memory_cap(tmp_path, one_thread):
    cap = attention_scaling.softmax_bytes(32) / 2**30  # the materialised softmax fits at L=32, not at 64
    results = attention_scaling.main(["--lengths", "32", "64", "--methods", "softmax", "h_attention", "--repeats", "1",
                                      "--softmax-mem-gib", str(cap), "--budget", "1e-9", "--out", str(tmp_path)])
    first, second = results["rows"]
    assert "softmax_s" in first and "h_attention_s" in first and not first["skipped"]
    assert "L x L buffers need" in second["skipped"]["softmax"]
    assert "budget" in second["skipped"]["h_attention"] and "h_attention_s" not in second
    assert results["slopes"]["h_attention"]["time"] is None  # one point: no slope
    assert "| 64 | — | — |" in (tmp_path / "attention_scaling.md").read_text()


def test_peers_side_by_side_and_defect_probes(tmp_path, one_thread):
    pytest.importorskip("h_transformer_1d", reason="the ports: pip install -r benchmarks/requirements.txt")
    pytest.importorskip("flash_pytorch", reason="the ports: pip install -r benchmarks/requirements.txt")
    results = peers.main([*peers.QUICK, "--out", str(tmp_path)])
    saved = _written(tmp_path, "peers")
    assert [(r["pair"], r["length"]) for r in saved["speed"]] == [("h_transformer", 128), ("flash", 128)]
    for row in saved["speed"]:
        assert row["hier_lm_s"] > 0 and row["peer_s"] > 0 and row["hier_lm_peak_mb"] > 0
        assert abs(row["hier_lm_params"] / row["peer_params"] - 1) < 0.1  # matched as closely as the designs allow
    weights = results["h_weights"]
    assert weights["hier_lm"]["causal_coverage"] == 1 and weights["hier_lm"]["max_abs_error_vs_exact"] < 1e-5
    assert weights["peer"]["causal_coverage"] < 0.9 and weights["peer"]["max_row_sum_error"] > 0.5  # its defects
    assert weights["hier_lm"]["max_future_weight"] == 0
    prefix = results["prefix"]
    assert prefix["h_transformer_hier_lm"] < 1e-5 and prefix["flash_hier_lm"] < 1e-5
    assert prefix["flash_peer_gau"] > 1e-4  # the port's GAU divides by the runtime length


def test_model_throughput_at_equal_tokens_per_step(tmp_path, one_thread):
    results = model_throughput.main(["--lengths", "32", "--tokens-per-step", "64", "--d-model", "32",
                                     "--repeats", "1", "--out", str(tmp_path)])
    rows = _written(tmp_path, "model_throughput")["rows"]
    assert [(r["family"], r["length"], r["batch_size"]) for r in rows] == [(f, 32, 2) for f in model_throughput.FAMILIES]
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(64 / row["step_s"]) and row["parameters"] > 0
    assert all(r["vs_transformer"] == 1 for r in results["rows"] if r["family"] == "transformer")
    with pytest.raises(ValueError, match="not a multiple"):
        model_throughput.main(["--lengths", "48", "--tokens-per-step", "64", "--out", str(tmp_path)])


def test_generation_speed_cached_equals_uncached_for_every_family(tmp_path, one_thread):
    results = generation_speed.main(["--tokens", "6", "--repeats", "1", "--out", str(tmp_path)])
    rows = _written(tmp_path, "generation_speed")["rows"]
    assert [r["model"] for r in rows] == list(generation_speed.RECIPES)
    assert all(r["same_tokens"] and r["tokens"] == 6 and r["cached_s"] > 0 for r in results["rows"])


def test_data_throughput_measures_loader_and_model_in_one_run(corpus_dir, tmp_path, one_thread):
    overrides = [f"data.paths=[{corpus_dir}/*.py]", "data.seq_len=32", "data.batch_size=4", *TINY_MODEL["hourglass"]]
    results = data_throughput.main([*data_throughput.QUICK, "--out", str(tmp_path), *overrides])
    saved = _written(tmp_path, "data_throughput")
    assert saved["tokens_per_batch"] == 4 * 32 and [r["num_workers"] for r in saved["loader"]] == [0, 1]
    for row in results["loader"]:
        assert row["ratio_vs_model"] == pytest.approx(row["tokens_per_s"] / results["model"]["tokens_per_s"])
        assert row["batches_per_s"] > 0 and row["first_batch_s"] > 0
    assert "| 0 |" in (tmp_path / "data_throughput.md").read_text()


def test_suite_lists_and_rejects_unknown_names(capsys):
    suite.main(["list"])
    listed = capsys.readouterr().out
    for name in ("attention_scaling", "peers", "model_throughput", "generation_speed", "data_throughput"):
        assert name in listed
    with pytest.raises(SystemExit, match="unknown benchmark"):
        suite.main(["run", "no_such_benchmark"])


def test_results_page_generated_whole(scaling_dir, tmp_path, capsys):
    page = tmp_path / "docs" / "results.md"
    suite.main(["results", "--out", str(page), "--results", str(scaling_dir)])
    text = page.read_text()
    assert text.startswith("# Results\n\nGenerated by `python -m benchmarks results`")
    assert "## Ratios" in text and "## attention_scaling" in text
    assert json.loads((scaling_dir / "attention_scaling.json").read_text())["machine"]["cpu"] in text
    assert "### Time (s)" in text and "| 128 |" in text  # the benchmark's own headings, one level deeper
    title, _, machine_line = (scaling_dir / "attention_scaling.md").read_text().splitlines()[:3]
    assert f"\n{title}\n" not in text and machine_line not in text  # the benchmark's title and machine line dropped
    assert f"![attention_scaling](../../{scaling_dir.name}/attention_scaling.png)" in text  # relative to the page
    assert text.index("## Ratios") < text.index("## attention_scaling")
    suite.main(["results", "--out", str(page), "--results", str(scaling_dir)])
    assert page.read_text() == text  # regenerating is idempotent
    page.write_text("edited by hand\n")
    suite.main(["readme", "--out", str(page), "--results", str(scaling_dir)])  # the deprecated alias
    assert page.read_text() == text and "deprecated" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no results"):
        suite.main(["results", "--out", str(page), "--results", str(tmp_path / "empty")])


def test_h_attention_kernel_tiny_cpu_run(tmp_path):
    """The kernel benchmark's plumbing on CPU (reference and SDPA; the Triton kernels, slow in the
    interpreter, are checked by tests/test_h_attention_triton.py): rows, ratios, json, md and png."""
    from benchmarks import h_attention_kernel

    results = h_attention_kernel.main(["--device", "cpu", "--methods", "torch", "sdpa", "--lengths", "48", "--out",
                                       str(tmp_path)])
    (row,) = results["rows"]
    assert row["length"] == 48 and row["torch_ms"] > 0 and row["sdpa_ms"] > 0 and row["torch_peak_mb"] > 0
    assert row["triton_ms"] is None and row["time_ratio_vs_sdpa"] is None  # not run: no ratio
    saved = json.loads((tmp_path / "h_attention_kernel.json").read_text())
    assert saved["benchmark"] == "h_attention_kernel" and saved["dtype"] == "float32" and len(saved["rows"]) == 1
    assert "| 48 |" in (tmp_path / "h_attention_kernel.md").read_text()
    assert (tmp_path / "h_attention_kernel.png").stat().st_size > 1000


def test_flash_kernel_tiny_interpreted_run(tmp_path):
    """The FLASH kernel benchmark on CPU: the Triton kernels in the interpreter (tests/conftest.py) beside the
    reference at one tiny size; agreement, ratios, json, md and png."""
    from benchmarks import flash_kernel

    results = flash_kernel.main(["--device", "cpu", "--lengths", "40", "--s", "16", "--e", "32", "--chunk", "16",
                                 "--repeats", "1", "--out", str(tmp_path)])
    (row,) = results["rows"]
    assert results["interpreted"] and results["triton_skipped"] is None
    assert row["length"] == 40 and row["triton_s"] > 0 and row["torch_s"] > 0 and row["rms_error"] < 1e-5
    assert row["speedup"] == row["torch_s"] / row["triton_s"]
    saved = json.loads((tmp_path / "flash_kernel.json").read_text())
    assert saved["benchmark"] == "flash_kernel" and saved["config"]["dtype"] == "float32"
    assert "| causal | 40 |" in (tmp_path / "flash_kernel.md").read_text()
    assert (tmp_path / "flash_kernel.png").stat().st_size > 1000
    assert flash_kernel.headlines(saved) == []  # interpreter times are no headline


def test_image_sampling_measures_and_checks_its_estimate(tmp_path, one_thread):
    from benchmarks import image_sampling

    results = image_sampling.main([*image_sampling.QUICK, "--out", str(tmp_path)])
    check, row = _written(tmp_path, "image_sampling")["rows"]
    assert (check["image_size"], check["tokens"], row["image_size"], row["tokens"]) == (3, 27, 4, 48)
    assert check["uncached"] == "measured" and check["same_tokens"]  # run whole: tokens compared, estimate checked
    assert check["estimate_error"] == pytest.approx(check["estimated_uncached_s"] / check["uncached_s"] - 1)
    assert row["uncached"] == "estimated" and row["same_tokens"] is None
    assert row["uncached_s"] == row["estimated_uncached_s"] > 0
    for r in (check, row):
        assert r["prefix_same_tokens"] and r["cached_s"] > 0 and len(r["forward_times"]) == 3
    assert results["rows"][1]["speedup"] == pytest.approx(row["uncached_s"] / row["cached_s"])
    assert "| tiny | 1.7M | 4x4 | 48 |" in (tmp_path / "image_sampling.md").read_text()
