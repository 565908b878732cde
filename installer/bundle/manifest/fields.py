"""Reading MANIFEST.json fields with their JSON path: :class:`FieldReader` and :class:`ManifestFieldError`.

Every typed access (a string matching a pattern, an integer in a range, a list, a relative path) either
returns the value or raises a :class:`ManifestFieldError` naming the field (``services[1].vllm_args[2]``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from installer.bundle.manifest.rules import MAX_TEXT, control_char_problem, field_path, relpath_problem
from installer.bundle.names import MANIFEST_NAME
from installer.errors import BundleError


class ManifestFieldError(BundleError):
    """A MANIFEST.json field is missing, of the wrong type, or holds a value `pack build` never writes."""

    def __init__(self, field_path: str, problem: str, *, source: str = MANIFEST_NAME) -> None:
        self.field = field_path
        self.problem = problem
        super().__init__(f"{source}: {field_path}: {problem}",
                         hint="the manifest was not produced by `pack build` (or was edited); do not install "
                              "this bundle")


class FieldReader:
    """Typed access to one JSON object with the path of every field, raising ManifestFieldError."""

    def __init__(self, obj: Any, path: tuple[str | int, ...], source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(obj, dict):
            self.fail((), f"expected an object, found {kind_of(obj)}")
        self.obj: dict = obj

    def fail(self, rel: tuple[str | int, ...], msg: str):
        raise ManifestFieldError(field_path(self.path + rel), msg, source=self.source)

    def child(self, key: str, *, optional: bool = False) -> FieldReader | None:
        v = self.raw(key, optional=optional)
        if v is None and not optional:
            self.fail((key,), "must not be null")
        return None if v is None else FieldReader(v, self.path + (key,), self.source)

    def raw(self, key: str, *, optional: bool = False) -> Any:
        if key not in self.obj:
            if optional:
                return None
            self.fail((key,), "required field is missing")
        return self.obj[key]

    def str(self, key: str, rx: re.Pattern | None = None, *, optional: bool = False, what: str = "value",
            choices: tuple[str, ...] | None = None, text: bool = False) -> str | None:
        v = self.raw(key, optional=optional)
        if v is None:
            if optional:
                return None
            self.fail((key,), "must not be null")
        return self.check_str(v, (key,), rx, what=what, choices=choices, text=text)

    def check_str(self, v: Any, rel: tuple, rx: re.Pattern | None, *, what: str = "value",
                  choices: tuple[str, ...] | None = None, text: bool = False) -> str:
        if not isinstance(v, str):
            self.fail(rel, f"expected a string, found {kind_of(v)}")
        if len(v) > MAX_TEXT:
            self.fail(rel, f"is longer than {MAX_TEXT} characters")
        bad = control_char_problem(v, allow_tab=text)
        if bad:
            self.fail(rel, f"{v[:80]!r} {bad}")
        if choices is not None and v not in choices:
            self.fail(rel, f"expected one of {', '.join(choices)}, found {v!r}")
        if rx is not None and not rx.fullmatch(v):
            self.fail(rel, f"{v!r} is not a valid {what}")
        return v

    def relpath(self, key: str, *, optional: bool = False, what: str = "path") -> str | None:
        v = self.str(key, optional=optional)
        if v is not None:
            bad = relpath_problem(v)
            if bad:
                self.fail((key,), f"unsafe {what}: {bad}")
        return v

    def int(self, key: str, *, minimum: int | None = 0, maximum: int | None = None, optional: bool = False,
            default: int | None = None) -> int | None:
        v = self.raw(key, optional=optional)
        if v is None:
            if optional:
                return default
            self.fail((key,), "must not be null")
        return self.check_int(v, (key,), minimum=minimum, maximum=maximum)

    def check_int(self, v: Any, rel: tuple, *, minimum: int | None = 0, maximum: int | None = None) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            self.fail(rel, f"expected an integer, found {kind_of(v)}")
        if minimum is not None and v < minimum:
            self.fail(rel, f"expected at least {minimum}, found {v}")
        if maximum is not None and v > maximum:
            self.fail(rel, f"expected at most {maximum}, found {v}")
        return v

    def bool(self, key: str, *, default: bool = False) -> bool:
        v = self.raw(key, optional=True)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail((key,), f"expected true or false, found {kind_of(v)}")
        return v

    def list(self, key: str, *, optional: bool = True) -> list:
        v = self.raw(key, optional=optional)
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail((key,), f"expected a list, found {kind_of(v)}")
        return v

    def str_list(self, key: str, rx: re.Pattern | None = None, *, what: str = "value") -> tuple[str, ...]:
        return tuple(self.check_str(v, (key, i), rx, what=what) for i, v in enumerate(self.list(key)))

    def only_keys(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for k in self.obj:
            if k not in allowed:
                self.fail((k,), f"unknown field {k!r}; allowed: {', '.join(sorted(allowed))}")


def kind_of(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string"}.get(type(v), type(v).__name__)


def check_json_value(r: FieldReader, v: Any, rel: tuple, depth: int = 0) -> None:
    """A free-form JSON value (lock, model config): strings without NUL or line breaks, finite numbers."""
    if depth > 32:
        r.fail(rel, "is nested too deeply")
    if isinstance(v, str):
        bad = control_char_problem(v, allow_tab=True)
        if bad:
            r.fail(rel, f"{v[:80]!r} {bad}")
    elif isinstance(v, float) and not math.isfinite(v):
        r.fail(rel, f"{v} is not a finite number")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            check_json_value(r, x, rel + (i,), depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            bad = control_char_problem(k, allow_tab=False)
            if bad:
                r.fail(rel + (k,), f"key {k[:80]!r} {bad}")
            check_json_value(r, x, rel + (k,), depth + 1)
