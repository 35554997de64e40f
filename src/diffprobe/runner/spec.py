"""The experiment spec: one YAML file naming the model, the data and the stages with their
parameters (docs/runner.md). Loading validates all of it before any work; every mistake is one
line naming the file, the YAML line and the key, with a did-you-mean for a misspelt key or
stage."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from diffprobe.errors import DiffprobeError, did_you_mean
from diffprobe.runner.registry import STAGES, StageKind
from diffprobe.stages.params import DataSpec, ModelSpec


class SpecError(DiffprobeError):
    pass


class _Top(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    out: str | None = None
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    stages: dict[str, dict[str, Any] | None]


@dataclass
class StageSpec:
    name: str
    kind: StageKind
    params: BaseModel


@dataclass
class ExperimentSpec:
    path: Path
    text: str
    name: str
    out: str | None
    model: ModelSpec
    data: DataSpec
    stages: dict[str, StageSpec]
    """In the file's order (the dependency order is the plan's business)."""


# ----------------------------------------------------------------------------- YAML lines


def _lines(node: yaml.Node, path: tuple = (), found: dict | None = None) -> dict[tuple, int]:
    """Path of every key and item -> its 1-based line in the file."""
    found = {} if found is None else found
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            here = (*path, key.value)
            found[here] = key.start_mark.line + 1
            _lines(value, here, found)
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            here = (*path, index)
            found[here] = value.start_mark.line + 1
            _lines(value, here, found)
    return found


def _line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _field_model(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the last key of ``loc`` (for did-you-mean)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = _unwrap(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``X | None``, ``list[X]`` -> ``X`` (the model a nested key belongs to)."""
    for arg in typing.get_args(annotation) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _explain(error: dict, model: type[BaseModel], prefix: tuple) -> str:
    loc = tuple(error["loc"])
    key = _dotted(prefix + loc)
    if error["type"] == "extra_forbidden":
        holder = _field_model(model, loc)
        choices = list(holder.model_fields) if holder else []
        close = did_you_mean(str(loc[-1]), choices)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(choices)}"
        return f"{key}: unknown key; {hint}"
    if error["type"] == "missing":
        return f"{key}: required, but not given"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (given {given!r})"
    if str(given) in message:
        shown = ""
    return f"{key}: {message}{shown}"


def _fail(path: Path, lines: dict, loc: tuple, text: str) -> SpecError:
    line = _line_of(lines, loc)
    where = f"{path}:{line}" if line else str(path)
    return SpecError(f"{where}: {text}")


# ----------------------------------------------------------------------------- loading


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate the spec at ``path`` (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec {path} does not exist; pass a YAML experiment file "
                        "(examples/demo.yaml is one)")  # fmt: skip
    text = path.read_text(encoding="utf-8")
    # ${VAR} and ~ in values: one spec serves several machines (THINGS_ROOT=... diffprobe run)
    expanded = os.path.expandvars(text)
    try:
        node = yaml.compose(expanded)
        raw = yaml.safe_load(expanded)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{path}{line}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping with model:, data: and stages:")
    lines = _lines(node)
    try:
        top = _Top.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise _fail(path, lines, tuple(first["loc"]), _explain(first, _Top, ())) from None
    if not top.stages:
        raise _fail(path, lines, ("stages",), "stages: no stages given")
    stages: dict[str, StageSpec] = {}
    for name, body in top.stages.items():
        body = dict(body or {})
        kind_name = body.pop("stage", name)
        loc = ("stages", name, "stage") if "stage" in (raw["stages"][name] or {}) else (
            "stages", name)  # fmt: skip
        kind = STAGES.get(kind_name)
        if kind is None:
            close = did_you_mean(str(kind_name), list(STAGES))
            hint = (f"did you mean '{close[0]}'?" if close
                    else f"known stages: {', '.join(STAGES)}")  # fmt: skip
            what = "stage kind" if loc[-1] == "stage" else "stage"
            raise _fail(path, lines, loc, f"{_dotted(loc)}: unknown {what} '{kind_name}'; "
                        f"{hint} (or name its kind with `stage: KIND`)")  # fmt: skip
        if not kind.available():
            raise _fail(path, lines, loc, f"{_dotted(loc)}: the {kind_name} stage needs "
                        f"{kind.requires}, which this diffprobe does not have; "
                        "update diffprobe or leave the stage out")  # fmt: skip
        if name == "data" and kind_name != "data":
            raise _fail(path, lines, loc, "stages.data: the name 'data' is the data stage's")
        try:
            params = kind.params.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            prefix = ("stages", name)
            raise _fail(path, lines, prefix + tuple(first["loc"]),
                        _explain(first, kind.params, prefix)) from None  # fmt: skip
        stages[name] = StageSpec(name, kind, params)
    _check_references(path, lines, stages)
    return ExperimentSpec(path=path, text=text, name=top.name or path.stem, out=top.out,
                          model=top.model, data=top.data, stages=stages)  # fmt: skip


def _check_references(path: Path, lines: dict, stages: dict[str, StageSpec]) -> None:
    """Every stage a stage reads exists in the spec and is of the kind it needs."""
    for stage in stages.values():
        for field, needed in stage.kind.depends_on.items():
            target = getattr(stage.params, field)
            if target is None:  # an optional input, not given
                continue
            loc = ("stages", stage.name, field)
            if target not in stages:
                same_kind = [s.name for s in stages.values() if s.kind.name == needed]
                hint = (f"set {field}: to one of {', '.join(same_kind)}" if same_kind
                        else f"add a '{needed}' stage before it")  # fmt: skip
                raise _fail(path, lines, loc, f"stage '{stage.name}' reads the {needed} stage "
                            f"'{target}' ({field}), which the spec does not have; {hint}")  # fmt: skip
            if stages[target].kind.name != needed:
                raise _fail(path, lines, loc, f"stage '{stage.name}' needs a {needed} stage as "
                            f"{field}, but '{target}' is a {stages[target].kind.name} stage")  # fmt: skip
