"""`python -m hier_lm.data prepare <dataset> [key=value ...]`: download and cache a dataset ahead of training,
then print where the cache is, its split sizes, sha256 and each split's unigram entropy.

<dataset> is an option of the `data` config group (enwik8, textfiles, lm1b, imagenet32, imagenet64, ...),
composed exactly as `python -m hier_lm.train data=<dataset>` composes it, and the keys are those of training
(the `data.` prefix may be left out):

    python -m hier_lm.data prepare enwik8 data.path=/datasets/enwik8.zip
    python -m hier_lm.data prepare textfiles data.paths=[src/**/*.py] data.root=/scratch/data
    python -m hier_lm.data prepare lm1b data.vocab_size=8000 data.path=/datasets/lm1b.tar.gz
    python -m hier_lm.data prepare imagenet32 data.format=oord data.path=/datasets/downsampled_imagenet
    python -m hier_lm.data prepare lra_listops data.generate=true    (or the flag --generate)

Deprecated, still accepted: the flag spellings `--root DIR` (= `data.root=DIR`), `--vocab-size N`
(= `data.vocab_size=N`); the words after a flag up to the next flag are its value, several of them a list
(`--paths a b` = `data.paths=[a,b]`), FILE=VALUE words a mapping (`--sha256 train_32x32.tar=...`), `null` null.
"""

from __future__ import annotations

import re
import sys

from hydra.errors import HydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate

from hier_lm.config import compose_train_config, exit_on_user_error, hydra_quote_escape

_MAPPING_ITEM = re.compile(r"[\w.-]+=")  # FILE=SHA256, SPLIT=GLOB
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_SWITCHES = ("generate",)  # flags that take no value: `--generate` = `data.generate=true`


def _value(word: str) -> str:
    """A word of a deprecated flag as a Hydra override value: null, a number, or a quoted string."""
    if word.lower() in ("null", "none"):
        return "null"
    return word if _NUMBER.fullmatch(word) else f"'{hydra_quote_escape(word)}'"


def _flag_override(flag: str, words: list[str]) -> str:
    """The override of the deprecated `--flag words...`: `--vocab-size 8000` -> `data.vocab_size=8000`."""
    flag, _, inline = flag.removeprefix("--").partition("=")
    words = [inline, *words] if inline else words
    key = "data." + flag.replace("-", "_")
    if not words and flag in _SWITCHES:
        return f"{key}=true"
    if not words:
        raise ValueError(f"--{flag} needs a value: write {key}=VALUE")
    if all(_MAPPING_ITEM.match(word) for word in words):
        items = (word.split("=", 1) for word in words)
        return f"{key}={{{','.join(f'{name}:{_value(value)}' for name, value in items)}}}"
    return f"{key}={_value(words[0])}" if len(words) == 1 else f"{key}=[{','.join(map(_value, words))}]"


def data_overrides(args: list[str]) -> list[str]:
    """Hydra overrides of the `data` node from the words after `prepare <dataset>`: `key=value` gets the
    `data.` prefix if it lacks it; deprecated `--flag` words are translated (a note on stderr says how)."""
    overrides, flags, i = [], [], 0
    while i < len(args):
        if not args[i].startswith("--"):
            override = args[i].lstrip("+~")  # +key=value adds a key, ~key deletes one
            prefix = args[i][: len(args[i]) - len(override)]
            overrides.append(args[i] if override.startswith("data.") else f"{prefix}data.{override}")
            i += 1
            continue
        switch = args[i].removeprefix("--") in _SWITCHES  # takes no words: the next word is an override again
        end = i + 1 if switch else next((j for j in range(i + 1, len(args)) if args[j].startswith("--")), len(args))
        flags.append(_flag_override(args[i], args[i + 1:end]))
        i = end
    if flags:
        print(f"note: --flags are deprecated; write the keys as in training: {' '.join(flags)}", file=sys.stderr)
    return overrides + flags


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def prepare(dataset: str, overrides: list[str]):
    """The DataModule of `data=<dataset>` with `overrides` (Hydra overrides of `data.`), instantiated by Hydra,
    its cache built (`prepare_data()`)."""
    try:
        keys = list(compose_train_config([f"data={dataset}"]).data)
    except MissingConfigException as err:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(err.options or [])}") from None
    for override in overrides:
        key = override.partition("=")[0]
        if key.startswith("data.") and key.split(".")[1] not in keys:
            raise ValueError(f"data={dataset} has no setting {key}: its settings are "
                             f"{', '.join(k for k in keys if k != '_target_')}")
    try:
        config = compose_train_config([f"data={dataset}", *overrides]).data
        datamodule = instantiate(config)
    except InstantiationException as err:  # the DataModule rejected a value: its own one-line error
        raise err.__cause__ if isinstance(err.__cause__, (ValueError, FileNotFoundError)) else \
            ValueError(_one_line(err)) from err
    except HydraException as err:  # an override Hydra cannot parse or apply
        raise ValueError(f"bad override in {' '.join(overrides)}: {_one_line(err)}") from None
    datamodule.prepare_data()
    return datamodule


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if len(args) < 2 or args[0] != "prepare" or args[1].startswith("-"):
        raise ValueError("usage: python -m hier_lm.data prepare <dataset> [key=value ...] (--help for more)")
    print(prepare(args[1], data_overrides(args[2:])).describe())


if __name__ == "__main__":
    main()
