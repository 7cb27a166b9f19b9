"""Policy YAML as plain values, with the line of every value and every mapping key.

The file is composed into YAML nodes (never constructed by PyYAML into Python objects) and each
node is turned into a plain value here, recording where it was written, so that a schema error
reported at a path (`keys[0].limits.tokens_per_minute`) can name its line. Scalars keep what YAML
made of them, so the schema can tell an integer from a string, a float or a date:

* ``!!str`` -> ``str``, ``!!bool`` -> ``bool``
* ``!!int`` -> ``YamlInt``, ``!!float`` -> ``YamlFloat``: an int or a float that keeps its text (prices are
  read exactly from it; an unquoted all-digit digest keeps its digits)
* ``!!null`` -> ``NULL`` (not ``None``: an explicit null is an error wherever a value is expected,
  while an omitted key takes its default)
* ``!!timestamp`` -> ``YamlDate`` (its text), any other tag -> ``YamlTagged``

Mapping keys must be strings, once each; YAML merge keys (``<<``) are refused. Errors are
`PolicyError`s naming the line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from extproc.policy.errors import PolicyError

Path = tuple[str | int, ...]

_TAG_STR = "tag:yaml.org,2002:str"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_TAG_MERGE = "tag:yaml.org,2002:merge"
_CONSTRUCTOR = SafeConstructor()
# aliases may repeat a node many times over (a "billion laughs" file): bound the values they make
MAX_ALIASED_VALUES = 100_000


class _Null:
    """An explicit YAML null (`key:` or `key: null`)."""

    _instance: _Null | None = None

    def __new__(cls) -> _Null:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "null"


NULL = _Null()


class YamlFloat(float):
    """A YAML float that remembers how it was written (0.15 stays exactly "0.15")."""

    text: str

    def __new__(cls, value: float, text: str) -> YamlFloat:
        made = super().__new__(cls, value)
        made.text = text
        return made


class YamlInt(int):
    """A YAML integer that remembers how it was written (an unquoted all-digit digest keeps its text)."""

    text: str

    def __new__(cls, value: int, text: str) -> YamlInt:
        made = super().__new__(cls, value)
        made.text = text
        return made


@dataclass(frozen=True)
class YamlDate:
    """An unquoted YAML date or timestamp, as written."""

    text: str


@dataclass(frozen=True)
class YamlTagged:
    """A scalar with an explicit tag YAML does not resolve to a plain type (`!secret x`)."""

    tag: str
    text: str


def kind(value: object) -> str:
    """How a value reads in an error: "a mapping", "a list", "an integer", "null"..."""
    if value is NULL or value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, YamlDate):
        return "a date"
    if isinstance(value, YamlTagged):
        return f"a value tagged {value.tag}"
    return type(value).__name__


def is_scalar(value: object) -> bool:
    return not isinstance(value, dict | list)


@dataclass
class Lines:
    """Where each value (by its path) and each mapping key (by the path of its value) was written."""

    values: dict[Path, int] = field(default_factory=dict)
    keys: dict[Path, int] = field(default_factory=dict)

    def of(self, path: Path) -> int | None:
        """The line of the value at `path`, else of the nearest enclosing value."""
        for end in range(len(path), -1, -1):
            line = self.values.get(path[:end])
            if line is not None:
                return line
        return None

    def of_key(self, path: Path) -> int | None:
        """The line of the key naming the value at `path` (else the value's line)."""
        line = self.keys.get(path)
        return line if line is not None else self.of(path)


def where(path: Path) -> str:
    """A path as the errors spell it: keys[0].limits.tokens_per_minute ("" at the top)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def compose(text: str, source: str) -> Node:
    """The YAML text as nodes; any syntax error is a PolicyError at its line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = ": ".join(p for p in (exc.context, exc.problem) if p)
        raise PolicyError(source, line, f"invalid YAML: {reason or 'syntax error'}") from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise PolicyError(source, line, f"invalid YAML: unacceptable character {char}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise PolicyError(source, None, f"invalid YAML: {first}") from None
    except RecursionError:
        raise PolicyError(source, None, "invalid YAML: nested too deeply") from None
    if root is None or (isinstance(root, ScalarNode) and root.tag == _TAG_NULL):
        raise PolicyError(source, None, "policy file is empty")
    return root


def plain(
    root: Node, source: str, *, model_keyed: Callable[[Path], bool] = lambda _path: False
) -> tuple[Any, Lines]:
    """The node tree as plain values and their lines. `model_keyed(path)`: the mapping at `path` is
    keyed by model names (its duplicate keys are "duplicate model" errors)."""
    walker = _Walker(source, model_keyed)
    try:
        value = walker.value(root, ())
    except RecursionError:
        raise PolicyError(source, None, "policy is nested too deeply") from None
    return value, walker.lines


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _Walker:
    def __init__(self, source: str, model_keyed: Callable[[Path], bool]) -> None:
        self.source = source
        self.model_keyed = model_keyed
        self.lines = Lines()
        self.seen: set[int] = set()  # nodes made once: one met again is an alias's
        self.in_alias = 0  # how deep in the expansion of aliases
        self.aliased = 0  # values made by expanding aliases
        self.alias_line = 0  # where the alias being expanded is used

    def fail(self, node: Node, reason: str) -> PolicyError:
        return PolicyError(self.source, line_of(node), reason)

    def value(self, node: Node, path: Path) -> Any:
        again = id(node) in self.seen
        self.seen.add(id(node))
        if again and not self.in_alias:  # an alias's node, met where the alias is used
            self.alias_line = self.lines.of(path[:-1]) or line_of(node)
        self.in_alias += again
        try:
            return self.make(node, path)
        finally:
            self.in_alias -= again

    def make(self, node: Node, path: Path) -> Any:
        if self.in_alias:
            self.aliased += 1
            if self.aliased > MAX_ALIASED_VALUES:
                raise PolicyError(
                    self.source, self.alias_line, f"YAML aliases here expand to more than {MAX_ALIASED_VALUES} values"
                )
        self.lines.values[path] = line_of(node)
        if isinstance(node, MappingNode):
            return self.mapping(node, path)
        if isinstance(node, SequenceNode):
            return [self.value(item, (*path, index)) for index, item in enumerate(node.value)]
        return self.scalar(node)

    def mapping(self, node: MappingNode, path: Path) -> dict[str, Any]:
        place = where(path) or "the top level"
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag == _TAG_MERGE:
                raise self.fail(key_node, f"YAML merge keys (<<) are not supported in {place}")
            if not isinstance(key_node, ScalarNode) or key_node.tag != _TAG_STR:
                hint = " (quote it)" if isinstance(key_node, ScalarNode) else ""
                raise self.fail(key_node, f"keys in {place} must be strings, got {_node_kind(key_node)}{hint}")
            key = str(key_node.value)
            sub = (*path, key)
            if key in out:
                first = self.lines.keys[sub]
                what = "model" if self.model_keyed(path) else "key"
                raise self.fail(key_node, f"duplicate {what} '{key}' in {place} (first at line {first})")
            self.lines.keys[sub] = line_of(key_node)
            out[key] = self.value(value_node, sub)
        return out

    @staticmethod
    def scalar(node: Node) -> Any:
        assert isinstance(node, ScalarNode)
        text = str(node.value)
        tag = node.tag
        if tag == _TAG_STR:
            return text
        if tag == _TAG_NULL:
            return NULL
        try:  # an explicit tag (`!!int abc`) need not fit the text
            if tag == _TAG_BOOL:
                return bool(_CONSTRUCTOR.construct_yaml_bool(node))
            if tag == _TAG_INT:
                return YamlInt(int(_CONSTRUCTOR.construct_yaml_int(node)), text)
            if tag == _TAG_FLOAT:
                return YamlFloat(float(_CONSTRUCTOR.construct_yaml_float(node)), text)
        except (ValueError, KeyError, TypeError, OverflowError, yaml.YAMLError):
            return YamlTagged(tag, text)
        if tag == _TAG_TIMESTAMP:
            return YamlDate(text)
        return YamlTagged(tag, text)


def _node_kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return kind(_Walker.scalar(node))
