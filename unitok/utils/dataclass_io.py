"""Typed dataclass <-> plain dict conversion: the one (de)serialiser of every config in unitok.

:func:`from_dict` checks each value against the field's annotation and names the field path
(``optim.betas[1]``) in every error:

- ``bool`` takes only booleans (YAML's ``yes``/``no`` already parse to booleans; the *string*
  ``"no"`` is refused instead of being truthy);
- ``int`` takes integers and integral numbers (``1e3``), ``float`` takes numbers; both also take
  numeric strings, because PyYAML reads ``1e-3`` as a string;
- ``str`` takes strings (and paths);
- ``tuple[X, Y]`` takes a list of exactly that length, ``tuple[X, ...]`` one of any length;
- ``X | None`` takes None; nested dataclasses are built from mappings; ``dict`` takes a mapping;
- unknown keys are listed together with the known ones.

:func:`to_dict` is the inverse (tuples become lists; a field with ``metadata={'omit_if_default': True}``
is left out while it holds its default, so a field added later leaves older files and their hashes
as they were), and :func:`read_mapping` reads a YAML/JSON
file whose top level must be a mapping.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from functools import lru_cache
from typing import Any, Mapping, TypeVar

T = TypeVar('T')


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent."""


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance -> nested plain dict of JSON/YAML types (tuples as lists)."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f'to_dict needs a dataclass instance, got {type(obj).__name__}')
    return _plain(obj)


def _plain(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)
                if not (f.metadata.get('omit_if_default') and getattr(x, f.name) == f.default)}
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def from_dict(cls: type[T], data: Any, where: str = '') -> T:
    """Build dataclass ``cls`` from a mapping, checking and converting every value (see module doc).

    ``where`` prefixes field names in errors (``'model.'`` for a nested section).
    """
    return cls(**field_values(cls, data, where))


def field_values(cls: type, data: Any, where: str = '') -> dict[str, Any]:
    """The checked keyword arguments for ``cls(**...)`` from ``data`` (see :func:`from_dict`)."""
    section = where.rstrip('.') or 'config'
    if not isinstance(data, Mapping):
        raise ConfigError(f'{section}: expected a mapping of {cls.__name__} fields, got {_show(data)}')
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f'unknown key(s) {sorted(map(str, unknown))} in {section}; known: {sorted(known)}')
    return {k: coerce(v, hints[k], where + k) for k, v in data.items()}


def coerce_fields(obj: Any) -> None:
    """Check and convert every field of a dataclass instance in place (call it in ``__post_init__``)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, coerce(getattr(obj, f.name), hints[f.name], f.name))


def field_hint(cls: type, path: list[str]) -> Any:
    """The annotation of the field at ``path`` (``['optim', 'lr']``) of dataclass ``cls``, or None
    when the path does not name a dataclass field."""
    hint: Any = cls
    for name in path:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = _hints(hint).get(name)
    return hint


def parse_override(text: str, hint: Any, key: str) -> Any:
    """The value of a command-line ``key=text`` override: YAML (numbers, booleans, null, lists), but
    verbatim for string fields (``out=2024``, ``data.train={a,b}.tar`` stay strings; ``null`` is None
    where the field allows it)."""
    import yaml
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if str in options:
        return None if text.strip() in ('null', '~') and type(None) in options else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f'override {key}={text!r}: not a YAML value ({" ".join(str(e).split())})') from None


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as type ``hint`` or :class:`ConfigError` naming ``name``, the hint and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, name)
            except ConfigError as e:
                if len(args) == 2 and type(None) in args and _is_container(option):
                    raise e from None   # the inner message names the exact item
        raise _error(name, hint, value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, name + '.')
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise _error(name, hint, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(coerce(v, item, f'{name}[{i}]') for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f'{name}: expected {len(args)} values ({_type_name(hint)}), '
                              f'got {len(value)}: {value!r}')
        return tuple(coerce(v, a, f'{name}[{i}]') for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise _error(name, hint, value)
        item = args[0] if args else Any
        return [coerce(v, item, f'{name}[{i}]') for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise _error(name, hint, value)
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _error(name, hint, value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is None or not number.is_integer():
            raise _error(name, hint, value)
        return int(number)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _number(value)
        if number is None:
            raise _error(name, hint, value)
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _error(name, hint, value)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _error(name, hint, value)
    return value


def _is_container(hint) -> bool:
    return typing.get_origin(hint) in (tuple, list) or dataclasses.is_dataclass(hint)


def _number(value) -> float | None:
    """A float from a float or a numeric string (PyYAML reads ``1e-3`` as a string), else None."""
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


_NAMES = {bool: 'a boolean (true/false)', int: 'an integer', float: 'a number', str: 'a string',
          dict: 'a mapping', type(None): 'null'}


def _type_name(hint) -> str:
    if hint in _NAMES:
        return _NAMES[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return ' or '.join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f'a list of {_type_name(args[0])}'
        return f'a list of {len(args)}: [' + ', '.join(_type_name(a) for a in args) + ']'
    if origin is list:
        return f'a list of {_type_name(args[0]) if args else "values"}'
    if dataclasses.is_dataclass(hint):
        return f'a mapping of {hint.__name__} fields'
    return getattr(hint, '__name__', str(hint))


def _show(value) -> str:
    if value is None:
        return 'null'
    return f'{value!r} ({type(value).__name__})'


def _error(name: str, hint, value) -> ConfigError:
    quote = ' (quote it in YAML)' if hint is str and isinstance(value, (int, float, bool)) else ''
    return ConfigError(f'{name}: expected {_type_name(hint)}, got {_show(value)}{quote}')


def read_mapping(path: str, what: str = 'config') -> dict[str, Any]:
    """The top-level mapping of a YAML (``.yaml``/``.yml``) or JSON file; an empty YAML file is ``{}``.

    Raises :class:`ConfigError` naming the file for a missing file, a parse error or a top level
    that is not a mapping (JSON ``null``, a string, a list).
    """
    import yaml
    if not os.path.isfile(path):
        raise ConfigError(f'no {what} file at {path!r}')
    is_yaml = path.endswith(('.yaml', '.yml'))
    try:
        with open(path, encoding='utf-8') as f:
            data = yaml.safe_load(f) if is_yaml else json.load(f)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f'cannot parse {what} file {path}: {e}') from None
    except OSError as e:
        raise ConfigError(f'cannot read {what} file {path}: {e.strerror or e}') from None
    if data is None and is_yaml:
        return {}
    if not isinstance(data, Mapping):
        kind = 'a YAML mapping' if is_yaml else 'a JSON object'
        raise ConfigError(f'{what} file {path}: expected {kind} of fields at the top level, got {_show(data)}')
    return dict(data)
