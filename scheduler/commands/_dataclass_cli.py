"""Typer options derived from a dataclass, so a command's options are its arguments' fields.

`dataclass_options(Args)` gives one `inspect.Parameter` per leaf field (nested dataclass fields
recurse), each annotated with a `typer.Option`: its name `--<cli_prefix>-<field>` (the class's
`cli_prefix`, `policies.learned.ppo.option_name`) unless the field's metadata `cli` names it, its
type and default the field's, its help the field's docstring (read from the class's source, where
cleanrl-style arguments keep them). A bool becomes a `--name/--no-name` flag. A field whose type
the command line cannot spell takes a `parsers` entry: a repeatable string option whose values it
parses. `build(Args, values)` makes the dataclass back from the values typer passes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Annotated, Any, TypeVar

import typer

from policies.learned.ppo import option_name

T = TypeVar("T")
# Separates the path of a nested field in the parameter's name (`ppo__learning_rate`).
_NEST = "__"


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring, whitespace collapsed} from `cls`'s source: the string literal right
    after each annotated assignment, as PEP 257's attribute docstrings are written."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, after in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default: every option needs one")


def _help(doc: str, default: Any, parsed: bool) -> str:
    # A parsed field shows its default in its own words (`[default: none]` says nothing useful).
    if parsed and default in ((), None):
        return doc + " (default: none)"
    return doc


def dataclass_options(
    cls: type,
    *,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
    prefix: str | None = None,
    path: str = "",
) -> list[inspect.Parameter]:
    """Keyword parameters, one per leaf field of dataclass `cls` (see the module docstring);
    `parsers` by dotted field path (`net.bases`)."""
    parsers = parsers or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    own_prefix = getattr(cls, "cli_prefix", "") if prefix is None else prefix
    params: list[inspect.Parameter] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        dotted = f"{path}.{f.name}" if path else f.name
        if _is_config(tp):
            params += dataclass_options(tp, parsers=parsers, path=dotted)
            continue
        default = _default(f)
        declared = f.metadata.get("cli")
        name = declared or option_name(own_prefix, f.name)
        parse = parsers.get(dotted)
        doc = docs.get(f.name, "")
        if parse is not None:
            annotation: Any = list[str] | None
            default = None
            metavar = f.metadata.get("metavar", "TEXT")
            info = typer.Option(name, help=_help(doc, (), True), metavar=metavar)
        else:
            annotation = tp
            if tp is bool and "/" not in name:
                name = f"{name}/--no-{name.removeprefix('--')}"
            info = typer.Option(name, help=doc)
        params.append(
            inspect.Parameter(
                dotted.replace(".", _NEST),
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[annotation, info],
            )
        )
    return params


def build(
    cls: type[T],
    values: Mapping[str, Any],
    *,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
    path: str = "",
) -> T:
    """An instance of dataclass `cls` from `values` keyed as `dataclass_options` names its
    parameters (fields absent keep their defaults; parsed fields become tuples)."""
    parsers = parsers or {}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        dotted = f"{path}.{f.name}" if path else f.name
        if _is_config(tp):
            kwargs[f.name] = build(tp, values, parsers=parsers, path=dotted)
            continue
        key = dotted.replace(".", _NEST)
        if key not in values:
            continue
        value = values[key]
        parse = parsers.get(dotted)
        if parse is not None:
            value = tuple(parse(text) for text in value or ()) or _default(f)
        elif isinstance(value, list) and _is_tuple(tp):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple or (
        isinstance(tp, types.UnionType) and any(_is_tuple(a) for a in typing.get_args(tp))
    )


def with_options(
    command: Callable[..., Any], own: list[inspect.Parameter], derived: list[inspect.Parameter]
) -> Callable[..., Any]:
    """`command` (which takes **kwargs) presented to typer with `own` then `derived` options."""
    command.__signature__ = inspect.Signature([*own, *derived])  # type: ignore[attr-defined]
    return command
