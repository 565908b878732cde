"""Preflight of what a GPU start needs beside the driver: the environment's python (for ``existing:``
environments, the server's own) and a C compiler.

vLLM on CUDA compiles at every start: Triton builds its launcher stub with a C compiler (``CC``, else
``cc``/``gcc``/``clang`` on PATH) against the environment's ``Python.h``; without one the engine dies with
"Failed to find C compiler. Please specify via CC environment variable". The compiler the service will use is
the one :func:`service_compiler` names; the env file sets ``CC`` to it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from installer.bundle.manifest import EnvironmentRecord, ServiceRecord
from installer.bundle.names import SYSTEM_PATH
from installer.preflight.context import FAIL, PASS, WARN, CheckResult, _Context

COMPILERS = ("cc", "gcc", "clang")  # what Triton looks for on PATH, in its order
CARRIED = "the environment's own"  # service_compiler's origin for the compiler the environment carries
SERVICE_USER = "llm"
PROBE_TIMEOUT_S = 300  # importing vLLM (and torch) on a cold page cache can take a minute

_PROBE = r"""
import importlib.util, json, sys, sysconfig
out = {"python": "%d.%d.%d" % sys.version_info[:3], "include": sysconfig.get_paths()["include"]}
for mod in ("vllm", "torch", "triton", "flashinfer"):
    out[mod] = importlib.util.find_spec(mod) is not None
if out["vllm"]:
    try:
        import vllm
        out["vllm_version"] = getattr(vllm, "__version__", None)
    except Exception as e:
        out["vllm_error"] = "vLLM does not import: %s: %s" % (type(e).__name__, e)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class EnvProbe:
    """What the environment's own python says about itself (``existing:`` environments)."""

    python: str | None = None
    include: str | None = None
    vllm_version: str | None = None
    has: frozenset[str] = frozenset()
    error: str | None = None


def clean_env(prefix: Path, home: str) -> dict[str, str]:
    """The environment a probe runs in: like the service's (offline, the env's bin first), nothing inherited."""
    return {"PATH": f"{prefix / 'bin'}:{SYSTEM_PATH}", "HOME": home, "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def _unprivileged() -> tuple[int | None, int]:
    """(uid, gid) the probe runs as when we are root: the service user ``llm``, else ``nobody``."""
    if os.geteuid() != 0:
        return None, os.getegid()
    import pwd

    for name in (SERVICE_USER, "nobody"):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            continue
    return 65534, 65534


def _probe(ctx: _Context, prefix: Path) -> EnvProbe:
    """:func:`probe_env` once per environment and preflight run (importing vLLM can take a minute)."""
    if prefix not in ctx.env_probes:
        ctx.env_probes[prefix] = probe_env(prefix)
    return ctx.env_probes[prefix]  # type: ignore[return-value]


def probe_env(prefix: Path) -> EnvProbe:
    """Run ``prefix/bin/python`` once, as the service user would (``llm``, or ``nobody`` before the install
    creates it): its version, include dir, and whether vLLM imports (and its version)."""
    python = Path(prefix) / "bin" / "python"
    if not os.access(python, os.X_OK):
        return EnvProbe(error=f"{python} is not there (or not executable)")
    uid, gid = _unprivileged()
    with tempfile.TemporaryDirectory(prefix="llm-probe-") as home:
        if uid is not None:
            os.chown(home, uid, gid)

        def drop() -> None:  # as the service user (or nobody before it exists): what it cannot read fails here
            if uid is not None:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)

        try:
            p = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, cwd=home,
                               env=clean_env(Path(prefix), home), timeout=PROBE_TIMEOUT_S, check=False,
                               preexec_fn=drop)
        except (OSError, subprocess.TimeoutExpired) as e:
            return EnvProbe(error=f"{python} did not run: {e}")
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit status {p.returncode}"]
        return EnvProbe(error=f"{python} failed: {tail[0]}")
    has = frozenset(k for k in ("vllm", "torch", "triton", "flashinfer") if out.get(k))
    return EnvProbe(python=out.get("python"), include=out.get("include"), vllm_version=out.get("vllm_version"),
                    has=has, error=out.get("vllm_error") or (None if "vllm" in has else "vLLM is not installed"))


