"""The policy file's YAML, read with the line of every mapping, key and item remembered (for
messages), booleans only as ``true``/``false``, and every syntax error said with its line."""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator
from typing import Any, Final

import yaml

from worker.errors import ConfigError


class Map(dict[Hashable, Any]):
    """A YAML mapping that remembers its line and each key's (1-based), for messages."""

    line: int | None = None
    key_lines: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.key_lines = {}


class Seq(list[Any]):
    """A YAML sequence that remembers each item's line (1-based), for messages."""

    item_lines: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.item_lines = []


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans (``on:`` is a key, not ``True``), lines kept, duplicate keys listed.

    A duplicate key is a problem, not the end of the load: the first occurrence is
    kept and the rest of the file is still checked, so one run lists everything.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        #: (line, column, message) of each duplicate key, 1-based.
        self.duplicates: list[tuple[int, int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        # PyYAML keeps the last of two equal keys; a policy file silently losing
        # half a policy is worse than refusing it.
        first: dict[str, int] = {}
        kept = []
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and not key_node.tag.endswith(":merge"):
                line = key_node.start_mark.line + 1
                if key_node.value in first:
                    earlier = first[key_node.value]
                    message = f"duplicate key {key_node.value!r} (first at line {earlier})"
                    self.duplicates.append((line, key_node.start_mark.column + 1, message))
                    continue
                first[key_node.value] = line
            kept.append((key_node, value_node))
        node.value = kept
        return super().construct_mapping(node, deep=deep)


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[Map]:
    data = Map()
    data.line = node.start_mark.line + 1
    yield data
    data.update(loader.construct_mapping(node))
    # After construct_mapping: merge keys (<<) are flattened in by then.
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            data.key_lines[str(key_node.value)] = key_node.start_mark.line + 1


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> Iterator[Seq]:
    data = Seq()
    yield data
    data.extend(loader.construct_sequence(node))
    data.item_lines = [item.start_mark.line + 1 for item in node.value]


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


_BOOL_TAG: Final = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str, source: str, problems: list[str]) -> dict[object, object]:
    """The document; duplicate keys go to ``problems`` (with line and column)."""
    loader = _Loader(text)  # a SafeLoader: builds plain data only
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    for line, column, message in loader.duplicates:
        problems.append(f"{source}:{line}:{column}: {message}")
    if data is None:
        raise ConfigError(f"{source}: the file is empty")
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else type(data).__name__
        raise ConfigError(f"{source}: the top level must be a mapping (registry:, ...), not {kind}")
    return data
