"""Command-line options generated from config dataclasses, so a setting is described in one place.

A command names its config class (``"tca.cache.harvest:HarvestConfig"``); each field becomes one
option: ``--field-name`` of the field's type and default, with the field's docstring (the string
literal under it) as help. The class is imported only when click first asks for the options, so
``tca --help`` loads no stage. What an annotation cannot say sits in the field's metadata:

- ``flag``: the option's names when they differ from the field's (``("-o", "--out")``);
- ``old``: former flag names that keep working, each with one deprecation line;
- ``parse``: turns the typed text into the value (JSON, an edit spec, …), errors as ``TcaError``;
- ``repeat``: a list given by repeating the option instead of as a comma list.

A field whose type is itself a config dataclass is flattened: its fields are the command's options,
and when it is optional (``ClusterConfig | None``) it is built only if one of its flags is given.
The word ``none`` passes None to an optional field whose default is not None.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import logging
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

import click

from tca import TcaError

log = logging.getLogger("tca")


def parse_list(text: str, kind: type, flag: str) -> list:
    """A comma list of positive numbers such as ``0.001,0.003``; one clear sentence when it is not."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise TcaError(f"{flag} {text!r} is not a comma list of positive {kind.__name__} values, e.g. {flag} 0.001,0.003.")
    return values


def parse_words(text: str, flag: str) -> list[str]:
    """A comma list of words such as ``Wait,Hmm``, each kept as typed: ``" Wait"`` (with its space)
    and ``"Wait"`` are different tokens of a BPE tokenizer."""
    words = [w for w in text.split(",") if w.strip()]
    if not words:
        raise TcaError(f"{flag} {text!r} names no word; give a comma list such as {flag} Wait,Hmm.")
    return words


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring as one paragraph, for ``--help``: a ``name`` in it reads as that field's
    flag, or that constant's value, or else the bare name."""
    flags = {f.name: [*f.metadata.get("flag", ()), "--" + f.name.replace("_", "-")] for f in dataclasses.fields(cls)}
    constants = vars(sys.modules[cls.__module__])

    def plain(m: re.Match) -> str:
        name = m.group(1)
        if name in flags:
            return flags[name][0] if flags[name][0].startswith("--") else flags[name][-1]
        value = constants.get(name)
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else name

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        node.target.id: re.sub(r"``([^`]+)``", plain, " ".join(after.value.value.split()))
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    }


