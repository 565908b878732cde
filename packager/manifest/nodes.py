"""YAML nodes to plain data, keeping where each value is (for file:line:col in every problem).

``NodeTree.build`` turns the composed YAML node tree into the JSON-like data that jsonschema validates and
records, for each field path, the value node and key node it came from. It reports what only the YAML can
show: tags other than the plain ones, keys that are not strings or hold control characters, duplicate keys,
and documents that alias-expand past ``MAX_NODES`` or nest past ``MAX_DEPTH``. It follows the schema only
to know where not to descend: the value of a key the schema does not allow, or a mapping or list where the
schema wants something else, is left as a placeholder (the schema reports the key or the type there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from installer.bundle import manifest as records
from packager.manifest.problems import Path, Problems, describe

MAX_NODES = 200_000  # YAML aliases can make a small file a huge tree ("billion laughs"): refuse past this
MAX_DEPTH = 64
COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it (same nodes)
_SCALAR_LOADER = yaml.SafeLoader("")  # only its constructors are used (reset before each use)
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))


class TooBig(Exception):
    """The document nests deeper than MAX_DEPTH or expands to more than MAX_NODES values."""

    def __init__(self, node: yaml.Node, path: Path) -> None:
        self.node, self.path = node, path


def construct(fn: Callable[[yaml.SafeLoader], Any], node: yaml.Node) -> Any:
    """PyYAML's safe constructors, with their own crashes (``!!timestamp`` of a non-date raises
    AttributeError, ``!!int`` of a huge value ValueError) turned into a ConstructorError at the node."""
    loader = _SCALAR_LOADER
    loader.constructed_objects, loader.recursive_objects = {}, {}
    try:
        return fn(loader)
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read the {node.tag} value {getattr(node, 'value', '')!r:.80} ({e})",
            node.start_mark) from e


def _plain(node: yaml.Node) -> Any:
    """Python value of a scalar node (YAML's core types); a collection stands as {} or a list of None."""
    if isinstance(node, yaml.ScalarNode):
        return construct(lambda loader: loader.construct_object(node, deep=True), node)
    if isinstance(node, yaml.SequenceNode):
        return [None] * len(node.value)
    if isinstance(node, yaml.MappingNode):
        return {}
    return None


def _types(schema: dict) -> list[str] | None:
    t = schema.get("type")
    return None if t is None else (t if isinstance(t, list) else [t])


class NodeTree:
    """The data of one YAML document and, per field path, the nodes it came from."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.index: dict[Path, tuple[yaml.Node, yaml.Node | None]] = {}  # path -> (value node, key node)
        self.strings: list[tuple[Path, str]] = []  # every string value built (checked for control characters)
        self.replaced: set[Path] = set()  # values refused here (a tag) and left as None: the schema says no more
        self.count = 0

    def node(self, path: Path) -> yaml.Node | None:
        hit = self.index.get(tuple(path))
        return hit[0] if hit else None

    def key_node(self, path: Path) -> yaml.Node | None:
        hit = self.index.get(tuple(path))
        return (hit[1] or hit[0]) if hit else None

    def build(self, root: yaml.Node, schema: dict) -> Any:
        self.index[()] = (root, None)
        return self._build(root, schema, (), 0)

    def _build(self, node: yaml.Node, schema: dict, path: Path, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES or depth > MAX_DEPTH:
            raise TooBig(node, path)
        if node.tag not in _PLAIN_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.problems.add(node, path, f"the YAML tag {tag} is not accepted: only plain values (strings, "
                                          "numbers, booleans, null, lists, mappings); remove the tag")
            self.replaced.add(path)
            return None
        types = _types(schema)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, schema, path, depth) if types is None or "object" in types else {}
        if isinstance(node, yaml.SequenceNode):
            if types is not None and "array" not in types:
                return []
            items = schema.get("items", {})
            out = []
            for i, child in enumerate(node.value):
                self.index[(*path, i)] = (child, None)
                out.append(self._build(child, items, (*path, i), depth + 1))
            return out
        value = _plain(node)
        if isinstance(value, str):
            self.strings.append((path, value))
        return value

    def _mapping(self, node: yaml.MappingNode, schema: dict, path: Path, depth: int) -> dict:
        props: dict = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        out: dict = {}
        for knode, vnode in node.value:
            key = _plain(knode)
            if not isinstance(key, str):
                self.problems.add(knode, (*path, str(key)), f"keys must be strings, found {describe(key)}")
                continue
            kpath = (*path, key)
            if bad := records.control_char_problem(key):
                self.problems.add(knode, kpath, f"key {key[:80]!r} {bad}")
                continue
            if key in out:
                self.problems.add(knode, kpath, "duplicate key (the later value would silently win)")
                continue
            self.index[kpath] = (vnode, knode)
            if key in props:
                out[key] = self._build(vnode, props[key], kpath, depth + 1)
            elif isinstance(extra, dict):
                out[key] = self._build(vnode, extra, kpath, depth + 1)
            elif extra is False:
                out[key] = None  # an unknown key: the schema names it; its value is never looked at
            else:
                out[key] = self._build(vnode, {}, kpath, depth + 1)
        return out