def _unreachable(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that other users cannot enter (the service user is one)."""
    for d in [*reversed(Path(path).parents), Path(path)]:
        try:
            if not d.stat().st_mode & stat.S_IXOTH:
                return d
        except OSError:
            return d
    return None


def check_environment(ctx: _Context) -> list[CheckResult]:
    out = []
    live = ctx.root.resolve() == Path("/")
    for env in ctx.envs.values():
        if not env.is_existing:
            continue
        prefix = ctx.root / env.existing.lstrip("/")
        remedy = (f"install vLLM into {env.existing} (readable by the service user), or point "
                  f"environments[].existing at the environment that has it")
        if not live:
            ok = os.access(prefix / "bin" / "python", os.X_OK)
            out.append(CheckResult("environment", PASS if ok else FAIL,
                                   f"{env.existing}/bin/python {'is there' if ok else 'is not there'} "
                                   "(not run: the root is not this server)", "" if ok else remedy, env.name))
            continue
        python = prefix / "bin" / "python"
        if not os.access(python, os.X_OK):
            out.append(CheckResult("environment", FAIL, f"{env.existing}: {python} is not there (or not "
                                   "executable)", remedy, env.name))
            continue
        shut = _unreachable(prefix / "bin") or _unreachable(python.resolve().parent)
        if shut is not None:
            out.append(CheckResult("environment", FAIL, f"{env.existing}: the service user cannot enter {shut} "
                                   f"(mode {oct(shut.stat().st_mode & 0o777)}) on the way to {python.resolve()}",
                                   f"move the environment (and its python) out of {shut}, or `chmod o+x {shut}`",
                                   env.name))
            continue
        probe = _probe(ctx, prefix)
        if probe.error:
            out.append(CheckResult("environment", FAIL, f"{env.existing}: {probe.error}", remedy, env.name))
            continue
        out.append(CheckResult("environment", PASS, f"{env.existing}: python {probe.python}, vLLM "
                               f"{probe.vllm_version} ({', '.join(sorted(probe.has - {'vllm'})) or 'no torch'})",
                               subject=env.name))
    return out


def find_on_path(root: Path, names: tuple[str, ...] = COMPILERS, path: str = SYSTEM_PATH) -> str | None:
    """The first of ``names`` in ``path``'s dirs under ``root``, as the server will see it (absolute)."""
    for name in names:
        for d in path.split(":"):
            p = Path(root) / d.lstrip("/") / name
            if p.is_file() and os.access(p, os.X_OK):
                return f"{d.rstrip('/')}/{name}"
    return None


def service_compiler(root: Path, service: ServiceRecord | None, env: EnvironmentRecord,
                     prefix: Path | str | None) -> tuple[str | None, str]:
    """(the C compiler a GPU service will use, where it comes from): the service's own ``env: {CC: ...}``,
    the environment's carried compiler (``compiler`` in the MANIFEST, relative to its prefix), else the first
    ``cc``/``gcc``/``clang`` on the server's PATH. (None, why) when there is none."""
    if service is not None and service.env.get("CC"):
        return str(service.env["CC"]), "services[].env.CC"
    if env.compiler and prefix is not None:
        return f"{str(prefix).rstrip('/')}/{env.compiler}", CARRIED
    found = find_on_path(root)
    if found:
        return found, "the server's"
    return None, f"no {'/'.join(COMPILERS)} in {SYSTEM_PATH}"


def compile_test(cc: str, include: str | None, env: Mapping[str, str]) -> str | None:
    """Build a small shared object (as Triton does at start); None when it worked, else why not."""
    src = ("#include <Python.h>\nint llm_check(void) { return PY_MAJOR_VERSION; }\n" if include
           else "#include <stddef.h>\nint llm_check(void) { return (int)sizeof(size_t); }\n")
    with tempfile.TemporaryDirectory(prefix="llm-cc-") as d:
        (Path(d) / "t.c").write_text(src)
        cmd = [cc, "-shared", "-fPIC", "-O1", *(["-I", include] if include else []), "-o", "t.so", "t.c"]
        try:
            p = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=120,
                               env={**env, "HOME": d}, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{cc} did not run: {e}"
        if p.returncode != 0 or not (Path(d) / "t.so").is_file():
            lines = [x for x in (p.stderr or p.stdout).strip().splitlines() if x.strip()]
            return f"{' '.join(cmd)} failed: {lines[0] if lines else f'exit status {p.returncode}'}"
    return None


def carried_compile_test(prefix: Path, compiler: str, python: str | None) -> str | None:
    """Build a shared object with the compiler an unpacked environment carries (``compiler``, relative to
    ``prefix``) against its own ``Python.h``, as Triton will at the service's start; None when it worked."""
    short = ".".join(str(python or "").split(".")[:2])
    include = Path(prefix) / "include" / f"python{short}"
    if not short or not (include / "Python.h").is_file():
        found = sorted(Path(prefix).glob("include/python3*/Python.h"))
        include = found[0].parent if found else None
    return compile_test(str(Path(prefix) / compiler), str(include) if include else None,
                        clean_env(Path(prefix), "/"))


def _env_prefix(env: EnvironmentRecord) -> Path | None:
    """Where the environment is (or will be) on the server: the existing prefix, or its install dir."""
    if env.is_existing:
        return Path(env.existing)
    if env.content_hash:
        from installer.deploy.layout import env_dir

        return Path(env_dir({"name": env.name, "content_hash": env.content_hash}))
    return None


def check_compiler(ctx: _Context) -> list[CheckResult]:
    out = []
    live = ctx.root.resolve() == Path("/")
    for svc in ctx.manifest.services:
        env = ctx.env_of(svc)
        if env is None or env.is_cpu:
            continue
        prefix = _env_prefix(env)
        cc, origin = service_compiler(ctx.root, svc, env, prefix)
        remedy = ("install a C compiler from the distribution's offline media (`apt-get install gcc` / "
                  "`dnf install gcc`), carry one in the environment (environments[].compiler: true, the "
                  "default for a CUDA environment), or set services[].env.CC")
        if cc is None:
            out.append(CheckResult("compiler", FAIL, f"no C compiler for {svc.name} ({origin}): vLLM compiles "
                                   "Triton's launcher at every GPU start and the engine dies without one",
                                   remedy, svc.name))
            continue
        if not live:
            out.append(CheckResult("compiler", PASS, f"{cc} ({origin}; not run: the root is not this server)",
                                   subject=svc.name))
            continue
        if origin == CARRIED and not env.is_existing:
            out.append(CheckResult("compiler", PASS, f"{cc} ({origin}: it runs once the environment is unpacked)",
                                   subject=svc.name))
            continue
        include = None
        if env.is_existing:
            probe = _probe(ctx, ctx.root / env.existing.lstrip("/"))
            include = probe.include if probe.include and Path(probe.include, "Python.h").is_file() else None
        penv = clean_env(prefix if env.is_existing and prefix else Path("/nonexistent"), "/")
        bad = compile_test(cc, include, penv)
        if bad:
            out.append(CheckResult("compiler", FAIL, f"{svc.name}: {bad}", remedy, svc.name))
        elif env.is_existing and include is None:
            out.append(CheckResult("compiler", WARN, f"{cc} ({origin}) compiles, but {env.existing}'s python has "
                                   "no Python.h (Triton needs it)",
                                   "install the python headers (python3-dev / python3-devel) for that python",
                                   svc.name))
        else:
            out.append(CheckResult("compiler", PASS, f"{cc} ({origin}) builds a shared object"
                                   + (" against the environment's Python.h" if include else ""), subject=svc.name))
    return out
