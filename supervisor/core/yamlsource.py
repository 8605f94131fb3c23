"""Load YAML while remembering the line of every key, so config errors can name it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from supervisor.core.errors import ConfigError

KeyPath = tuple[str | int, ...]


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse a YAML file; return the data and a map from key path to 1-based line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from e
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _index_node(node, (), lines, path)
    return data, lines


def _index_node(node: yaml.Node, at: KeyPath, lines: dict[KeyPath, int], path: Path) -> None:
    lines.setdefault(at, node.start_mark.line + 1)
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
            _index_node(value_node, (*at, key), lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_node(item, (*at, i), lines, path)


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
