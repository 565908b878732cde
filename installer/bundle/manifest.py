"""MANIFEST.json as typed, validated records: loaded once on the target, every field checked.

:meth:`Manifest.from_json` turns the bytes of a bundle's MANIFEST.json into frozen dataclasses, refusing
anything `pack build` would not have written: a wrong type, a name that is not a plain name (checked with
``re.fullmatch``, so ``"12.8\\n"`` is not a CUDA version), a path that is absolute or climbs with ``..``, a
newline or NUL anywhere, a ``%`` (systemd's specifier character) or shell syntax in what reaches the unit
files and the launcher. The error is a :class:`ManifestFieldError` naming the JSON path of the field
(``services[1].vllm_args[2]``). :meth:`Manifest.to_json` writes a record back as canonical JSON.

The service rules (no API key in ``vllm_args``/``env``, what an argument or a variable may contain, the
key file path, the host) live here once, in :func:`service_problems`: the installer applies them to the
MANIFEST and when it renders units (installer/service/), and ``pack validate``/``pack build``
(packager/manifest.py) apply the same function to the YAML, so a bundle that the installer would refuse
is never built and signed.

Standard library only: this runs on the target with the bundle's bare Python.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from installer.bundle.names import ARTIFACT_KINDS, FORMAT_VERSION, MANIFEST_NAME
from installer.errors import BundleError

# ------------------------------------------------------------------------ the rules (one copy, both sides)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
CUDA_RE = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")
CUDA_RUNTIME_RE = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}(\.[0-9]{1,5})?")
DRIVER_RE = re.compile(r"[0-9]{1,4}(\.[0-9]{1,4}){0,3}")
GLIBC_RE = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")
PYTHON_RE = re.compile(r"[0-9]{1,2}\.[0-9]{1,3}(\.[0-9]{1,3})?([a-z]{1,2}[0-9]{0,3})?\+?")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
REVISION_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._/+-]{0,254}")
SERVED_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
SONAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")
RUNTIME_ARTIFACT_RE = re.compile(r"runtime/[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.tar\.gz")
RUNTIME_PYTHON_RE = re.compile(r"bin/python3(\.[0-9]{1,2})?")
TOOL_RE = re.compile(r"[A-Za-z0-9._+ -]{0,64}")
URL_RE = re.compile(r"(?!.*/\.\.(/|$|\?|#))https?://[A-Za-z0-9._~:/?#\[\]@!&'()*+,=-]{1,2000}")
# a path inside the bundle or the environment: plain components only
# (\w is Unicode: hub repositories have non-ASCII file names; '.' and '..' components are refused apart)
PATH_PART_RE = re.compile(r"[\w.@+=,~()\[\]#&!-][\w.@+=,~()\[\]#&! -]{0,254}")
# an absolute path on the target (api_key_file): plain characters only, no '..'
ABS_PATH_RE = re.compile(r"(/[A-Za-z0-9_@+=,~-][A-Za-z0-9._@+=,~-]{0,254}){1,32}")

PLATFORMS = ("linux-64", "linux-aarch64", "linux-ppc64le")
ARCHES = ("x86_64", "aarch64", "ppc64le")
SOURCES = ("huggingface", "modelscope", "local")
SERVE_BY = ("path", "repo_id")
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "VLLM_API_KEY"
# What a vLLM argument or an env value may not contain. They are written quoted into /etc/llm/<name>.env
# (read by systemd and by the bash launcher, which passes them as one array element each); a '%' is
# systemd's specifier character, and '$', '`' and ';' are shell syntax that has no place in an argument
# `pack build` writes: refusing them keeps every value inert wherever it is read.
FORBIDDEN_IN_VALUES = ("%", "$", "`", ";")
_CLIMB_RE = re.compile(r"(^|[=/:,])\.\.(/|$|,|:)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_TAB_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
MAX_TEXT = 4096

Problem = tuple[tuple[str | int, ...], str]  # (field path relative to the entry, what is wrong)


def field_path(parts: Iterable[str | int]) -> str:
    """``("services", 1, "vllm_args", 2)`` → ``services[1].vllm_args[2]``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top>"


