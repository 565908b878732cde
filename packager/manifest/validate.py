"""The published JSON Schema, enforced with jsonschema, each error told at the YAML node it is about.

The validator is Draft 2020-12 over ``json.loads(schema_json())`` (the text `pack schema` publishes) with two
strictnesses of the target's loader: ``pattern`` is matched with ``re.fullmatch`` (``^...$`` with
``re.search`` lets a trailing newline through) and an ``integer`` is an int, never a float such as ``8000.0``.
Every error becomes one problem at ``file:line:col`` of its node, with the field path and today's wording:
expected types (with "write it in quotes" for a number where a string goes), "did you mean" for an unknown
key or enum value, the pattern, the bounds. One field gets one type problem (no enum or pattern errors of a
value that has the wrong type), and strings are also checked for control characters here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from installer.bundle import manifest as records
from packager.manifest.nodes import NodeTree
from packager.manifest.problems import Path, Problems, describe, did_you_mean
from packager.manifest.schema import schema_json


def _fullmatch_pattern(validator: Any, pattern: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not re.fullmatch(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _is_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def validator() -> Draft202012Validator:
    schema = json.loads(schema_json())
    Draft202012Validator.check_schema(schema)
    cls = jsonschema.validators.extend(
        Draft202012Validator, validators={"pattern": _fullmatch_pattern},
        type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))
    return cls(schema)


def check_schema(data: Any, tree: NodeTree, problems: Problems) -> Any:
    """Add every schema problem of ``data``; return the data the semantic rules may read: unknown keys
    dropped, a value of the wrong type replaced by None (None if the document itself is not a mapping)."""
    errors = list(validator().iter_errors(data))
    typed = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    strings = [(path, f"{value[:80]!r} {bad}") for path, value in tree.strings
               if path not in typed and (bad := records.control_char_problem(value))]
    no_pattern = {path for path, _ in strings}  # a string with a control character: that, not also the pattern
    unknown: list[tuple[dict, str]] = []
    required: list[tuple[Path, str]] = []
    for e in errors:  # in the order of the old checker at one node: the value, its control characters, required
        path = tuple(e.absolute_path)
        if path in tree.replaced or (e.validator != "type" and path in typed):
            continue
        if e.validator == "pattern" and path in no_pattern:
            continue
        if e.validator == "additionalProperties":
            props = list(e.schema.get("properties", {}))
            for key in e.instance:
                if key not in props:
                    unknown.append((e.instance, key))
                    problems.add(tree.key_node((*path, key)), (*path, key),
                                 f"unknown key {key!r}{did_you_mean(key, props)}; allowed: {', '.join(props)}")
        elif e.validator == "required":
            required += [(path, req) for req in e.validator_value if req not in e.instance]
        else:
            problems.add(tree.node(path), path, _message(e, tree.node(path)))
    for path, msg in strings:
        problems.add(tree.node(path), path, msg)
    for path, req in required:
        problems.add(tree.node(path), (*path, req), "required field is missing")
    for obj, key in unknown:
        obj.pop(key, None)
    for path in sorted(typed, key=len, reverse=True):
        if not path:
            return None
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = None
    return data


def _message(e: ValidationError, node: yaml.Node | None) -> str:
    value, schema, want = e.instance, e.schema, e.validator_value
    if e.validator == "type":
        types = want if isinstance(want, list) else [want]
        quote = (f" (write it in quotes: \"{node.value}\")"
                 if "string" in types and isinstance(value, (int, float)) and not isinstance(value, bool)
                 and isinstance(node, yaml.ScalarNode) else "")
        return f"expected {' or '.join(types)}, found {describe(value)}{quote}"
    if e.validator == "enum":
        hint = did_you_mean(str(value), [str(x) for x in want])
        return f"expected one of {', '.join(map(str, want))}, found {value!r}{hint}"
    if e.validator == "pattern":
        return f"{value!r} is not a valid {schema.get('description', 'value')} (must match {want})"
    if e.validator == "minimum":
        return f"expected at least {want}, found {value}"
    if e.validator == "maximum":
        return f"expected at most {want}, found {value}"
    return e.message
