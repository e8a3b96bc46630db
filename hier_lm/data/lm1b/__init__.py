"""One Billion Word (LM1B, Chelba et al. 2013) as a subword LM dataset: the official tarball (a local copy,
its extracted folder, or a resumable sha256-checked download) or a Hugging Face hub copy streamed with
`datasets` (`sources`); a byte-level BPE tokenizer trained on a sample of the training sentences
(`tokenizer`); every sentence followed by `</s>` and packed into one token stream; the splits cached as a flat
token memmap (`cache`, made by `prepare`) and served as token windows (`datamodule`; `stream` for training
on the Hugging Face copy).

Splits (source `tar`): train = the 99 training shards `news.en-00001..00099-of-00100` in shard order;
test = held-out shard 0 (`news.en.heldout-00000-of-00050`, the Transformer-XL / tensor2tensor test set);
valid = held-out shard 1 by default (`valid_shard`; Transformer-XL validates on the test set itself).

Word-level perplexity. A subword model's per-token perplexity `exp(mean_token_nll)` (`val/ppl`) is not
comparable with word-level LM1B numbers. Every split records `tokens` (its subword tokens, one `</s>` per
sentence included) and `words` (its whitespace-separated words plus one end of sentence per sentence, the
LM1B convention: heldout-00000 has 159,658 words). The total NLL of the split is the same in either unit,
so the word-level perplexity is `exp(mean_token_nll * tokens / words)`: `word_ppl_exponent(split)` is
that `tokens / words` (tensor2tensor's 32k subwords give 176,884 / 159,658 = 1.1079 on heldout-00000).
"""

from hier_lm.data.lm1b.cache import TokenCorpus
from hier_lm.data.lm1b.datamodule import LM1BDataModule
from hier_lm.data.lm1b.prepare import prepare_lm1b
from hier_lm.data.lm1b.sources import TAR_NAME, HFSource, TarShards
from hier_lm.data.lm1b.stream import StreamBatches
from hier_lm.data.lm1b.tokenizer import (EOS, STATE_KEY, decode_ids, encode_text, tokenizer_from_checkpoint,
                                         train_tokenizer)

__all__ = ["EOS", "STATE_KEY", "TAR_NAME", "HFSource", "LM1BDataModule", "StreamBatches", "TarShards", "TokenCorpus",
           "decode_ids", "encode_text", "prepare_lm1b", "tokenizer_from_checkpoint", "train_tokenizer"]