def control_char_problem(value: str, *, allow_tab: bool = False) -> str | None:
    """What is wrong with a string that holds a line break, NUL or other control character (None: nothing)."""
    m = (_CONTROL_BUT_TAB_RE if allow_tab else _CONTROL_RE).search(value)
    if m is None:
        return None
    c = m.group()
    what = {"\n": "a line break", "\r": "a carriage return", "\0": "a NUL byte"}.get(c, f"control character {c!r}")
    return f"contains {what} (at offset {m.start()})"


def value_problem(value: str) -> str | None:
    """Why a vLLM argument or an env value is refused (None: it is fine)."""
    if len(value) > MAX_TEXT:
        return f"is longer than {MAX_TEXT} characters"
    bad = control_char_problem(value)
    if bad:
        return bad
    for c in FORBIDDEN_IN_VALUES:
        if c in value:
            return (f"contains {c!r}, which is refused in arguments and environment values (systemd "
                    "specifiers and shell syntax never reach the service)")
    if _CLIMB_RE.search(value):
        return "climbs with '..' (give paths on the target as plain absolute paths)"
    return None


def host_problem(host: str) -> str | None:
    """None when ``host`` is an IP address or a plain host name vLLM can bind."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if len(host) <= 253 and HOSTNAME_RE.fullmatch(host):
        return None
    return f"{host!r} is not an IP address or a host name"


def is_loopback(host: str | None) -> bool:
    h = DEFAULT_HOST if host is None else host
    if h in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def abs_path_problem(path: str) -> str | None:
    """Why ``path`` is not a plain absolute path on the target (None: it is)."""
    bad = control_char_problem(path)
    if bad:
        return bad
    if not path.startswith("/"):
        return f"{path!r} must be an absolute path on the target (starting with /)"
    if any(part in (".", "..") for part in path.split("/")):
        return f"{path!r} must not contain '.' or '..' components"
    if not ABS_PATH_RE.fullmatch(path):
        return (f"{path!r} may contain only letters, digits and . _ @ + = , ~ - between slashes "
                "(no '%', spaces or shell syntax)")
    return None


def relpath_problem(path: str) -> str | None:
    """Why ``path`` is not a plain relative path (inside a bundle or an environment); None if it is."""
    bad = control_char_problem(path)
    if bad:
        return bad
    if not path or path.startswith("/") or "\\" in path:
        return f"{path!r} must be a relative path"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"{path!r} must not contain empty, '.' or '..' components"
        if not PATH_PART_RE.fullmatch(part):
            return f"{path!r}: component {part!r} holds a character that is not allowed in a path"
    return None


def service_problems(svc: Mapping) -> list[Problem]:
    """The service rules, for a MANIFEST ``services[]`` entry or a manifest.yaml one (defaults not filled).

    Checks the content of the fields that reach the target's unit files, env file and launcher. A field of
    the wrong type is skipped here (the caller's type check reports it). Returns every problem found.
    """
    out: list[Problem] = []

    def name_like(key: str, rx: re.Pattern, what: str) -> None:
        v = svc.get(key)
        if isinstance(v, str) and not rx.fullmatch(v):
            bad = control_char_problem(v)
            out.append(((key,), f"{v!r} is not a valid {what}" + (f": it {bad}" if bad else "")))

    name_like("name", NAME_RE, "service name (letters, digits, '.', '_', '-'; at most 64, starting with a "
                               "letter or digit)")
    name_like("model", NAME_RE, "model name")
    name_like("environment", NAME_RE, "environment name")
    served = svc.get("served_model_name")
    if isinstance(served, str) and (not SERVED_NAME_RE.fullmatch(served) or ".." in served.split("/")):
        out.append((("served_model_name",), f"{served!r} is not a valid served model name (letters, digits "
                                            "and . _ : / + -, no '..')"))
    host = svc.get("host")
    if isinstance(host, str):
        bad = host_problem(host)
        if bad:
            out.append((("host",), bad))
    key_file = svc.get("api_key_file")
    if isinstance(key_file, str):
        bad = abs_path_problem(key_file)
        if bad:
            out.append((("api_key_file",), bad))
    args = svc.get("vllm_args")
    if isinstance(args, (list, tuple)):
        for i, arg in enumerate(args):
            if not isinstance(arg, str):
                continue
            if arg.split("=", 1)[0] == "--api-key":
                out.append((("vllm_args", i), "--api-key in vllm_args would put the key on the command line "
                                              "and in the bundle; use api_key_file: (a file on the target)"))
                continue
            bad = value_problem(arg)
            if bad:
                out.append((("vllm_args", i), f"argument {arg!r} {bad}"))
    env = svc.get("env")
    if isinstance(env, Mapping):
        for k, v in env.items():
            if not isinstance(k, str) or not ENV_KEY_RE.fullmatch(k):
                out.append((("env", str(k)), f"{k!r} is not a valid environment variable name "
                                             "(letters, digits, '_'; not starting with a digit)"))
                continue
            if k == API_KEY_ENV:
                out.append((("env", k), f"{API_KEY_ENV} must not be set in env (it would be stored in "
                                        "/etc/llm/*.env); use api_key_file: (a file on the target)"))
                continue
            if isinstance(v, (str, int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
                bad = value_problem(str(v))
                if bad:
                    out.append((("env", k), f"value {str(v)!r} {bad}"))
    return out


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*", ""})


def port_conflicts(listeners: Iterable[tuple[str | None, int]]) -> list[tuple[int, int]]:
    """``(i, j)`` for each listener ``i`` whose port is already taken by an earlier listener ``j``.

    ``listeners`` are ``(host, port)`` with the defaults filled in (None means the default host). Two
    services clash on the same port when their hosts are equal or either listens on every address.
    """
    seen: list[tuple[str, int, int]] = []
    out = []
    for i, (host, port) in enumerate(listeners):
        h = DEFAULT_HOST if host is None else host
        for ph, pp, j in seen:
            if pp == port and (ph == h or ph in WILDCARD_HOSTS or h in WILDCARD_HOSTS):
                out.append((i, j))
                break
        seen.append((h, port, i))
    return out


def service_warnings(svc: Mapping) -> list[Problem]:
    """Advice, not refusal: a non-loopback listener without an API key serves anyone on the network."""
    host = svc.get("host")
    if (host is None or isinstance(host, str)) and not is_loopback(host) and not svc.get("api_key_file"):
        return [(("host",), f"listens on {host} without api_key_file: anyone who can reach this address can "
                            "use the API; set api_key_file: or host: 127.0.0.1")]
    return []


# ------------------------------------------------------------------------ errors and the typed reader


class ManifestFieldError(BundleError):
    """A MANIFEST.json field is missing, of the wrong type, or holds a value `pack build` never writes."""

    def __init__(self, field_path: str, problem: str, *, source: str = MANIFEST_NAME) -> None:
        self.field = field_path
        self.problem = problem
        super().__init__(f"{source}: {field_path}: {problem}",
                         hint="the manifest was not produced by `pack build` (or was edited); do not install "
                              "this bundle")


class _Reader:
    """Typed access to one JSON object with the path of every field, raising ManifestFieldError."""

    def __init__(self, obj: Any, path: tuple[str | int, ...], source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(obj, dict):
            self.fail((), f"expected an object, found {_kind(obj)}")
        self.obj: dict = obj

    def fail(self, rel: tuple[str | int, ...], msg: str):
        raise ManifestFieldError(field_path(self.path + rel), msg, source=self.source)

    def child(self, key: str, *, optional: bool = False) -> _Reader | None:
        v = self.raw(key, optional=optional)
        if v is None and not optional:
            self.fail((key,), "must not be null")
        return None if v is None else _Reader(v, self.path + (key,), self.source)

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
            self.fail(rel, f"expected a string, found {_kind(v)}")
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
            self.fail(rel, f"expected an integer, found {_kind(v)}")
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
            self.fail((key,), f"expected true or false, found {_kind(v)}")
        return v

    def list(self, key: str, *, optional: bool = True) -> list:
        v = self.raw(key, optional=optional)
        if v is None:
            return []
        if not isinstance(v, list):
            self.fail((key,), f"expected a list, found {_kind(v)}")
        return v

    def str_list(self, key: str, rx: re.Pattern | None = None, *, what: str = "value") -> tuple[str, ...]:
        return tuple(self.check_str(v, (key, i), rx, what=what) for i, v in enumerate(self.list(key)))

    def only_keys(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for k in self.obj:
            if k not in allowed:
                self.fail((k,), f"unknown field {k!r}; allowed: {', '.join(sorted(allowed))}")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string"}.get(type(v), type(v).__name__)


def _check_json_value(r: _Reader, v: Any, rel: tuple, depth: int = 0) -> None:
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
            _check_json_value(r, x, rel + (i,), depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            bad = control_char_problem(k, allow_tab=False)
            if bad:
                r.fail(rel + (k,), f"key {k[:80]!r} {bad}")
            _check_json_value(r, x, rel + (k,), depth + 1)


# ------------------------------------------------------------------------ the records


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return _FrozenDict((k, _freeze(x)) for k, x in v.items())
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


class _FrozenDict(dict):
    """A read-only dict (free-form JSON inside a frozen record: model config, lock)."""

    def _ro(self, *a, **k):
        raise TypeError("manifest records are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _ro  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))


def _thaw(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


@dataclass(frozen=True)
class _Record:
    """Common ``to_dict``: the MANIFEST.json form (lists, dicts) of a record."""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, _Record):
                v = v.to_dict()
            elif isinstance(v, tuple) and v and all(isinstance(x, _Record) for x in v):
                v = [x.to_dict() for x in v]
            else:
                v = _thaw(v)
            out[f.name] = v
        return out


@dataclass(frozen=True)
class BundleInfo(_Record):
    name: str
    version: str
    description: str = ""
    tool: str = ""

    @classmethod
    def read(cls, r: _Reader) -> BundleInfo:
        return cls(name=r.str("name", NAME_RE, what="bundle name"),
                   version=r.str("version", VERSION_RE, what="bundle version"),
                   description=r.str("description", optional=True, text=True) or "",
                   tool=r.str("tool", TOOL_RE, optional=True, what="tool name") or "")


@dataclass(frozen=True)
class TargetInfo(_Record):
    platform: str | None = None
    arch: str | None = None
    glibc: str | None = None

    @classmethod
    def read(cls, r: _Reader) -> TargetInfo:
        return cls(platform=r.str("platform", choices=PLATFORMS, optional=True),
                   arch=r.str("arch", choices=ARCHES, optional=True),
                   glibc=r.str("glibc", GLIBC_RE, optional=True, what="glibc version"))


@dataclass(frozen=True)
class ArtifactRef(_Record):
    """``runtime`` / ``installer``: which artifact holds the installer runtime or package."""

    artifact: str
    python: str | None = None

    @classmethod
    def read(cls, r: _Reader) -> ArtifactRef:
        return cls(artifact=r.relpath("artifact"), python=r.relpath("python", optional=True))


@dataclass(frozen=True)
class ArtifactRecord(_Record):
    path: str
    size: int
    sha256: str
    kind: str

    @classmethod
    def read(cls, r: _Reader) -> ArtifactRecord:
        return cls(path=r.relpath("path", what="artifact path"), size=r.int("size"),
                   sha256=r.str("sha256", SHA256_RE, what="sha256"), kind=r.str("kind", choices=ARTIFACT_KINDS))


@dataclass(frozen=True)
class VllmInfo(_Record):
    version: str | None = None
    command: tuple[str, ...] = ()
    distribution: str | None = None

    @classmethod
    def read(cls, r: _Reader) -> VllmInfo:
        cmd = r.list("command")
        for i, c in enumerate(cmd):
            r.check_str(c, ("command", i), None)
        if len(cmd) >= 3 and cmd[1] == "-m":
            bad = relpath_problem(cmd[0])
            if bad:
                r.fail(("command", 0), bad)
            if not MODULE_RE.fullmatch(cmd[2]):
                r.fail(("command", 2), f"{cmd[2]!r} is not a Python module name")
        elif cmd:
            for i, c in enumerate(cmd):
                bad = relpath_problem(c) if i == 0 else value_problem(c)
                if bad:
                    r.fail(("command", i), bad)
        return cls(version=r.str("version", VERSION_RE, optional=True, what="vLLM version"), command=tuple(cmd),
                   distribution=r.str("distribution", NAME_RE, optional=True, what="distribution name"))


@dataclass(frozen=True)
class EnvFrame(_Record):
    """One independent zstd frame of an environment archive: its byte range and sha256."""

    offset: int
    size: int
    sha256: str


@dataclass(frozen=True)
class EnvironmentRecord(_Record):
    """A packed environment (``artifact`` + ``content_hash``), or one the server already has (``existing``:
    the absolute prefix holding ``bin/python`` with vLLM; nothing is carried, the installer checks it)."""

    name: str
    artifact: str | None = None
    content_hash: str | None = None
    existing: str | None = None
    compiler: str | None = None  # a C compiler carried in the environment, relative to its prefix
    python: str | None = None
    platform: str | None = None
    cuda: str | None = None
    cuda_runtime: str | None = None
    min_driver: str | None = None
    driver_floor: str | None = None
    glibc: str | None = None
    archive_size: int | None = None
    unpacked_size: int | None = None
    files: int | None = None
    vllm: VllmInfo | None = None
    needed_libraries: tuple[str, ...] = ()
    needed_by: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _FrozenDict())
    lock: Mapping | None = None
    # the archive's independent zstd frames, decoded in parallel (installer/unpack/frames.py)
    frames: tuple[EnvFrame, ...] = ()

    @classmethod
    def read(cls, r: _Reader) -> EnvironmentRecord:
        name = r.str("name", NAME_RE, what="environment name")
        existing = r.str("existing", None, optional=True, what="path")
        if existing is not None:
            bad = abs_path_problem(existing)
            if bad:
                r.fail(("existing",), bad)
            for key in ("artifact", "content_hash", "lock", "needed_libraries", "needed_by"):
                if r.obj.get(key):
                    r.fail((key,), f"an existing environment ({existing}) has no {key}: nothing is carried")
            artifact = content_hash = None
        else:
            artifact = r.relpath("artifact")
            if artifact != f"envs/{name}.tar.zst":
                r.fail(("artifact",), f"{artifact!r} is not envs/{name}.tar.zst")
            content_hash = r.str("content_hash", SHA256_RE, what="content hash (64 hex digits)")
        needed_by = r.child("needed_by", optional=True)
        nb: dict[str, tuple[str, ...]] = {}
        if needed_by is not None:
            for lib, paths in needed_by.obj.items():
                r.check_str(lib, ("needed_by", lib), SONAME_RE, what="library name")
                if not isinstance(paths, list):
                    r.fail(("needed_by", lib), f"expected a list, found {_kind(paths)}")
                nb[lib] = tuple(r.check_str(p, ("needed_by", lib, i), None) for i, p in enumerate(paths))
        frames = []
        for i, fr in enumerate(r.list("frames", optional=True) or []):
            fr_r = _Reader(fr, r.path + ("frames", i), r.source)
            frames.append(EnvFrame(offset=fr_r.int("offset"), size=fr_r.int("size", minimum=1),
                                   sha256=fr_r.str("sha256", SHA256_RE, what="sha256")))
        pos = 0
        for i, fr in enumerate(frames):
            if fr.offset != pos:
                r.fail(("frames", i, "offset"), f"frame {i} starts at {fr.offset}, expected {pos} (no gaps)")
            pos += fr.size
        if frames and existing is not None:
            r.fail(("frames",), "an existing environment has no archive")
        vllm = r.child("vllm", optional=True)
        lock = r.raw("lock", optional=True)
        if lock is not None:
            if not isinstance(lock, dict):
                r.fail(("lock",), f"expected an object, found {_kind(lock)}")
            _check_json_value(r, lock, ("lock",))
        return cls(
            name=name, artifact=artifact, content_hash=content_hash, existing=existing,
            compiler=r.relpath("compiler", optional=True, what="compiler path"),
            python=r.str("python", PYTHON_RE, optional=True, what="Python version"),
            platform=r.str("platform", choices=PLATFORMS, optional=True),
            cuda=r.str("cuda", CUDA_RE, optional=True, what="CUDA version (like 12.8)"),
            cuda_runtime=r.str("cuda_runtime", CUDA_RUNTIME_RE, optional=True, what="CUDA runtime version"),
            min_driver=r.str("min_driver", DRIVER_RE, optional=True, what="driver version"),
            driver_floor=r.str("driver_floor", DRIVER_RE, optional=True, what="driver version"),
            glibc=r.str("glibc", GLIBC_RE, optional=True, what="glibc version"),
            archive_size=r.int("archive_size", optional=True),
            unpacked_size=r.int("unpacked_size", optional=True),
            files=r.int("files", optional=True),
            vllm=VllmInfo.read(vllm) if vllm is not None else None,
            needed_libraries=r.str_list("needed_libraries", SONAME_RE, what="library name"),
            needed_by=_FrozenDict(nb),
            lock=_freeze(lock) if lock is not None else None,
            frames=tuple(frames),
        )

    @property
    def is_cpu(self) -> bool:
        return not self.cuda

    @property
    def is_existing(self) -> bool:
        return self.existing is not None


@dataclass(frozen=True)
class ModelFile(_Record):
    path: str
    size: int
    sha256: str

    @classmethod
    def read(cls, r: _Reader) -> ModelFile:
        return cls(path=r.relpath("path"), size=r.int("size"), sha256=r.str("sha256", SHA256_RE, what="sha256"))


@dataclass(frozen=True)
class ModelRecord(_Record):
    name: str
    source: str
    commit: str
    dir: str
    files: tuple[ModelFile, ...] = ()
    size: int = 0
    repo: str | None = None
    revision: str | None = None
    endpoint: str | None = None
    config: Mapping = field(default_factory=lambda: _FrozenDict())
    pinned_by: str | None = None  # "commit" (the hub's commit id) or "content" (content_hash; ModelScope branches)
    content_hash: str | None = None
    hub_file_commits: tuple[str, ...] = ()

    @classmethod
    def read(cls, r: _Reader) -> ModelRecord:
        name = r.str("name", NAME_RE, what="model name")
        d = r.relpath("dir")
        if d != f"models/{name}":
            r.fail(("dir",), f"{d!r} is not models/{name}")
        files = tuple(ModelFile.read(_Reader(f, r.path + ("files", i), r.source))
                      for i, f in enumerate(r.list("files")))
        seen: set[str] = set()
        for i, f in enumerate(files):
            if f.path in seen:
                r.fail(("files", i, "path"), f"{f.path!r} is listed twice")
            seen.add(f.path)
        revision = r.str("revision", REVISION_RE, optional=True, what="revision")
        if revision is not None and ".." in revision:
            r.fail(("revision",), f"{revision!r} is not a valid revision")
        config = r.raw("config", optional=True)
        if config is not None:
            if not isinstance(config, dict):
                r.fail(("config",), f"expected an object, found {_kind(config)}")
            _check_json_value(r, config, ("config",))
        size = r.int("size", optional=True, default=None)
        if size is None:
            size = sum(f.size for f in files)
        return cls(name=name, source=r.str("source", choices=SOURCES),
                   commit=r.str("commit", COMMIT_RE, what="commit (40 or 64 hex digits)"),
                   dir=d, files=files, size=size,
                   repo=r.str("repo", REPO_RE, optional=True, what="repository id (org/name)"),
                   revision=revision,
                   endpoint=_endpoint(r),
                   config=_freeze(config or {}),
                   pinned_by=r.str("pinned_by", optional=True, choices=("commit", "content")),
                   content_hash=r.str("content_hash", HEX64_RE, optional=True, what="content hash (64 hex digits)"),
                   hub_file_commits=r.str_list("hub_file_commits", HEX40_RE, what="commit id (40 hex digits)"))


HEX40_RE = re.compile(r"[0-9a-f]{40}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")


def _endpoint(r: _Reader) -> str | None:
    v = r.str("endpoint", URL_RE, optional=True, what="endpoint URL")
    if v is not None and _CLIMB_RE.search(v):
        r.fail(("endpoint",), f"{v!r} is not a valid endpoint URL ('..' in the path)")
    return v


SERVICE_FIELDS = ("name", "model", "environment", "served_model_name", "host", "port", "gpus",
                  "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "dtype",
                  "gpu_memory_utilization", "trust_remote_code", "api_key_file", "serve_by", "vllm_args", "env")


@dataclass(frozen=True)
class ServiceRecord(_Record):
    name: str
    model: str
    environment: str | None = None
    served_model_name: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    gpus: tuple[int, ...] = ()
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str | None = None
    gpu_memory_utilization: float | None = None
    trust_remote_code: bool = False
    api_key_file: str | None = None
    serve_by: str = "path"
    vllm_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: _FrozenDict())

    @classmethod
    def read(cls, r: _Reader) -> ServiceRecord:
        r.only_keys(SERVICE_FIELDS)
        gpus = tuple(r.check_int(g, ("gpus", i), minimum=0, maximum=1023) for i, g in enumerate(r.list("gpus")))
        if len(set(gpus)) != len(gpus):
            r.fail(("gpus",), "a GPU index is listed twice")
        util = r.raw("gpu_memory_utilization", optional=True)
        if util is not None:
            if isinstance(util, bool) or not isinstance(util, (int, float)) or not (0 < util <= 1):
                r.fail(("gpu_memory_utilization",), f"expected a number in (0, 1], found {util!r}")
            util = float(util)
        env_r = r.child("env", optional=True)
        env: dict[str, str] = {}
        if env_r is not None:
            for k, v in env_r.obj.items():
                if isinstance(v, bool):
                    env[k] = "1" if v else "0"
                elif isinstance(v, (str, int)) or (isinstance(v, float) and math.isfinite(v)):
                    env[k] = str(v)
                else:
                    r.fail(("env", k), f"expected a string, number or boolean, found {_kind(v)}")
        args = r.str_list("vllm_args")
        svc = cls(
            name=r.str("name", what="service name"),
            model=r.str("model", what="model name"),
            environment=r.str("environment", optional=True, what="environment name"),
            served_model_name=r.str("served_model_name", optional=True),
            host=r.str("host", optional=True) or DEFAULT_HOST,
            port=r.int("port", minimum=1, maximum=65535, optional=True, default=DEFAULT_PORT),
            gpus=gpus,
            tensor_parallel_size=r.int("tensor_parallel_size", minimum=1, maximum=1024, optional=True, default=1),
            pipeline_parallel_size=r.int("pipeline_parallel_size", minimum=1, maximum=1024, optional=True,
                                         default=1),
            max_model_len=r.int("max_model_len", minimum=1, optional=True),
            dtype=r.str("dtype", choices=DTYPES, optional=True),
            gpu_memory_utilization=util,
            trust_remote_code=r.bool("trust_remote_code"),
            api_key_file=r.str("api_key_file", optional=True),
            serve_by=r.str("serve_by", choices=SERVE_BY, optional=True) or "path",
            vllm_args=args,
            env=_FrozenDict(env),
        )
        problems = service_problems({**svc.to_dict(), "env": env_r.obj if env_r is not None else {}})
        if problems:
            rel, msg = problems[0]
            r.fail(rel, msg)
        return svc

    @property
    def api_name(self) -> str:
        """The model name clients use (served_model_name, default the service name)."""
        return self.served_model_name or self.name


@dataclass(frozen=True)
class Manifest(_Record):
    """MANIFEST.json, validated. ``raw`` is the parsed JSON (for code that still reads the dict)."""

    bundle: BundleInfo
    target: TargetInfo
    artifacts: tuple[ArtifactRecord, ...] = ()
    runtime: ArtifactRef | None = None
    installer: ArtifactRef | None = None
    environments: tuple[EnvironmentRecord, ...] = ()
    models: tuple[ModelRecord, ...] = ()
    services: tuple[ServiceRecord, ...] = ()
    format_version: int = FORMAT_VERSION
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)

    # -- reading
    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = MANIFEST_NAME, partial: bool = False) -> Manifest:
        """Parse and validate MANIFEST.json bytes; raises :class:`BundleError` (a ManifestFieldError for a bad
        field, naming its JSON path). Refuses what ``json`` would quietly accept: duplicate keys, NaN and
        Infinity, text that is not UTF-8."""
        if isinstance(data, bytes):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BundleError(f"{source}: not valid UTF-8 ({e})",
                                  hint="the manifest is corrupt; copy the bundle again") from e
        else:
            text = data
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise BundleError(f"{source}: not valid JSON ({why})",
                              hint="the manifest is corrupt; copy the bundle again") from e
        return cls.from_dict(obj, source=source, partial=partial)

    @classmethod
    def from_dict(cls, obj: Any, *, source: str = MANIFEST_NAME, partial: bool = False) -> Manifest:
        """Validate a parsed MANIFEST. ``partial``: a manifest assembled on the target (a bundle's manifest
        plus environments of installed bundles): every field is checked, but not ``format_version`` nor
        that each artifact named is listed in ``artifacts``."""
        if not isinstance(obj, dict):
            raise BundleError(f"{source}: expected a JSON object, found {_kind(obj)}")
        version = obj.get("format_version", FORMAT_VERSION if partial else None)
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise BundleError(f"{source}: bundle format version {version!r} is not supported "
                              f"(this tool reads version {FORMAT_VERSION})",
                              hint="use the installer that came with the bundle, or rebuild it")
        r = _Reader(obj, (), source)
        arts = tuple(ArtifactRecord.read(_Reader(a, ("artifacts", i), source))
                     for i, a in enumerate(r.list("artifacts")))
        runtime = r.child("runtime", optional=True)
        installer = r.child("installer", optional=True)
        if runtime is not None:
            runtime.str("artifact", RUNTIME_ARTIFACT_RE, what="runtime artifact (runtime/<env>.tar.gz)")
            runtime.str("python", RUNTIME_PYTHON_RE, what="runtime python (bin/python3.N, as install.sh accepts)")
        if installer is not None:
            installer.str("artifact", choices=("installer.tar.gz",))
        target = r.child("target", optional=True)
        m = cls(
            bundle=BundleInfo.read(r.child("bundle")),
            target=TargetInfo.read(target) if target is not None else TargetInfo(),
            artifacts=arts,
            runtime=ArtifactRef.read(runtime) if runtime is not None else None,
            installer=ArtifactRef.read(installer) if installer is not None else None,
            environments=tuple(EnvironmentRecord.read(_Reader(e, ("environments", i), source))
                               for i, e in enumerate(r.list("environments"))),
            models=tuple(ModelRecord.read(_Reader(x, ("models", i), source))
                         for i, x in enumerate(r.list("models"))),
            services=tuple(ServiceRecord.read(_Reader(s, ("services", i), source))
                           for i, s in enumerate(r.list("services"))),
            format_version=version,
            raw=obj,
        )
        m._cross_check(r, partial=partial)
        return m

    def _cross_check(self, r: _Reader, *, partial: bool = False) -> None:
        for section in ("artifacts", "environments", "models", "services"):
            seen: dict[str, int] = {}
            key = "path" if section == "artifacts" else "name"
            for i, item in enumerate(getattr(self, section)):
                v = getattr(item, key)
                if v in seen:
                    r.fail((section, i, key), f"{v!r} is listed twice (also {section}[{seen[v]}])")
                seen[v] = i
        listed = {a.path for a in self.artifacts}
        for i, a in enumerate(self.artifacts):
            if a.path in (MANIFEST_NAME, MANIFEST_NAME + ".sig"):
                r.fail(("artifacts", i, "path"), f"{a.path!r} is reserved")
        ports = port_conflicts((s.host, s.port) for s in self.services)
        for i, j in ports:
            s = self.services[i]
            r.fail(("services", i, "port"), f"port {s.port} on {s.host} is already used by services[{j}]")
        if partial:
            return
        for key, ref in (("runtime", self.runtime), ("installer", self.installer)):
            if ref is not None and ref.artifact not in listed:
                r.fail((key, "artifact"), f"{ref.artifact!r} is not listed in artifacts")
        for i, e in enumerate(self.environments):
            if e.artifact is not None and e.artifact not in listed:
                r.fail(("environments", i, "artifact"), f"{e.artifact!r} is not listed in artifacts")

    # -- writing
    def to_dict(self) -> dict:
        out = super().to_dict()
        del out["raw"]
        for key in ("runtime", "installer"):
            if out[key] is not None and out[key].get("python") is None and key == "installer":
                out[key].pop("python")
        return out

    def to_json(self) -> bytes:
        """Canonical MANIFEST.json bytes (the serialisation of installer/bundle/reader.py's canonical_json)."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    # -- lookups
    def environment(self, name: str | None) -> EnvironmentRecord | None:
        return next((e for e in self.environments if e.name == name), None)

    def model(self, name: str | None) -> ModelRecord | None:
        return next((m for m in self.models if m.name == name), None)

    def service(self, name: str | None) -> ServiceRecord | None:
        return next((s for s in self.services if s.name == name), None)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# ------------------------------------------------------------------------ accepting either form


def as_manifest(m: Manifest | Mapping, *, source: str = MANIFEST_NAME) -> Manifest:
    """A :class:`Manifest` from a record or a parsed MANIFEST dict (validated)."""
    return m if isinstance(m, Manifest) else Manifest.from_dict(dict(m), source=source, partial=True)


def as_service(s: ServiceRecord | Mapping, *, path: tuple = ("services", 0)) -> ServiceRecord:
    return s if isinstance(s, ServiceRecord) else ServiceRecord.read(_Reader(dict(s), path, MANIFEST_NAME))


def as_environment(e: EnvironmentRecord | Mapping, *, path: tuple = ("environments", 0)) -> EnvironmentRecord:
    return e if isinstance(e, EnvironmentRecord) else EnvironmentRecord.read(_Reader(dict(e), path, MANIFEST_NAME))
