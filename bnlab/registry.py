"""The registry of the experiment's parts: one class per option of a config group.

A config group (``configs/norm/``, ``configs/model/``, ``configs/optim/``, ``configs/sched/``)
maps to code the way lightning-hydra-template does it: each option's YAML file names its class
in ``_target_`` and ``hydra.utils.instantiate`` builds it. The classes are pydantic models, so
the same class is the option's schema (every key with its type, range and meaning), its
validation (``strict``: no silent coercion; no inf/nan), and the builder of its part
(``bnlab.norms``, ``bnlab.models``, ``bnlab.optim``). The option names users type, the error
messages, ``bnlab train --help`` and README's configuration table all come from here.

Adding an option is one class (a subclass of the group's base class with a ``name`` literal)
plus one YAML file with ``_target_`` and the default values; ``tests/test_registry.py`` checks
that the two sides agree. This module imports no torch, so the CLI's help stays fast.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, ClassVar

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, ValidationError

from bnlab.errors import UsageError

GROUPS = ("data", "model", "norm", "optim", "sched")
REGISTRY: dict[str, dict[str, type[Option]]] = {group: {} for group in GROUPS}


class Schema(BaseModel):
    """Base of every config schema: unknown keys, wrong types and non-finite numbers are
    errors (no silent ``"1" -> 1`` or ``2.0 -> 2``; an int is still a valid float)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Option(Schema):
    """One option of the config group ``group``; subclasses with a ``name`` literal default
    register themselves under that name."""

    group: ClassVar[str]
    name: str

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.model_fields["name"].default
        if isinstance(name, str):  # abstract bases leave `name` without a default
            REGISTRY[cls.group][name] = cls


def option_names(group: str) -> list[str]:
    """The options of ``group``, as its config files name them (no torch import needed)."""
    folder = resources.files("bnlab.configs") / group
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def _description(schema: type[BaseModel], keys: list[str]) -> str:
    """The description of the field at ``keys`` (through nested schemas), or ''."""
    field = None
    for key in keys:
        field = schema.model_fields.get(key) if schema is not None else None
        if field is None:
            return ""
        schema = field.annotation if isinstance(field.annotation, type) else None
    return (field.description or "") if field is not None else ""


def error_message(prefix: str, error: ValidationError, data: dict[str, Any],
                  schema: type[BaseModel] | None = None) -> str:
    """One line for the first error: the full key, the value given and what is allowed (the
    validator's words, then the field's description from ``schema``)."""
    errors = error.errors()
    first = errors[0]
    if first["type"] == "value_error":  # a rule across keys: its message names them
        where = ".".join(p for p in (prefix, *map(str, first["loc"])) if p)
        msg = _lower(first["msg"].removeprefix("Value error, "))
        return f"{where}: {msg}" if where else msg
    keys, value = _key_path(first["loc"], data)
    key = ".".join(p for p in (prefix, *keys) if p)
    if first["type"] == "extra_forbidden":
        return f"{key} is not a key of this option"
    # A union (e.g. auto|bool) reports one error per member: say them all.
    msgs = [_lower(e["msg"]) for e in errors if _key_path(e["loc"], data)[0] == keys]
    items = [p for p in first["loc"][len(keys):] if isinstance(p, int)]
    where = f" (item {'.'.join(map(str, items))})" if items else ""
    allowed = _description(schema, keys) if schema is not None else ""
    return (f"{key}={value!r} is invalid{where}: {' or '.join(dict.fromkeys(msgs))}"
            + (f"; allowed: {allowed}" if allowed else ""))


def _lower(msg: str) -> str:
    return msg[:1].lower() + msg[1:]


def _key_path(loc: tuple, data: dict[str, Any]) -> tuple[list[str], Any]:
    """The config keys of an error location (union member tags and list indices dropped) and
    the value given there."""
    keys: list[str] = []
    value: Any = data
    for part in loc:
        if not (isinstance(value, dict) and part in value):
            break
        keys.append(str(part))
        value = value[part]
    return keys, value


def plain(node: DictConfig) -> dict[str, Any]:
    """A config node as plain Python containers, interpolations resolved."""
    data = OmegaConf.to_container(node, resolve=True)
    assert isinstance(data, dict)
    return data


def check(schema: type[Schema], node: DictConfig, prefix: str = "") -> Schema:
    """Validate ``node`` against ``schema``; a bad value is a one-line ``UsageError``."""
    data = plain(node)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise UsageError(error_message(prefix, e, data, schema)) from None


def build(group: str, node: DictConfig) -> Option:
    """The validated option of ``group`` that the config node selects (its ``_target_``)."""
    name = node.get("name")
    try:
        option = instantiate(node, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, ValidationError):
            schema = REGISTRY[group].get(name)
            raise UsageError(error_message(group, e.__cause__, plain(node), schema)) from None
        raise UsageError(f"{group}={name}: {e}") from None
    if not isinstance(option, Option) or option.group != group:
        raise UsageError(f"{group}._target_={node.get('_target_')!r} does not build the "
                         f"{group} option {name!r}")
    return option


def load_option(group: str, name: str, **overrides: Any) -> Option:
    """The option ``name`` of ``group`` with the defaults of its config file and ``overrides``:
    for library use (scripts, notebooks) with the same defaults as ``bnlab train``."""
    if name not in option_names(group):
        raise UsageError(f"{group}={name!r} is unknown; allowed: {', '.join(option_names(group))}")
    text = (resources.files("bnlab.configs") / group / f"{name}.yaml").read_text()
    node = OmegaConf.merge(OmegaConf.create(text), overrides)
    return build(group, node)


def describe(group: str) -> list[tuple[str, str, str]]:
    """``(option, key, meaning)`` rows for every key of every option of ``group``, from the
    schema's field descriptions (README's configuration table is checked against these)."""
    rows = []
    for name, cls in REGISTRY[group].items():
        for key, field in cls.model_fields.items():
            if key != "name":
                rows.append((name, key, field.description or ""))
    return rows
