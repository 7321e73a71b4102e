"""Reading typed configs: plain dicts, YAML/TOML files and ``key=value`` overrides, checked against dataclass types.

What it knows: how to turn a (possibly partial) nested dict into an instance of a tree of dataclasses whose fields
are ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``list[...]``, ``dict[str, scalar]`` or another such
dataclass (strict types, lossless conversions only, one-line ``UserError`` naming the dotted key, with a "did you mean" for unknown keys);
how to read a YAML or TOML file into a dict (a key set twice in one table is refused, naming it and its lines: YAML
would keep the last silently, TOML refuses it itself); how to apply dotted ``key=value`` overrides to such a dict.
What it does NOT know: vopd's options, their defaults or their validation rules (``vopd.config`` holds them and
passes its root dataclass in), or how to write a config back.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeGuard, TypeVar, get_args, get_origin

import yaml

from vopd.errors import UserError

_T = TypeVar("_T")


def option(default: _T, doc: str) -> _T:
    """A dataclass field with its documentation attached (the docs table is generated from it). Lists and dicts get
    a fresh copy per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def is_section(tp: object) -> TypeGuard[type]:
    """A config section: a dataclass type (not an instance)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_types(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (annotations are strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))


def type_name(tp: Any) -> str:
    """A short readable name of a field type (``"a" | "b"`` for a Literal, ``list[str]``, ``int``)."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in get_args(tp))
    if origin is list:
        (item,) = get_args(tp)
        return "list of tables" if is_section(item) else f"list[{type_name(item)}]"
    if origin is dict:
        return "dict[str, scalar]"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, value: object, expected: str) -> UserError:
    return UserError(f"config key {key}={value!r} is invalid: expected {expected}")