def _is_config(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _unwrap_optional(hint) -> tuple[Any, bool]:
    """``X | None`` as (X, True); anything else as (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(hint)):
            return args[0], True
    return hint, False


class _Typed(click.ParamType):
    """Text to a field's value: comma lists, ``none``, JSON and the field's own ``parse``."""

    def __init__(self, hint, optional: bool, parse: Callable | None, flag: str):
        self.hint, self.optional, self.parse, self.flag = hint, optional, parse, flag
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        self.item = args[0] if origin is list else None
        self.base = click.Choice(args) if origin is typing.Literal else (
            click.Path(path_type=Path) if hint is Path else click.types.convert_type(hint if hint in (int, float) else str))
        names = {int: "integer", float: "float", str: "text"}
        self.name = (f"{names.get(self.item, 'text')},..." if self.item is not None else
                     "json" if hint is dict and parse is None else self.base.name)

    def get_metavar(self, param, *args, **kwargs):
        return self.base.get_metavar(param, *args, **kwargs) if isinstance(self.base, click.Choice) else None

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        if self.optional and value.strip().lower() == "none":
            return None
        if self.parse is not None:
            return self.parse(value)
        if self.item is not None:
            return parse_words(value, self.flag) if self.item is str else parse_list(value, self.item, self.flag)
        if self.hint is dict:
            return _json_object(value, self.flag)
        return self.base.convert(value, param, ctx)


def _json_object(text: str, flag: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TcaError(f"{flag} is not valid JSON ({exc.msg} at character {exc.pos}).") from None
    if not isinstance(value, dict):
        raise TcaError(f"{flag} must be a JSON object.")
    return value


@dataclasses.dataclass
class _Field:
    """One leaf field of a (possibly nested) config, as the command line sees it."""

    path: tuple[str, ...]
    field: dataclasses.Field
    hint: Any
    doc: str

    @property
    def key(self) -> str:
        return self.path[-1]

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(self.field.metadata.get("flag") or ("--" + self.key.replace("_", "-"),))

    @property
    def default(self):
        f = self.field
        return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _leaves(cls, path: tuple[str, ...] = ()) -> list[_Field]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        inner, _ = _unwrap_optional(hints[f.name])
        if _is_config(inner):
            out += _leaves(inner, path + (f.name,))
        else:
            out.append(_Field(path + (f.name,), f, hints[f.name], docs.get(f.name, "")))
    return out


def _params(cls, arguments: tuple[str, ...]) -> list[click.Parameter]:
    params: list[click.Parameter] = []
    for leaf in _leaves(cls):
        hint, optional = _unwrap_optional(leaf.hint)
        meta, default, old = leaf.field.metadata, leaf.default, tuple(leaf.field.metadata.get("old", ()))
        nested_optional = len(leaf.path) > 1 and _nested_is_optional(cls, leaf.path[0])
        required = default is dataclasses.MISSING
        typed = _Typed(hint, optional, meta.get("parse"), leaf.flags[-1])
        if leaf.key in arguments:
            params.append(click.Argument([leaf.key], type=typed, required=required,
                                         default=None if required else default))
            continue
        if hint is bool:
            decl = [f"{leaf.flags[-1]}/--no-{leaf.flags[-1][2:]}"] if default else list(leaf.flags)
            params.append(click.Option([*decl, leaf.key], is_flag=True, default=default, show_default=bool(default),
                                       help=leaf.doc))
        elif meta.get("repeat"):
            params.append(_Option([*leaf.flags, leaf.key], type=str, multiple=True, required=required,
                                  checked_later=bool(old), help=leaf.doc))
        else:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            if nested_optional or required or isinstance(default, dict):
                shown = None
            params.append(_Option([*leaf.flags, leaf.key], type=typed, required=required, checked_later=bool(old),
                                  default=shown, show_default=shown is not None and shown != "", help=leaf.doc))
        for name in old:
            kind = dict(is_flag=True, flag_value=True, default=None) if hint is bool else dict(
                type=typed, multiple=bool(meta.get("repeat")))
            params.append(click.Option([name, _old_name(name, leaf.key)], hidden=True, **kind))
    return params


class _Option(click.Option):
    """An option whose absence ``build_config`` judges (``checked_later``) when a former flag may stand
    in for it; ``--help`` still says it is required."""

    def __init__(self, *args, checked_later: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked_later = checked_later

    def value_is_missing(self, value) -> bool:
        return False if self.checked_later else super().value_is_missing(value)


def _old_name(flag: str, key: str) -> str:
    """The parameter name of a former flag: ``--cache`` of field ``store`` is ``old__cache__store``."""
    return f"old__{flag.lstrip('-').replace('-', '_')}__{key}"


def _nested_is_optional(cls, name: str) -> bool:
    return _unwrap_optional(typing.get_type_hints(cls)[name])[1]


def build_config(cls, params: dict[str, Any], unset_is_default: bool = False):
    """The config ``cls`` from a command's parsed ``params`` (taking the ones it uses out of it).
    ``unset_is_default``: a None stands for a flag not given (the leaves of an optional nested config)."""
    hints, values = typing.get_type_hints(cls), {}
    _apply_old_flags(cls, params)
    for f in dataclasses.fields(cls):
        inner, optional = _unwrap_optional(hints[f.name])
        if _is_config(inner):
            own = [leaf.key for leaf in _leaves(inner)]
            if optional and all(params.get(k) is None for k in own):
                for k in own:
                    params.pop(k, None)
                values[f.name] = None
            else:
                values[f.name] = build_config(inner, params, unset_is_default or optional)
            continue
        value = params.pop(f.name, None)
        if f.metadata.get("repeat") and value is not None:
            value = list(value) or None
        if value is None and (unset_is_default or f.default_factory is not dataclasses.MISSING):
            continue  # not given: the field's own default
        if value is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise click.UsageError(f"Missing option '--{f.name.replace('_', '-')}'.")
        values[f.name] = value
    return cls(**values)


def _apply_old_flags(cls, params: dict[str, Any]) -> None:
    for key in [k for k in params if k.startswith("old__")]:
        value = params.pop(key)
        _, old, name = key.split("__", 2)
        if value is None or value == ():
            continue
        old, new = "--" + old.replace("_", "-"), "--" + name.replace("_", "-")
        log.warning("%s is deprecated; use %s.", old, new)
        current = params.get(name)
        if current not in (None, ()) and current != _default_of(cls, name):
            raise click.UsageError(f"{old} and {new} are the same option; give only {new}.")
        params[name] = value


def _default_of(cls, name: str):
    for leaf in _leaves(cls):
        if leaf.key == name:
            return leaf.default
    return None


def resolve(spec: str):
    """``"module:Name"`` as the object it names."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class ConfigCommand(click.Command):
    """A click command whose options come from a config dataclass and whose callback receives the
    built config first, then its own (command-specific) options."""

    def __init__(self, *args, config: str, arguments: tuple[str, ...] = (), **kwargs):
        self._config_spec, self._arguments, self._own = config, arguments, None
        super().__init__(*args, **kwargs)

    @property
    def config_class(self):
        return resolve(self._config_spec)

    @property
    def params(self) -> list[click.Parameter]:
        if self._own is not None and not self._built:
            self._params = _params(self.config_class, self._arguments) + self._own
            self._built = True
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._own, self._params, self._built = list(value), list(value), False

    def invoke(self, ctx: click.Context):
        params = dict(ctx.params)
        cfg = build_config(self.config_class, params)
        return ctx.invoke(self.callback, cfg, **params)


def config_command(group: click.Group, name: str, config: str, arguments: tuple[str, ...] = ()):
    """Register the decorated function as ``group``'s command ``name`` taking options from ``config``."""
    return group.command(name, cls=ConfigCommand, config=config, arguments=arguments)
