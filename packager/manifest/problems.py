"""The problems of one manifest: each at file:line:col with its field path, reported all at once in file order."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import yaml

from installer.bundle import manifest as records

Path = tuple[str | int, ...]  # ("services", 0, "gpus", 1): services[0].gpus[1]


class Problems:
    def __init__(self, file: str) -> None:
        self.file = file
        self._items: list[tuple[int, int, int, str]] = []
        self.paths: set[str] = set()  # fields that already have a problem (later checks skip them)

    def add(self, node: yaml.Node | None, path: Sequence[str | int], msg: str) -> None:
        field = records.field_path(path)
        self.paths.add(field)
        if node is None:
            line = col = 0
            where = self.file
        else:
            line, col = node.start_mark.line + 1, node.start_mark.column + 1
            where = f"{self.file}:{line}:{col}"
        self._items.append((line, col, len(self._items), f"{where}: {field}: {msg}"))

    def has(self, path: Sequence[str | int]) -> bool:
        return records.field_path(path) in self.paths

    def __bool__(self) -> bool:
        return bool(self._items)

    def messages(self) -> list[str]:
        """Every problem once, in the order of the file."""
        seen: set[str] = set()
        out = []
        for *_, msg in sorted(self._items):
            if msg not in seen:
                seen.add(msg)
                out.append(msg)
        return out


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    kind = {dict: "a mapping", list: "a list", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string"}.get(type(value), type(value).__name__)
    return kind if isinstance(value, (dict, list)) else f"{kind} {value!r}"


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