def _coerce(key: str, value: Any, tp: Any, root: type) -> Any:
    """``value`` checked against (and, where lossless, converted to) type ``tp``; ``key`` is for messages."""
    origin = get_origin(tp)
    if is_section(tp):
        if isinstance(value, tp) and dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if value is None:  # an empty section in YAML (`loss:` with every line commented out)
            value = {}
        if not isinstance(value, dict):
            raise _bad(key, value, f"a table of keys ({', '.join(f.name for f in dataclasses.fields(tp))})")
        return build(tp, value, root=root, prefix=key + ".")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool):
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _bad(key, value, f"one of {', '.join(map(str, choices))}{hint}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, f"a list, e.g. {key}=[a,b]")
        return [_coerce(f"{key}[{i}]", v, item_tp, root) for i, v in enumerate(value)]
    if origin is dict:  # a table of named scalars (e.g. chat template variables), passed through as given
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _bad(key, value, f"a table of names to values, e.g. {key}={{name: false}}")
        for name, item in value.items():
            if not isinstance(name, str) or not isinstance(item, (bool, int, float, str)):
                raise _bad(key, value, f"string names with true/false, number or text values; {name!r}: "
                                       f"{type(item).__name__} is not one")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):  # strict: "1", 1, "yes-ish" strings are mistakes, not booleans
            raise _bad(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-5" (no dot) as a string; accept numeric text for float keys.
            try:
                value = float(value)
            except ValueError:
                raise _bad(key, value, "a number") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, value, "a number")
        if not math.isfinite(value):
            raise _bad(key, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(key, value, f"a string (quote it: {key}: \"{value}\")")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def _unknown_key(key: str, cls: type, prefix: str, root: type) -> UserError:
    """Unknown ``prefix + key`` in section ``cls``: suggest a close key here, or the same name in another section."""
    valid = [f.name for f in dataclasses.fields(cls)]
    # The same name in another section (lr -> optim.lr) beats a spelling neighbour here (lr -> lora).
    elsewhere = [p for p in _all_keys(root) if p.rsplit(".", 1)[-1] == key]
    close = [prefix + c for c in difflib.get_close_matches(key, valid, n=1)]
    hint = f"did you mean {(elsewhere or close)[0]}?" if elsewhere or close else "no close match."
    section = f"[{prefix[:-1]}]" if prefix else "at the top level"
    return UserError(f"unknown config key {prefix}{key}: {hint} Valid keys {section}: {', '.join(valid)}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass."""
    keys: list[str] = []
    for name, tp in field_types(cls).items():
        if is_section(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def build(cls: type[_T], data: dict[str, Any], *, root: type | None = None, prefix: str = "") -> _T:
    """An instance of dataclass ``cls`` from a (possibly partial) dict; missing keys keep their defaults.

    ``root`` is the top-level config dataclass (default ``cls``): an unknown key is looked up in all of it, so that
    ``lr`` suggests ``optim.lr``. ``prefix`` is the dotted path of ``cls`` inside ``root``, for messages."""
    root = cls if root is None else root
    hints = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), cls, prefix, root)
        kwargs[key] = _coerce(prefix + key, value, hints[key], root)
    return cls(**kwargs)


class _UniqueKeys(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key set twice (``DuplicateKey``), where YAML keeps the last
    value without a word (a second ``teacher:`` line silently replaced the first). Merge keys (``<<: *base``) may
    still be overridden: only keys written in the mapping itself are compared."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicates(node, "", set())
        return super().construct_document(node)


class DuplicateKey(Exception):
    """A key written twice in one YAML mapping: its dotted name and both lines (1-based)."""

    def __init__(self, key: str, first: int, again: int) -> None:
        super().__init__(key, first, again)
        self.key, self.first, self.again = key, first, again


def _refuse_duplicates(node: yaml.Node, prefix: str, seen_nodes: set[int]) -> None:
    """``DuplicateKey`` for the first key written twice in a mapping under ``node`` (``prefix``: its dotted path);
    a node reached again through an alias is not walked again (an alias may refer to its own ancestor)."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{prefix[:-1]}[{i}].", seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        name, line = prefix + str(key_node.value), key_node.start_mark.line + 1
        if name in seen:
            raise DuplicateKey(name, seen[name], line)
        seen[name] = line
        _refuse_duplicates(value_node, name + ".", seen_nodes)


def read_config_file(path: Path) -> dict[str, Any]:
    """The table of keys in the YAML (.yaml/.yml/.json) or TOML (.toml) file at ``path``; ``{}`` for an empty file."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            with path.open("rb") as f:
                data = tomllib.load(f)
        elif suffix in (".yaml", ".yml", ".json"):
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # safe_load, with _UniqueKeys
        else:
            raise UserError(f"config file {path} has an unknown extension: use .yaml, .yml or .toml")
    except DuplicateKey as dup:
        raise UserError(f"config file {path} sets {dup.key} twice (line {dup.first} and line {dup.again}); YAML would "
                        "keep the last one silently: delete one of them") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise UserError(f"config file {path} cannot be parsed ({detail}): fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of keys, not a {type(data).__name__}")
    return data


def _field_type(dotted: str, root: type) -> Any:
    """The type of dotted key ``dotted``; unknown keys raise with a suggestion."""
    cls: Any = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not is_section(cls):
            raise UserError(f"unknown config key {dotted}: {'.'.join(parts[:i])} is not a section")
        hints = field_types(cls)
        if part not in hints:
            raise _unknown_key(part, cls, "".join(p + "." for p in parts[:i]), root)
        cls = hints[part]
    return cls


def _is_text(tp: Any) -> bool:
    return tp is str or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp)))


def _parse_override(item: str, root: type, aliases: Mapping[str, Any]) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {item!r} is not key=value: write e.g. optim.lr=3e-5")
    tp = aliases[key] if key in aliases else _field_type(key, root)
    if _is_text(tp) and not (len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""):
        # Text keys take the text as written: a template with "{...}" or ": ", or a path like "no" or "1e3",
        # must not be reinterpreted by YAML. Quote it to get YAML's reading (e.g. data.eval="" for empty).
        return key.split("."), raw
    try:
        return key.split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"override {item!r} has a value YAML cannot read: quote it or fix the brackets") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], root: type,
                    aliases: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``data`` (changed in place and returned) with each ``key=value`` of ``overrides`` set, in order: dotted keys
    of dataclass ``root`` (unknown ones refused with a suggestion), values read as YAML except for text keys.
    ``aliases``: further dotted keys (an old spelling the caller moves later) with their types."""
    for item in overrides:
        parts, value = _parse_override(item, root, aliases or {})
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return data
