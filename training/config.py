"""The one config base of every trainer, and the one parser of ``--set key=value``.

A trainer's config is a :class:`TrainerConfig`: a pydantic model whose fields carry their
default, their bounds and their help (``Field(description=...)``), checked strictly:

- unknown keys are refused by name; an int is no bool, ``"3"`` is no int, ``2.0`` is no int;
- floats must be finite (a JSON ``NaN`` or ``Infinity`` is refused, not stored as null);
- counts and sizes have upper bounds, so ``max_steps: 1e18`` is a clear error at submission,
  not a job that never ends.

Every bad value raises :class:`ConfigError` (a ``ValueError``) whose message names the
field: the CLI prints it as one ``error:`` line, the API as a 422.

Configs come from YAML files, ``--set`` overrides and JSON job specs. YAML 1.1 (PyYAML's
default) reads ``5e-5`` as a *string*; :func:`load_yaml` resolves floats as YAML 1.2 does,
so a strict float field takes what a user writes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# Bounds shared by every config: generous for real runs, small enough to refuse typos.
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_TOKENS = 1 << 20


class ConfigError(ValueError):
    """A config names an unknown key or holds a bad value (the message names which)."""


def _split_commas(value: Any) -> Any:
    """``"q_proj,v_proj"`` (what ``--set`` gives) → ``["q_proj", "v_proj"]``."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], BeforeValidator(_split_commas)]
"""A list of strings that also accepts one comma-separated string."""

Pooling = Literal["auto", "cls", "mean"]
"""What the reward head of an RM built from a bare encoder reads (``training.pooled_encoder``)."""


def pooling_field() -> Any:
    """The ``pooling`` key of the configs of trainers that build an RM from a backbone."""
    return Field("auto", description="what a new reward head on a bare encoder reads: mean "
                 "(the mean of the token states), cls (the architecture's own head: BERT's "
                 "pooler over [CLS]) or auto (mean when the encoder's own sentence-transformers "
                 "Pooling says it was trained with mean pooling, as all-MiniLM-L6-v2; cls "
                 "otherwise). Trained RMs and imported classifiers keep their head; the saved "
                 "RM records its pooling (modules.json), so serving pools the same way")


def _describe_error(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        return f"{where}: unknown key"
    if not where:  # a check across fields names them in its message
        return message
    if "input" in error and error.get("type") not in ("missing",):
        return f"{where}: {message} (got {error['input']!r})"
    return f"{where}: {message}"


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming every field that is wrong and why."""
    return "; ".join(_describe_error(error) for error in exc.errors())


class TrainerConfig(BaseModel):
    """Base of the trainers' configs: strict, documented fields; see the module docstring.

    Subclasses declare fields with ``Field(default, description=..., ge=..., le=...)`` and
    checks across fields with ``@model_validator(mode="after")``. ``renamed`` maps keys that
    were renamed to their new names: the old key still works, with a DeprecationWarning.
    """

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True,
        validate_default=True,
    )
    renamed: ClassVar[dict[str, str]] = {}

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _accept_renamed_keys(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not cls.renamed:
            return values
        values = dict(values)
        for old, new in cls.renamed.items():
            if old in values:
                if new in values:
                    raise ValueError(f"{old} is the old name of {new}: give only {new}")
                warnings.warn(deprecation_message(cls, old, new), DeprecationWarning,
                              stacklevel=2)
                values[new] = values.pop(old)
        return values

    @classmethod
    def from_dict(cls, values: Any) -> Self:
        """Build and validate; unknown keys and bad values raise :class:`ConfigError`."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"config must be a mapping of keys, got {type(values).__name__}")
        bad_keys = [key for key in values if not isinstance(key, str)]
        if bad_keys:
            raise ConfigError(f"config keys must be strings, got {bad_keys!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def deprecated_keys(cls, keys: Iterable[str]) -> list[str]:
        """Messages for the renamed keys among ``keys`` (what the API echoes back)."""
        return [deprecation_message(cls, k, cls.renamed[k]) for k in keys if k in cls.renamed]

    @classmethod
    def describe(cls) -> str:
        """Every field with its default and help: the ``--help`` of a CLI command."""
        lines = []
        for name, info in cls.model_fields.items():
            lines.append(f"{name} = {_default_text(info)}" + (f": {info.description}"
                                                              if info.description else ""))
        return "Config keys (defaults):\n\n" + "\n\n".join(lines)


def deprecation_message(cls: type, old: str, new: str) -> str:
    return f"{cls.__name__}: '{old}' is deprecated, use '{new}' (same meaning)"


def _default_text(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "(required)"
    default = info.default_factory() if info.default_factory is not None else info.default
    return repr(default)


# ---------------------------------------------------------------------- YAML and --set
class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads ``5e-5`` and ``1e3`` as floats (YAML 1.2), not strings."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML (or JSON, which is YAML) with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_file(path: Path | str) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: ``{}``)."""
    try:
        loaded = load_yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(loaded).__name__}")
    return loaded


def parse_overrides(assignments: Iterable[str]) -> dict[str, Any]:
    """``["lr=1e-4", "trainer_options.seed=3"]`` → ``{"lr": 1e-4, "trainer_options": {"seed": 3}}``.

    The one ``--set`` parser (``python -m training``, ``generalrm jobs submit``): values are
    YAML (so JSON too), dotted keys nest.
    """
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {assignment!r}")
        try:
            value = load_yaml(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: {exc}") from None
        *parents, leaf = key.split(".")
        target = values
        for parent in parents:
            nested = target.setdefault(parent, {})
            if not isinstance(nested, dict):
                raise ConfigError(f"--set {key}: {parent} is already set to a value")
            target = nested
        target[leaf] = value
    return values


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied, mappings merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(config_cls: type[TrainerConfig], path: Path | str | None,
                overrides: Iterable[str] = ()) -> TrainerConfig:
    """A YAML file (optional) with ``--set`` overrides applied, validated."""
    values = load_yaml_file(path) if path is not None else {}
    return config_cls.from_dict(merge(values, parse_overrides(overrides)))
