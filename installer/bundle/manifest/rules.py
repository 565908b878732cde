"""The field rules of MANIFEST.json, one copy for both sides: patterns, allowed values, and what is wrong
with a text, a path or a host.

The build (packager/manifest.py, for the YAML) and the target (the records of this package) check the same
patterns with ``re.fullmatch`` and the same ``*_problem`` functions. Standard library only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

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
CLIMB_RE = re.compile(r"(^|[=/:,])\.\.(/|$|,|:)")
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
    if CLIMB_RE.search(value):
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
