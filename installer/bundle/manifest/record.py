"""The base of every MANIFEST record: frozen dataclasses with a ``to_dict`` back to the JSON form, and a
read-only dict for the free-form JSON they carry (model config, lock)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return FrozenDict((k, freeze(x)) for k, x in v.items())
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    return v


class FrozenDict(dict):
    """A read-only dict (free-form JSON inside a frozen record: model config, lock)."""

    def _ro(self, *a, **k):
        raise TypeError("manifest records are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _ro  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))


def thaw(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [thaw(x) for x in v]
    return v


@dataclass(frozen=True)
class Record:
    """Common ``to_dict``: the MANIFEST.json form (lists, dicts) of a record."""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Record):
                v = v.to_dict()
            elif isinstance(v, tuple) and v and all(isinstance(x, Record) for x in v):
                v = [x.to_dict() for x in v]
            else:
                v = thaw(v)
            out[f.name] = v
        return out
