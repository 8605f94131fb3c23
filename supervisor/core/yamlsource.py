"""Load YAML while remembering the line of every key, so config errors can name it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from supervisor.core.errors import ConfigError

KeyPath = tuple[str | int, ...]


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse a YAML file; return the data and a map from key path to 1-based line."""
    text = _read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from e
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _index_node(node, (), lines, path, [0], set())
    return data, lines


# A config is a few kilobytes; these bound what a hostile or mistaken file can cost.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_VALUES = 100_000  # values after aliases are expanded (an alias bomb has billions)


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
    if len(at) > 50:
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: nested too deeply")
    lines.setdefault(at, node.start_mark.line + 1)
    open_nodes.add(id(node))  # the nodes being indexed around this one: an alias cycle
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
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
