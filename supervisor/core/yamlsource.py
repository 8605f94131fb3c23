"""Load YAML while remembering the line of every key, so config errors can name it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from supervisor.core.errors import ConfigError

KeyPath = tuple[str | int, ...]


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse a YAML file; return the data and a map from key path to 1-based line."""
    text = _read_text(path)
    _check_shape(text, path)
    node = _parse(lambda: yaml.compose(text, Loader=_Loader), path)
    if node is None:  # an empty file, or only comments
        return None, {}
    lines: dict[KeyPath, int] = {}
    _index_node(node, (), lines, path, [0], set())  # every value checked before any is built
    return _parse(lambda: _Loader("").construct_document(node), path), lines


def _parse(read: Callable[[], Any], path: Path) -> Any:
    """`read()` (parse, compose or build), with YAML's errors as ConfigErrors."""
    try:
        return read()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from e
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as e:  # a value YAML reads but Python cannot build (`2026-13-45`)
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


# A config is a few kilobytes; these bound what a hostile or mistaken file can cost.
MAX_CONFIG_BYTES = 1024 * 1024
# Keys and values as written, and values after aliases are expanded (an alias bomb has
# billions); 256 services of 40 values each take 10,000.
MAX_CONFIG_VALUES = 25_000
MAX_CONFIG_DEPTH = 50  # nested mappings and lists; the schema itself needs 5
MAX_INT_DIGITS = 4300  # Python's own limit for turning text into an int
# libyaml's parser where PyYAML has it: ten times faster, and it never recurses, so the
# nesting is measured before the composer (which recurses per level) runs.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _read_text(path: Path) -> str:
    """The file's text: a regular file of at most MAX_CONFIG_BYTES, in UTF-8 (a FIFO or a
    device would block or never end)."""
    try:
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise ConfigError(f"{path}: cannot read config ({what})")
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a config is far smaller")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _check_shape(text: str, path: Path) -> None:
    """Refuse, from the parser's events, nesting past MAX_CONFIG_DEPTH and more than
    MAX_CONFIG_VALUES keys and values as written, before any node is built: the composer
    recurses per level (PyYAML's took seconds on 10,000 `[`) and builds an object per value
    (seconds on a megabyte of them). The syntax errors are the parser's too."""

    def walk() -> None:
        depth, values = 0, 0
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                continue
            values += isinstance(event, yaml.NodeEvent)
            depth += isinstance(event, yaml.CollectionStartEvent)
            if depth > MAX_CONFIG_DEPTH or values > MAX_CONFIG_VALUES:
                mark = event.start_mark
                where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
                too_many = (
                    f"nested more than {MAX_CONFIG_DEPTH} levels deep; a config is far flatter"
                    if depth > MAX_CONFIG_DEPTH
                    else f"more than {MAX_CONFIG_VALUES} keys and values; a config is far smaller"
                )
                raise ConfigError(f"{where}: {too_many}")

    _parse(walk, path)


def _index_node(
    node: yaml.Node,
    at: KeyPath,
    lines: dict[KeyPath, int],
    path: Path,
    count: list[int],
    open_nodes: set[int],
) -> None:
    count[0] += 1
    if count[0] > MAX_CONFIG_VALUES:
        raise ConfigError(
            f"{path}: expands to more than {MAX_CONFIG_VALUES} values (through aliases?); "
            "a config is far smaller"
        )
    if id(node) in open_nodes:
        raise ConfigError(
            f"{path}:{node.start_mark.line + 1}: {dotted(at)}: an alias that contains itself"
        )
    if len(at) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: nested too deeply")
    lines.setdefault(at, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        _check_scalar(node, at, path)
    open_nodes.add(id(node))  # the nodes being indexed around this one: an alias cycle
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                _check_scalar(key_node, at, path)
            key = str(key_node.value)
            if key in seen:
                # safe_load silently keeps the last duplicate; an ops tool must not.
                raise ConfigError(
                    f"{path}:{key_node.start_mark.line + 1}: {dotted((*at, key))}: "
                    "duplicate key (each key may appear once)"
                )
            seen.add(key)
            lines[(*at, key)] = key_node.start_mark.line + 1
            _index_node(value_node, (*at, key), lines, path, count, open_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_node(item, (*at, i), lines, path, count, open_nodes)
    open_nodes.discard(id(node))  # shared again from here on: an alias, not a cycle


def _check_scalar(node: yaml.ScalarNode, at: KeyPath, path: Path) -> None:
    """Refuse what no part of fleetd could use: text that is not Unicode (a lone surrogate
    written as an escape, `"\\ud800"`, cannot be printed, logged or written as UTF-8), and
    an integer of more digits than Python converts."""
    where = f"{path}:{node.start_mark.line + 1}: {dotted(at)}"
    value = node.value
    if _SURROGATE.search(value):  # repr() writes it as an escape: the message is printable
        raise ConfigError(
            f"{where}: {_cut(repr(value))} holds a lone surrogate, which is not a character "
            "(expected Unicode text)"
        )
    numeric = node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    # `!!float` with nothing after it (or only a sign and `_`): PyYAML's constructor crashes
    if numeric and not value.replace("_", "").strip().lstrip("+-"):
        kind = node.tag.rsplit(":", 1)[-1]
        raise ConfigError(f"{where}: {node.tag.replace('tag:yaml.org,2002:', '!!')} with no "
                          f"value; expected a number ({kind})")  # fmt: skip
    if node.tag == "tag:yaml.org,2002:int" and len(value) > MAX_INT_DIGITS:
        raise ConfigError(
            f"{where}: a number of {len(value)} digits ({value[:20]}...); expected at most "
            f"{MAX_INT_DIGITS}"
        )


def _cut(text: str) -> str:
    return text if len(text) <= 60 else text[:56] + "...'"


def dotted(at: KeyPath) -> str:
    """Render a key path as people read it: `services.alpha.ladder[1].vram`."""
    out = ""
    for part in at:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def line_of(lines: dict[KeyPath, int], at: KeyPath) -> int | None:
    """The line of a key path, or of its nearest ancestor present in the file."""
    for end in range(len(at), -1, -1):
        if at[:end] in lines:
            return lines[at[:end]]
    return None
