"""Long-context evaluation (`evaluate context=C score=S`) and evaluation on other data: every token of a split
scored exactly once in windows longer than the training length, models beyond their training `max_len` where
their positions allow it, the run's `eval:` block as the default, vocabulary checks, and nothing written when
nothing is scored."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from hier_lm.config import CONFIG_MODULE, compose_train_config
from hier_lm.data.base import EvalShard
from hier_lm.data.text.corpus import ByteCorpus
from hier_lm.data.text.paths import resolve_paths
from hier_lm.data.text.windows import EvalWindows
from hier_lm.evaluate import eval_windows, evaluate
from hier_lm.models import MODELS
from hier_lm.train import train
from tests.helpers import plain_validation_loss, subprocess_env, tiny_overrides

SEQ_LEN = 32  # the tiny runs' data.seq_len (tiny_overrides), also their model's max_len


class Positions:
    """A token cache whose valid split is the positions 0, 1, ..., n - 1: a window shows which targets it holds."""

    def __init__(self, n: int):
        self.meta = {"splits": {"valid": [0, n]}}
        self.data = np.arange(n)

    def split(self, name: str) -> np.ndarray:
        return self.data


def as_pair(item) -> tuple[torch.Tensor, int]:
    """An evaluation item as `(window, n_context)`: a plain window has no context."""
    return item if isinstance(item, tuple) else (item, 0)


def scored_positions(items) -> list[int]:
    """The split positions of the scored targets of every item."""
    return sum((window[1 + n_context:].tolist() for window, n_context in map(as_pair, items)), [])


@pytest.mark.parametrize("context, score, n", [(8, 3, 50), (16, 5, 17), (12, 5, 101), (7, 1, 40), (8, 8, 33),
                                               (64, 16, 200), (9, 4, 10)])
def test_every_target_is_scored_exactly_once_after_enough_context(context, score, n):
    windows = EvalWindows(Positions(n), "valid", context, context - score)
    assert sorted(scored_positions(windows)) == list(range(1, n)) and windows.num_scored() == n - 1
    for i in range(1, len(windows)):
        window, n_context = as_pair(windows[i])
        assert window.shape == (context + 1,) and n_context >= context - score  # each chunk after C - S of context
        assert window.tolist() == list(range(window[0], window[0] + context + 1))  # contiguous
    for world_size in (2, 3):  # the ranks of a distributed evaluation together score every target once
        shards = [EvalShard(windows, rank, world_size) for rank in range(world_size)]
        assert sorted(sum((scored_positions(shard) for shard in shards), [])) == list(range(1, n))


def test_without_context_the_windows_do_not_overlap_and_drop_the_partial_tail():
    windows = EvalWindows(Positions(30), "valid", 8, 0)
    assert scored_positions(windows) == list(range(1, 25)) and windows.num_scored() == 24


def test_datamodule_windows_longer_than_seq_len(corpus_dir):
    from hier_lm.data import TextFilesDataModule

    dm = TextFilesDataModule(paths=[f"{corpus_dir}/*.py"], seq_len=SEQ_LEN, eval_batch_size=4, eval_context=8)
    dm.prepare_data()
    dm.setup("validate")
    assert dm.eval_windows == (SEQ_LEN, SEQ_LEN - 8)  # the default: training-time validation
    dm.set_eval_windows(4 * SEQ_LEN, 16)
    tokens, n_context = next(iter(dm.val_dataloader()))
    assert tokens.shape == (4, 4 * SEQ_LEN + 1) and n_context.tolist() == [0] + [4 * SEQ_LEN - 16] * 3
    assert dm.num_eval_tokens("valid") == len(dm.corpus.split("valid")) - 1
    for length, scored in ((16, 17), (16, 0)):
        with pytest.raises(ValueError, match=rf"score={scored} must be in \[1, context=16\]"):
            dm.set_eval_windows(length, scored)
    dm.set_eval_windows(10**7, 10)
    with pytest.raises(ValueError, match=r"the valid split has [\d,]+ bytes, fewer than context \+ 1 = 10,000,001: "
                                         r"lower context"):
        dm.val_dataloader()


# ------------------------------------------------------------------------------ models beyond their max_len


def beyond(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name](dataclasses.replace(MODELS[name].config_class.tiny(), **options)).eval()


FAMILY_OPTIONS = [("hourglass", {}), ("hourglass", {"pos": "relative"}), ("transformer", {}),
                  ("h_transformer", {}), ("h_transformer", {"pos": "rope"}), ("flash", {}), ("flash", {"mode": "quad"}),
                  ("flash", {"rel_pos_bias": True})]


@pytest.mark.parametrize("name, options", FAMILY_OPTIONS)
def test_relative_and_rotary_models_read_beyond_max_len_causally_and_cached(name, options):
    model = beyond(name, **options)
    n = 2 * model.max_len + 11
    tokens = torch.randint(0, model.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        assert full.shape == (2, n, model.vocab_size) and torch.isfinite(full).all()
        cut = model.max_len + 5  # logits of a prefix do not depend on what follows it
        torch.testing.assert_close(model(tokens[:, :cut]), full[:, :cut], rtol=1e-4, atol=1e-4)
        cache, pieces = model.new_cache(), []
        for start in range(0, n, 37):  # cached decoding past max_len gives the same logits
            pieces.append(model(tokens[:, start:start + 37], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, options, message", [
    ("transformer", {"pos": "learned"}, r"exceeds max_len=64, the end of the learned position table"),
    ("flash", {"mode": "quad", "rel_pos_bias": True}, r"exceeds max_len=64, the reach of FLASH-Quad's relative"),
])
def test_absolute_tables_stop_at_max_len(name, options, message):
    model = beyond(name, **options)
    assert model.max_context == model.max_len == 64 and beyond(name).max_context is None
    model(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"sequence of 65 tokens {message}"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = model.new_cache()
    model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=rf"sequence of 65 tokens {message}"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


# ------------------------------------------------------------------------------ python -m hier_lm.evaluate


def entry(*overrides: str):
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


@pytest.fixture(scope="module")
def small_corpus(corpus_dir, tmp_path_factory) -> str:
    """40 kB of Python: valid and test splits of 2 kB each, so that every evaluation here takes a moment."""
    folder = tmp_path_factory.mktemp("small")
    (folder / "code.py").write_bytes(b"".join(p.read_bytes() for p in sorted(corpus_dir.glob("*.py")))[:40_000])
    return str(folder / "code.py")


@pytest.fixture(scope="module")
def run_dir(small_corpus, corpus_dir, tmp_path_factory):
    """A tiny quickstart (Hourglass, RoPE) run of 2 steps whose `eval:` block is windows of 48, 16 scored."""
    runs = tmp_path_factory.mktemp("runs")
    return train(compose_train_config(["recipe=quickstart", *tiny_overrides(corpus_dir, runs),
                                       f"data.paths=[{small_corpus}]", "eval.context=48", "eval.score=16"]),
                 "quickstart")


@pytest.fixture(scope="module")
def valid_len(small_corpus) -> int:
    return len(ByteCorpus.build(resolve_paths([small_corpus])).split("valid"))


def test_context_equal_to_score_equal_to_seq_len_is_the_plain_evaluation(run_dir, tmp_path):
    plain = evaluate(entry(f"ckpt={run_dir}", "split=valid", f"context={SEQ_LEN}", f"score={SEQ_LEN}",
                           f"out={tmp_path / 'plain.json'}"))
    mean, tokens, data = plain_validation_loss(run_dir)  # validation as in training
    assert plain["tokens"] == tokens == data.num_eval_tokens("valid")
    assert plain["loss"] == pytest.approx(mean, rel=1e-6)
    assert (plain["context"], plain["score"]) == (SEQ_LEN, SEQ_LEN)


def test_the_runs_eval_block_is_the_default_and_longer_windows_score_every_token(run_dir, valid_len, tmp_path):
    default = evaluate(entry(f"ckpt={run_dir}", "split=valid", "batch_size=32", f"out={tmp_path / 'default.json'}"))
    assert (default["context"], default["score"], default["tokens"]) == (48, 16, valid_len - 1)
    long = evaluate(entry(f"ckpt={run_dir}", "split=valid", f"context={4 * SEQ_LEN}", "score=24", "batch_size=16",
                          f"out={tmp_path / 'long.json'}"))
    assert (long["context"], long["score"], long["tokens"]) == (4 * SEQ_LEN, 24, valid_len - 1)
    assert json.loads((tmp_path / "long.json").read_text())["context"] == 4 * SEQ_LEN
    assert 0 < long["bpc"] < 8


@pytest.mark.parametrize("overrides, block, windows", [
    ([], None, (SEQ_LEN, SEQ_LEN - 8)),  # the validation of training: data.seq_len, data.eval_context
    ([], {"context": 48, "score": 16}, (48, 16)),  # the run's eval: block
    (["context=64"], {"context": 48, "score": 16}, (64, 16)),  # key by key
    (["context=64"], None, (64, 56)),
    (["eval_context=8"], {"context": 48, "score": 16}, (48, 40)),  # the older spelling of score
    (["context=40", "score=40"], {"context": 48, "score": 16}, (40, 40)),
])
def test_where_context_and_score_come_from(overrides, block, windows):
    run = {"data": {"seq_len": SEQ_LEN, "eval_context": 8}, "eval": block}
    assert eval_windows(entry("ckpt=x", *overrides), run) == windows


@pytest.mark.parametrize("overrides, message", [
    (["context=16", "score=17"], r"score=17 must be at most context=16"),
    (["context=0"], r"context must be a whole number of tokens >= 1, got 0"),
    (["score=4", "eval_context=2"], r"give score= or eval_context="),
])
def test_bad_windows_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        eval_windows(entry("ckpt=x", *overrides), {"data": {"seq_len": SEQ_LEN}})


def test_evaluation_on_another_corpus_of_the_same_vocabulary(run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "text.txt").write_bytes(bytes(range(32, 127)) * 200)  # 19,000 bytes never seen in training
    results = evaluate(entry(f"ckpt={run_dir}", "split=test", "data=textfiles", f"data.paths=[{other}]",
                             f"out={tmp_path / 'other.json'}"))
    test = ByteCorpus.build(resolve_paths([str(other)])).split("test")
    assert results["tokens"] == len(test) - 1 and (results["context"], results["score"]) == (48, 16)
    assert results["unigram_entropy_bits"] == pytest.approx(np.log2(95), abs=0.05)
    with pytest.raises(ValueError, match=r"data=synthetic_images has a vocabulary of 256 \(bpd\), this model's is "
                                         r"256 \(bpc\): evaluate it on data of its own vocabulary"):
        evaluate(entry(f"ckpt={run_dir}", "data=synthetic_images", f"out={tmp_path / 'images.json'}"))


def test_scoring_nothing_is_an_error_that_leaves_the_earlier_result(run_dir, tmp_path):
    out = tmp_path / "eval_valid.json"
    evaluate(entry(f"ckpt={run_dir}", "split=valid", "limit_batches=1", f"out={out}"))
    before = out.read_bytes()
    for limit, message in (("0", r"no token was scored \(limit_batches=0\): evaluate at least one batch"),
                           ("0.0000001", r"Lightning: .*limit_test_batches")):  # a fraction that leaves no batch
        with pytest.raises(ValueError, match=message):
            evaluate(entry(f"ckpt={run_dir}", "split=valid", f"limit_batches={limit}", f"out={out}"))
    assert out.read_bytes() == before


@pytest.mark.slow
def test_the_command_line_exits_2_and_keeps_the_results_file(run_dir):
    out = run_dir / "eval_test.json"
    out.write_text('{"earlier": true}\n')
    result = subprocess.run([sys.executable, "-m", "hier_lm.evaluate", f"ckpt={run_dir}", "limit_batches=0"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: no token was scored")
    assert out.read_text() == '{"earlier": true}\n'


@pytest.mark.slow
def test_learned_positions_refuse_a_longer_context(small_corpus, corpus_dir, tmp_path):
    """A run without an `eval:` block evaluates in its training windows; learned positions stop at max_len."""
    recipe = "quickstart_transformer"
    run = train(compose_train_config([f"recipe={recipe}", *tiny_overrides(corpus_dir, tmp_path, recipe=recipe),
                                      f"data.paths=[{small_corpus}]", "model.pos=learned"]), recipe)
    plain = evaluate(entry(f"ckpt={run}", f"out={tmp_path / 'plain.json'}"))  # no eval: block: the plain windows
    explicit = evaluate(entry(f"ckpt={run}", f"context={SEQ_LEN}", f"score={SEQ_LEN}", f"out={tmp_path / 'c.json'}"))
    assert (plain["context"], plain["score"]) == (SEQ_LEN, SEQ_LEN)
    assert (explicit["loss"], explicit["tokens"]) == (plain["loss"], plain["tokens"])
    with pytest.raises(ValueError, match=rf"context={SEQ_LEN + 1} is longer than this model reads: its learned "
                                         rf"absolute positions end at {SEQ_LEN}; use context <= {SEQ_LEN}"):
        evaluate(entry(f"ckpt={run}", f"context={SEQ_LEN + 1}", "score=4"))
