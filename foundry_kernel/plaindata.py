"""Plain data: the only values Foundry takes from YAML, JSON and the command line.

Config files, ``--set`` values, ``foundry run`` parameter files and ``-p`` values all end
up somewhere that trusts their *type*: papermill writes each parameter as Python source
into the kernel (and writes a type it has no rule for - bytes, a set, a date - as
``"<str(value)>"`` without escaping, which ran code), the config schema coerces bytes to
text, and error messages ``repr()`` what they refuse. So every such input is read here,
into plain JSON types only, checked all the way down:

- **No YAML tags** but ``!!str`` on text, ``!!seq`` on lists and ``!!map`` on mappings
  (which say what the node is anyway): ``!!binary``, ``!!set``, ``!!timestamp``,
  ``!!python/...`` and custom tags are refused where the parser meets them, with the
  line and column.
- **No anchors or aliases.** ``&a`` / ``*a`` share one node many times over: nine levels of
  nine aliases are a few hundred bytes of YAML and 9**9 values once anything walks them
  (the schema, a deep copy, an error message). Every parser event is checked before
  anything is composed, so a bomb is refused at its first anchor and no input under the
  size caps below costs more than reading it (libyaml's parser when PyYAML has it).
- **Bounded size and depth**: :data:`MAX_FILE_BYTES` per file, :data:`MAX_VALUE_CHARS`
  per command-line value, :data:`MAX_DEPTH` nested lists/mappings (Python's parser
  gives up on literals nested ~200 deep, so this also keeps every value writable).
- **Only** ``str``, ``int``, ``float`` (finite), ``bool``, ``None``, ``list`` and ``dict``
  with text keys, exact types (no subclasses), text encodable as UTF-8 (no lone
  surrogates). Python writes exactly these types as literals that ``ast.literal_eval``
  reads back equal; NaN and infinity have no literal (papermill writes ``float('nan')``).
- Implicit YAML 1.1 timestamps, ``=`` and ``<<`` are left as text: an unquoted
  ``2026-11-29`` is the string it looks like, not a ``datetime.date``.
- **No key twice** in one mapping: PyYAML keeps the last silently, so a second
  ``loss:`` section would drop the first without a word.

:func:`brief` is the one way an error message shows a value a person gave: bounded in
length and depth (``reprlib``), whatever the value holds.
"""

from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    MappingStartEvent,
    NodeEvent,
    ScalarEvent,
    SequenceStartEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from foundry_kernel.errors import ConfigError

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_VALUE_CHARS",
    "PLAIN_HINT",
    "PlainLoader",
    "brief",
    "check_plain",
    "check_value_length",
    "load_plain_yaml",
    "parse_plain_json",
    "read_text_capped",
]

MAX_DEPTH = 32
"""Most nested lists/mappings in one input (configs nest 3 deep, parameters a few more)."""
MAX_VALUE_CHARS = 16 * 1024
"""Longest single ``--set`` / ``-p`` / ``--grid`` value, in characters."""
MAX_FILE_BYTES = 64 * 1024
"""Largest config or parameters file: a full config is ~3 KiB, a sweep of 300 parameter
sets fits; the worst YAML of this size parses in under a second."""
PLAIN_HINT = (
    "Foundry reads plain data only: text, numbers, true/false, null, lists and "
    "mappings with text keys"
)
_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS: dict[type[yaml.Event], frozenset[str]] = {
    ScalarEvent: frozenset({"!", f"{_CORE}str"}),
    SequenceStartEvent: frozenset({"!", f"{_CORE}seq"}),
    MappingStartEvent: frozenset({"!", f"{_CORE}map"}),
}
"""Tags that only say what the node is anyway (``!!str 12`` is the text "12"). Not
``!!int``/``!!bool``/...: PyYAML crashes on ``!!bool 0`` (KeyError) and ``!!map x``
(TypeError), and an untagged number or true/false is that type already."""
_TEXT_ONLY_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in ("timestamp", "value", "merge"))


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters without ever building the whole repr.

    ``reprlib`` stops at a few items per container and a few levels deep, so a value
    holding 9**9 shared lists costs as little to describe as a short one.
    """
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = 6
    short.maxfrozenset = short.maxdeque = short.maxarray = 6
    short.maxstring = short.maxother = max(limit, 12)
    short.maxlong = min(limit, 40)
    text = short.repr(value)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org") else tag


def _where(event: yaml.Event | Node) -> str:
    mark = event.start_mark
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _refusal(field: str, what: str) -> ConfigError:
    """``field: what`` (just ``what`` at the root), naming ``field`` for the caller."""
    return ConfigError(f"{field}: {what}" if field else what, field=field or None)


def _from(source: str | None, exc: ConfigError) -> ConfigError:
    """The same refusal, prefixed with where the input came from (a file, an option)."""
    return ConfigError(f"{source}: {exc}", field=exc.field) if source else exc


def _join(field: str, key: str) -> str:
    if key.isidentifier() or (key.replace(".", "_").isidentifier() and ".." not in key):
        return f"{field}.{key}" if field else key
    return f"{field}[{brief(key, 40)}]"


class _PlainResolver(Resolver):
    """YAML 1.1's implicit types without timestamps, ``=`` and ``<<``: those stay text."""

    yaml_implicit_resolvers = {  # noqa: RUF012 - PyYAML's own class-level table
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _TEXT_ONLY_TAGS]
        for first, resolvers in Resolver.yaml_implicit_resolvers.items()
    }


