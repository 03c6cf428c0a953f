"""The registry and the config schema: every option's config file and class agree, and every key
of every option refuses a wrong-typed and an out-of-range value in one line."""

from __future__ import annotations

import ast
import copy
import functools
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import annotated_types as at
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_class
from omegaconf import OmegaConf
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from bnlab.config import DistConfig, EvalConfig, TrainConfig, validate
from bnlab.errors import UsageError
from bnlab.probes.config import ProbeConfig
from bnlab.registry import GROUPS, REGISTRY, Schema, option_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@functools.cache
def _composed(overrides: tuple[str, ...]):
    with initialize_config_module("bnlab.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def compose_cfg(*overrides: str):
    return copy.deepcopy(_composed(overrides))


@pytest.mark.parametrize("group", GROUPS)
def test_each_config_file_names_its_registered_class(group):
    assert option_names(group) == sorted(REGISTRY[group]), group
    for name, cls in REGISTRY[group].items():
        node = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
        assert get_class(node._target_) is cls, name  # e.g. bnlab.models.CNN, re-exported
        assert node.name == name
        # The file sets every key of the schema (its defaults live in the file only).
        assert set(node) - {"_target_"} == set(cls.model_fields), name


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
def test_every_option_validates_with_its_defaults(group):
    for name in REGISTRY[group]:
        validate(compose_cfg(f"{group}={name}", *(["norm.num_groups=4"] if name == "group"
                                                  else [])))


# -- the schema walk ------------------------------------------------------------------------------


def fields(schema: type[BaseModel], prefix: str) -> Iterator[tuple[str, typing.Any, list]]:
    """(full key, annotation, constraints) of every leaf key, through nested schemas."""
    for key, field in schema.model_fields.items():
        if key == "name":
            continue  # the option itself: Hydra refuses unknown options
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Schema):
            yield from fields(ann, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", ann, field.metadata


CANDIDATES = ["not-a-value", 1.5, -7, True, [1.0, 2.0, 3.0], {"a": 1}, None]


def wrong_typed(ann: typing.Any) -> object:
    """A value the key's type refuses whatever its range."""
    adapter = TypeAdapter(ann)
    for value in CANDIDATES:
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError:
            return value
    raise AssertionError(f"every candidate fits {ann}")


def _beyond(bound: object) -> object | None:
    """A value just outside one bound."""
    if isinstance(bound, at.Gt):
        return bound.gt - 0.5 if isinstance(bound.gt, float) else bound.gt
    if isinstance(bound, at.Ge):
        return bound.ge - 1
    if isinstance(bound, at.Lt):
        return bound.lt
    if isinstance(bound, at.Le):
        return bound.le + 1
    if isinstance(bound, at.MinLen):
        return []
    if isinstance(bound, at.MaxLen):
        return [1] * (bound.max_length + 1)
    return None


def out_of_range(ann: typing.Any, metadata: list) -> list[object]:
    """Values of the right type just outside each bound of the key's range (through Optional
    and list items)."""
    # Field(...) inside Annotated keeps its bounds in its own metadata
    metadata = [b for m in metadata for b in (m.metadata if isinstance(m, FieldInfo) else [m])]
    values = [v for v in map(_beyond, metadata) if v is not None]
    union = typing.get_origin(ann) in (typing.Union, types.UnionType)
    for arg in typing.get_args(ann) if union else ():
        if typing.get_origin(arg) is typing.Annotated:  # Optional[Annotated[...]]
            values += out_of_range(arg.__origin__, list(arg.__metadata__))
    if typing.get_origin(ann) is list:
        (item,) = typing.get_args(ann)
        if typing.get_origin(item) is typing.Annotated:
            values += [[v] for v in out_of_range(item.__origin__, list(item.__metadata__))]
    return values


def cases() -> Iterator[tuple[list[str], str, object]]:
    """(overrides selecting the option, full key, bad value) for every key of every schema."""
    schemas: list[tuple[list[str], type[BaseModel], str]] = [
        ([], TrainConfig, ""), ([], EvalConfig, "eval."), ([], ProbeConfig, "probe."),
        ([], DistConfig, "dist.")]
    for group in GROUPS:
        for name, cls in REGISTRY[group].items():
            schemas.append(([f"{group}={name}"], cls, f"{group}."))
    for select, schema, prefix in schemas:
        for key, ann, metadata in fields(schema, prefix):
            yield select, key, wrong_typed(ann)
            for bad in out_of_range(ann, metadata):
                yield select, key, bad


CASES = list(cases())


def test_the_walk_covers_every_group_and_range():
    keys = {key for _, key, _ in CASES}
    assert {"optim.beta2", "optim.lr", "sched.milestones", "norm.r_max", "norm.group_size",
            "norm.virtual_batch_size", "norm.noise.std_range", "probe.white_every",
            "eval.precise_bn_batches", "data.augment.flip", "epochs"} <= keys
    assert [v for _, key, v in CASES if key == "optim.beta2"][1:] == [-1, 1]  # both bounds
    assert [v for _, key, v in CASES if key == "sched.milestones"][1:] == [[0], [2]]


@pytest.mark.parametrize(("select", "key", "value"), CASES,
                         ids=[f"{s[0] if s else 'top'}:{k}={v!r}" for s, k, v in CASES])
def test_every_key_refuses_bad_values_in_one_line(select, key, value):
    cfg = compose_cfg(*select)
    OmegaConf.update(cfg, key, value, merge=False)  # as Hydra would parse override(key, value)
    with pytest.raises(UsageError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}=") or message.startswith(f"{key.rsplit('.', 1)[0]}"), \
        message


def _imports(path: Path, package: str) -> set[str]:
    """The bnlab modules a source file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == package}
    return found


def test_no_import_cycles_and_no_module_over_400_lines():
    root = Path(__file__).resolve().parents[1] / "bnlab"
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        modules[name] = path
        assert len(path.read_text().splitlines()) <= 400, f"{name} is over 400 lines"
    graph = {name: {m for m in _imports(path, "bnlab") if m in modules and m != name}
             for name, path in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of the design.
    graph = {name: {m for m in deps if not name.startswith(m + ".")}
             for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, node, dep])
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


@pytest.mark.slow
@pytest.mark.parametrize(("args", "key"), [(["optim=adam", "optim.beta2=1.5"], "optim.beta2"),
                                           (["norm=renorm", "norm.r_max=0.5"], "norm.r_max"),
                                           (["norm=ghost", "norm.virtual_batch_size=1"],
                                            "norm.virtual_batch_size"),
                                           (["norm=dbn", "norm.group_size=0"], "norm.group_size")])
def test_bad_zoo_values_from_the_command_line(tmp_path, args, key):
    """The same refusal through the console: one line, exit 2, no run dir."""
    from tests.cli import bnlab

    r = bnlab("train", "data=synthetic", f"hydra.run.dir={tmp_path / 'run'}", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {key}="), r.stderr
    assert not (tmp_path / "run").exists()


def test_readme_configuration_table_lists_every_option_and_key():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines()
            if line.startswith("| `")}
    for group in GROUPS:
        for name, cls in REGISTRY[group].items():
            assert f"`{name}`" in rows[group], (group, name)
            for key in cls.model_fields:
                if key != "name":
                    assert f"`{key}" in rows[group], (group, name, key)
    for key in ProbeConfig.model_fields:
        assert f"`{key}`" in rows["probe"] or key in ("enabled", "hist_samples",
                                                     "landscape_range", "landscape_points"), key
