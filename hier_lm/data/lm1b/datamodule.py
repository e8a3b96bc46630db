"""`LM1BDataModule`: One Billion Word subwords, batches of token windows."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenizers import Tokenizer

from hier_lm.data.lm1b.cache import TOKENIZER, TokenCorpus
from hier_lm.data.lm1b.prepare import check_settings, prepare_lm1b
from hier_lm.data.lm1b.sources import HFSource
from hier_lm.data.lm1b.stream import StreamBatches
from hier_lm.data.lm1b.tokenizer import STATE_KEY, decode_ids, encode_text
from hier_lm.data.settings import check_sizes, plain
from hier_lm.data.text.datamodule import TokenWindowDataModule
from hier_lm.data.text.windows import TrainWindows


class LM1BDataModule(TokenWindowDataModule):
    """One Billion Word subwords (metric ppl; `vocab_size` = `data.vocab_size`, byte-level BPE, `</s>` ends
    each sentence): batches `LongTensor[B, seq_len + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`) of the packed
    token stream, as for the byte datasets (`TokenWindowDataModule`).

    Every argument is required: recipes/data/lm1b.yaml holds the defaults (`data=lm1b`). See `prepare_lm1b`
    for the source and tokenizer settings. Training: `source="tar"`: random windows of the cached train
    split, drawn and resumed exactly as for the byte datasets (by batch index, rank-aware); `source="hf"`:
    `StreamBatches` of the streamed train split (rank share by `split_dataset_by_node`, a shuffle buffer of
    `hf_shuffle_buffer` sentences), resumed by re-reading the stream up to the saved batch. Evaluation:
    contiguous non-overlapping windows of the cached valid / test split (each target once; under DDP each
    rank scores its `EvalShard`). `state_dict()` also holds the tokenizer (`tokenizer_from_checkpoint` reads
    it back); resuming with another tokenizer is an error.
    """

    name = "lm1b"
    metric = "ppl"

    def __init__(self, *, root: str | Path | None, source: str, path: str | Path | None, url: str,
                 sha256: str | None, tokenizer: str | Path | None, vocab_size: int, tokenizer_sample: int,
                 valid_shard: int, test_shard: int, hf_name: str, hf_config: str | None, hf_revision: str | None,
                 hf_data_files, hf_text_column: str, hf_splits: Mapping[str, str] | None, hf_shuffle_buffer: int,
                 seq_len: int, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int):
        super().__init__()
        check_sizes(seq_len=seq_len, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                    seed=seed, hf_shuffle_buffer=hf_shuffle_buffer)
        check_settings(vocab_size, tokenizer_sample, valid_shard, test_shard, source)
        # Plain Python values (not Hydra's DictConfig, not Path) so that checkpoints load with weights_only=True.
        root, path, tokenizer = (None if v is None else os.fspath(v) for v in (root, path, tokenizer))
        hf_data_files, hf_splits = plain(hf_data_files), plain(hf_splits)
        self.save_hyperparameters()
        self.vocab_size = vocab_size
        self._resumed_tokenizer: str | None = None

    def prepare_cache(self) -> TokenCorpus:
        """Open the LM1B cache of the data settings, making it first if absent (`prepare_lm1b`)."""
        h = self.hparams
        return prepare_lm1b(h.root, **{k: h[k] for k in (
            "source", "path", "url", "sha256", "tokenizer", "vocab_size", "tokenizer_sample", "valid_shard",
            "test_shard", "hf_name", "hf_config", "hf_revision", "hf_data_files", "hf_text_column", "hf_splits")})

    def _open(self) -> TokenCorpus:
        corpus = self.prepare_cache()
        if self._resumed_tokenizer is not None:
            self._check_resumed(corpus)
        return corpus

    @property
    def tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` of the data (after `setup()`)."""
        return self._opened().tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; newlines become `</s>` (see `encode_text`)."""
        return encode_text(self.tokenizer, text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; `</s>` becomes a newline (see `decode_ids`)."""
        return decode_ids(self.tokenizer, ids)

    def word_ppl_exponent(self, split: str) -> float:
        """`tokens / words` of the split: word-level perplexity = `exp(mean_token_nll * word_ppl_exponent)`."""
        return self._opened().word_ppl_exponent(split)

    def _train_dataset(self, rank: int, world_size: int, start: int) -> TrainWindows | StreamBatches:
        """`source="tar"`: random windows of the cached train split; `"hf"`: the rank's stream of batches."""
        if self.hparams.source == "tar":
            return super()._train_dataset(rank, world_size, start)
        h = self.hparams
        return StreamBatches(HFSource(h.hf_name, h.hf_config, h.hf_revision, h.hf_data_files, h.hf_text_column),
                             self._opened().meta["hf_splits"]["train"], self.tokenizer.to_str(), h.seq_len,
                             h.batch_size, h.seed, shuffle_buffer=h.hf_shuffle_buffer, rank=rank,
                             world_size=world_size, start=start)

    def state_dict(self) -> dict:
        """The training position and seed (`ResumableDataModule.state_dict`) and the tokenizer's JSON
        (`STATE_KEY`)."""
        tokenizer = None if self.corpus is None else self.corpus.tokenizer.to_str()
        return {**super().state_dict(), STATE_KEY: tokenizer}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved batch; the data must be tokenised by the checkpoint's tokenizer."""
        super().load_state_dict(state)
        self._resumed_tokenizer = state.get(STATE_KEY)
        if self.corpus is not None and self._resumed_tokenizer is not None:
            self._check_resumed(self.corpus)

    def _check_resumed(self, corpus: TokenCorpus) -> None:
        # The vocabularies (subword -> id; BPE ids follow the merge order), not the JSON text, which differs
        # between tokenizers versions.
        if Tokenizer.from_str(self._resumed_tokenizer).get_vocab() != corpus.tokenizer.get_vocab():
            raise ValueError(f"the checkpoint was trained with another tokenizer than {corpus.path / TOKENIZER}: "
                             "resume with the data settings of that run (data.vocab_size, data.tokenizer_sample, "
                             "data.source), or pass its tokenizer as data.tokenizer")