class _PlainConstructor(SafeConstructor):
    """PyYAML's safe constructor, refusing a key given twice in one mapping."""

    field = ""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value if isinstance(node, MappingNode) else ():
            if not isinstance(key_node, ScalarNode):
                continue  # unhashable: PyYAML refuses it itself
            key = self.construct_object(key_node)  # cached: built once
            if key in seen:
                raise _refusal(
                    self.field, f"the key {brief(key, 40)} is given twice{_where(key_node)}"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class PlainLoader(Reader, Scanner, Parser, Composer, _PlainConstructor, _PlainResolver):
    """Pure-Python loader: PyYAML's safe loader with the plain resolver and constructor."""

    def __init__(self, stream: str, *, field: str = "") -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _PlainConstructor.__init__(self)
        _PlainResolver.__init__(self)
        self.field = field


def _libyaml_parser() -> Any:
    """libyaml's parser when PyYAML was built with it: the same events, ~7x faster."""
    try:
        from yaml import cyaml
    except ImportError:  # pragma: no cover - PyYAML without libyaml
        return None
    return getattr(cyaml, "CParser", None)


_CParser: Any = _libyaml_parser()

if _CParser is not None:

    class _CPlainLoader(_CParser, _PlainConstructor, _PlainResolver):
        """libyaml's parser with the plain resolver and constructor (both Python)."""

        def __init__(self, stream: str, *, field: str = "") -> None:
            _CParser.__init__(self, stream)
            _PlainConstructor.__init__(self)
            _PlainResolver.__init__(self)
            self.field = field

    _Loader: Any = _CPlainLoader
else:  # pragma: no cover - PyYAML without libyaml
    _Loader = PlainLoader


def _refuse_event(event: yaml.Event, depth: int, field: str) -> None:
    """The rules, one event at a time: no alias, anchor, non-core tag, or nesting past
    :data:`MAX_DEPTH` (``depth`` counts the collections open around ``event``)."""
    what = None
    if isinstance(event, AliasEvent):
        what = f"the YAML alias *{event.anchor}"
    elif isinstance(event, NodeEvent) and event.anchor is not None:
        what = f"the YAML anchor &{event.anchor} (anchors and aliases repeat values)"
    elif isinstance(event, ScalarEvent | CollectionStartEvent):
        if event.tag is not None and event.tag not in _ALLOWED_TAGS[type(event)]:
            what = f"the YAML tag {_tag_name(event.tag)}"
        elif isinstance(event, CollectionStartEvent) and depth >= MAX_DEPTH:
            what = f"nesting deeper than {MAX_DEPTH} lists/mappings"
    if what is not None:
        raise _refusal(field, f"{what}{_where(event)} is not allowed; {PLAIN_HINT}")


def _scan(text: str, field: str) -> None:
    """Check every event before anything is composed: an alias bomb is refused at its
    first anchor, having cost what reading those few hundred bytes costs."""
    loader = _Loader(text, field=field)
    depth = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            _refuse_event(event, depth, field)
            if isinstance(event, CollectionStartEvent):
                depth += 1
            elif isinstance(event, CollectionEndEvent):
                depth -= 1
    finally:
        loader.dispose()


def load_plain_yaml(text: str, *, field: str = "", source: str | None = None) -> Any:
    """One YAML document as checked plain data (``None`` for an empty one).

    ``field`` is the dotted field the document is the value of ("" for a whole file) and
    ``source`` where it came from, for messages. Raises ``ConfigError`` for anything that
    is not plain data, and lets ``yaml.YAMLError`` through for text that is not YAML at
    all (a caller decides whether that is an error or, for a command-line value, text).
    """
    try:
        _scan(text, field)
        loader = _Loader(text, field=field)
        try:
            return check_plain(loader.get_single_data(), field=field)
        finally:
            loader.dispose()
    except ConfigError as exc:
        raise _from(source, exc) from None
    except ValueError as exc:  # int(): a number longer than Python's 4300-digit limit
        what = (
            "a number with more than 4300 digits cannot be read"
            if "digits" in str(exc)
            else f"a value cannot be read: {brief(str(exc), 120)}"
        )
        raise _from(source, _refusal(field, what)) from None


def parse_plain_json(text: str, *, field: str = "", source: str | None = None) -> Any:
    """JSON text as checked plain data (``NaN``/``Infinity`` refused like any non-plain
    value); lets ``json.JSONDecodeError`` through like :func:`load_plain_yaml`."""
    try:
        return check_plain(json.loads(text), field=field)
    except ConfigError as exc:
        raise _from(source, exc) from None
    except RecursionError:
        refusal = _refusal(field, f"nesting deeper than {MAX_DEPTH} lists/mappings")
        raise _from(source, refusal) from None


def check_value_length(text: str, *, field: str) -> str:
    """Refuse a command-line value longer than :data:`MAX_VALUE_CHARS` before parsing it."""
    if len(text) > MAX_VALUE_CHARS:
        raise ConfigError(
            f"{field}: the value is {len(text):,} characters; at most {MAX_VALUE_CHARS:,} are "
            "accepted on the command line (put large values in a file)",
            field=field,
        )
    return text


def read_text_capped(path: Path, *, field: str, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A UTF-8 text file of at most ``max_bytes`` bytes (read no further than that)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(
            f"{field}: cannot read {str(path)!r}: {exc.strerror}", field=field
        ) from None
    if len(data) > max_bytes:
        raise ConfigError(
            f"{field}: {str(path)!r} is larger than {max_bytes:,} bytes; "
            "configs and parameter files are small (split a large sweep into several files)",
            field=field,
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{field}: {str(path)!r} is not UTF-8 text (byte {exc.start})", field=field
        ) from None


def check_plain(value: Any, *, field: str = "", depth: int = 0) -> Any:
    """``value`` rebuilt from plain JSON types only, or a ``ConfigError`` naming where not.

    Exact types: a ``str`` or ``int`` subclass could write itself any way it likes.
    """
    kind = type(value)
    if value is None or kind is bool or kind is int:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise _refusal(
                field, f"{value!r} is not a finite number (NaN and infinity have no literal)"
            )
        return value
    if kind is str:
        return _check_text(value, field)
    if kind is list or kind is dict:
        if depth >= MAX_DEPTH:
            raise _refusal(field, f"nesting deeper than {MAX_DEPTH} lists/mappings is not allowed")
        if kind is list:
            return [
                check_plain(item, field=f"{field}[{i}]", depth=depth + 1)
                for i, item in enumerate(value)
            ]
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _refusal(
                    field,
                    f"the key {brief(key, 40)} is a {type(key).__name__}; keys must be text "
                    "(quote it)",
                )
            out[_check_text(key, field)] = check_plain(
                item, field=_join(field, key), depth=depth + 1
            )
        return out
    raise _refusal(
        field,
        f"{brief(value, 60)} is a {kind.__name__}, which is not allowed; {PLAIN_HINT} "
        "(YAML tags such as !!binary, !!set or !!timestamp are refused)",
    )


def _check_text(text: str, field: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _refusal(
            field, f"{brief(text, 60)} holds a lone surrogate, which no file can store"
        ) from None
    return text
