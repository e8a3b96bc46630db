"""Typed model configs: `ModelConfig`, the base dataclass of every family's config (the options all families
have, and validation of every field from its annotation), and `hydra_schema`, the same options as a dataclass
that OmegaConf can type (the Hydra schema of the `model` config group)."""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

PROBABILITY = "probability in [0, 1)"
Probability = Annotated[float, PROBABILITY]  # the annotation of a float option that must lie in [0, 1)


@dataclass(frozen=True)
class ModelConfig:
    """The options of every model family. Each family subclasses it beside its model (e.g. `TransformerConfig`)
    with its own options, each with its one default, and a `tiny()` config.

    Frozen. Construction checks every field against its annotation: a `Literal[...]` takes one of its values,
    `int` an integer >= 1, `Probability` a number in [0, 1), `float` a number, `bool` true or false, `str` a
    string, and `X | None` also None; a family's `__post_init__` adds its own checks after these. An invalid
    value is a one-line ValueError naming the option, the value and what is allowed.
    """

    vocab_size: int = 256
    max_len: int = 2048  # the training length; the longest input where positions are absolute (`max_context`)
    dropout: Probability = 0.1
    activation_checkpointing: bool = False  # a training option: the task recomputes each residual block in the
    # backward pass instead of storing its activations; the model ignores it

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self), include_extras=True)
        for field in dataclasses.fields(self):
            value, annotation = getattr(self, field.name), hints[field.name]
            if not _fits(value, annotation):
                raise ValueError(f"{field.name} must be {_describe(annotation)}; got {value!r}")

    @classmethod
    def from_options(cls, config: ModelConfig | None = None, **options: Any) -> ModelConfig:
        """`config` itself, or `cls(**options)`: how a model takes either its config or keyword options. An
        unknown option is a one-line ValueError that lists the known ones."""
        if config is not None:
            if not isinstance(config, cls) or options:
                raise TypeError(f"pass a {cls.__name__} or keyword options, not {config!r} with {options}")
            return config
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in names]
        if unknown:
            raise ValueError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; its options: "
                             f"{', '.join(names)}")
        return cls(**options)

    @classmethod
    def tiny(cls) -> ModelConfig:
        """The smallest config that still exercises the family (every property test runs on it)."""
        raise NotImplementedError(f"{cls.__name__} defines no tiny() config")


def check_heads(d_model: int, n_heads: int, rope: bool) -> None:
    """The attention heads split `d_model` evenly, into an even head dim where RoPE rotates pairs of dims."""
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; change one of them")
    if rope and (d_model // n_heads) % 2:
        raise ValueError(f"pos='rope' needs an even head dim, got d_model / n_heads = {d_model // n_heads}; "
                         f"change n_heads or d_model")


def hydra_schema(config_class: type[ModelConfig], name: str, omit: tuple[str, ...] = (),
                 nullable: tuple[str, ...] = ()) -> type:
    """`config_class` as a dataclass that OmegaConf 2.3 can type (it has no `Literal`): a first field `name`
    (default `name`), then the fields of `config_class` with their defaults, less those in `omit`, `Literal`
    types as `str` (the model checks the values when it is built), and those in `nullable` also taking None."""
    hints = typing.get_type_hints(config_class)  # without `Annotated` extras
    fields: list[tuple[str, Any, Any]] = [("name", str, name)]
    for field in dataclasses.fields(config_class):
        if field.name not in omit:
            annotation = _literals_as_str(hints[field.name])
            fields.append((field.name, Optional[annotation] if field.name in nullable else annotation,
                           field.default))
    return dataclasses.make_dataclass(f"{config_class.__name__}Schema", fields)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _literals_as_str(annotation: Any) -> Any:
    if typing.get_origin(annotation) is Literal:
        return str
    if _is_union(annotation):
        return Union[tuple(_literals_as_str(arg) for arg in typing.get_args(annotation))]
    return annotation


def _fits(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _fits(value, args[0]) and (PROBABILITY not in args[1:] or 0 <= value < 1)
    if _is_union(annotation):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    raise TypeError(f"a model option cannot be annotated {annotation!r}")


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return "a " + " ".join(str(extra) for extra in args[1:])
    if _is_union(annotation):
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    descriptions = {type(None): "None", bool: "true or false", int: "an integer >= 1", float: "a number",
                    str: "a string"}
    return descriptions[annotation]
