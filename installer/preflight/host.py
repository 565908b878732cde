"""Preflight checks about the host: glibc, CPU architecture, disk space, ports, API key files, systemd."""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import socket
from pathlib import Path

from installer.bundle import manifest as records
from installer.deploy.layout import ENV_MARKER, STAGING, VERIFIED_LOG, read_verified, verified_here
from installer.preflight.context import DISK_MARGIN, FAIL, PASS, SKIP, WARN, CheckResult, _Context, _gib, _version_tuple
from installer.preflight.gpu import _model_bytes

_ARCH_OF_PLATFORM = {"linux-64": "x86_64", "linux-aarch64": "aarch64", "linux-ppc64le": "ppc64le"}


_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


_LIBC_RELEASE = re.compile(rb"release version (\d+\.\d+)")


_LIB_DIRS = ("lib", "lib64", "usr/lib", "usr/lib64", "usr/local/lib", "lib/x86_64-linux-gnu",
             "usr/lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu",
             "lib/powerpc64le-linux-gnu", "usr/lib/powerpc64le-linux-gnu")


def glibc_version(root: Path = Path("/")) -> str | None:
    """The glibc of ``root``: ``os.confstr`` for the running system, else read from root's libc.so.6."""
    if Path(root).resolve() == Path("/"):
        try:
            text = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (ValueError, OSError, AttributeError):
            text = ""
        m = re.search(r"(\d+\.\d+)", text)
        if m:
            return m.group(1)
    for d in _LIB_DIRS:
        libc = Path(root) / d / "libc.so.6"
        if libc.is_file():
            m = _LIBC_RELEASE.search(libc.read_bytes())
            if m:
                return m.group(1).decode()
    return None


def check_glibc(ctx: _Context) -> list[CheckResult]:
    have = glibc_version(ctx.root)
    target_floor = ctx.manifest.target.glibc
    out = []
    for env in (e for e in ctx.envs.values() if not e.is_existing):  # the server's own: not built for it
        name = env.name
        floor = env.glibc or target_floor
        if not floor:
            out.append(CheckResult("glibc", SKIP, "no glibc floor recorded for this environment", subject=name))
        elif have is None:
            out.append(CheckResult("glibc", WARN, f"cannot read this server's glibc version (need ≥ {floor})",
                                   f"check with `ldd --version` (need ≥ {floor})", name))
        elif _version_tuple(have) < _version_tuple(floor):
            out.append(CheckResult("glibc", FAIL, f"glibc {have} < {floor} required by the environment",
                                   f"rebuild the bundle with target.glibc: \"{have}\" so the solver picks "
                                   "packages this server can run, or upgrade the OS", name))
        else:
            out.append(CheckResult("glibc", PASS, f"glibc {have} ≥ {floor}", subject=name))
    return out


def _machine() -> str:
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def check_arch(ctx: _Context) -> list[CheckResult]:
    target = ctx.manifest.target
    wanted: dict[str, str] = {}
    if target.arch or target.platform:
        wanted["target"] = target.arch or _ARCH_OF_PLATFORM.get(target.platform, target.platform)
    for env in (e for e in ctx.envs.values() if not e.is_existing):  # the server's own: not built for it
        if env.platform:
            wanted[env.name] = _ARCH_OF_PLATFORM.get(env.platform, env.platform)
    have = _machine()
    if not wanted:
        return [CheckResult("arch", SKIP, f"bundle names no platform (this server: {have})", subject="target")]
    out = []
    for subject, arch in wanted.items():
        arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
        if arch != have:
            plat = next((p for p, a in _ARCH_OF_PLATFORM.items() if a == have), f"linux-{have}")
            out.append(CheckResult("arch", FAIL, f"built for {arch}, this server is {have}",
                                   f"build the bundle for platform {plat} (target.platform in the manifest)",
                                   subject))
        else:
            out.append(CheckResult("arch", PASS, f"{arch} = this server ({have})", subject=subject))
    return out


def _existing_ancestor(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _staged_env(d: Path, content_hash: str | None) -> bool:
    """An earlier, refused run left this environment verified and unpacked in the staging tree (reused)."""
    try:
        return json.loads((d / ENV_MARKER).read_bytes()).get("content_hash") == content_hash
    except (OSError, ValueError, AttributeError):
        return False


def _staged_model_bytes(d: Path, files) -> int:
    """Bytes of the model files an earlier run verified in the staging tree (kept, not copied again)."""
    done = read_verified(d / VERIFIED_LOG)
    return sum(f.size for f in files
               if verified_here(d, {"sha256": f.sha256, "size": f.size, "path": f.path}, done))


def check_disk(ctx: _Context) -> list[CheckResult]:
    """Room for exactly what the install writes, per filesystem: the environments and models are unpacked and
    copied once, straight from the bundle or its volumes (no scratch copy of the bundle anywhere), into the
    staging tree (less what an earlier run verified there already), then renamed into /opt/llm: on one
    filesystem that costs nothing more; when /opt/llm is another one, each byte is written there once more."""
    staging = ctx.root / STAGING.lstrip("/")
    envs = models = s_envs = s_models = 0  # into /opt/llm; still to be written into the staging tree
    present, kept = [], []
    for env in ctx.envs.values():
        if env.is_existing:  # nothing is unpacked
            continue
        hash16 = (env.content_hash or "")[:16]
        target = ctx.install_dir / "envs" / env.name / hash16
        if target.is_dir():
            present.append(env.name)
            continue
        envs += env.unpacked_size or 0
        if _staged_env(staging / "envs" / env.name / hash16, env.content_hash):
            kept.append(env.name)
        else:
            s_envs += env.unpacked_size or 0
    for m in ctx.models.values():
        target = ctx.install_dir / "models" / m.name / m.commit
        if target.is_dir():
            present.append(m.name)
            continue
        size = _model_bytes(m)
        done = _staged_model_bytes(staging / "models" / m.name / m.commit, m.files)
        if done:
            kept.append(f"{m.name} {_gib(done)}")
        models += size
        s_models += size - done
    where = _existing_ancestor(ctx.install_dir)
    s_where = _existing_ancestor(staging)
    two = os.stat(s_where).st_dev != os.stat(where).st_dev
    notes = ((f" (already installed: {', '.join(present)})" if present else "")
             + (f" (verified by an earlier run: {', '.join(kept)})" if kept else ""))
    # one filesystem: what is not in staging yet is written once; two: all of it lands in /opt/llm by a copy
    e, mo = (envs, models) if two else (s_envs, s_models)
    need = int((e + mo) * DISK_MARGIN)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    formula = f"(environments {_gib(e)} + models {_gib(mo)}) × {DISK_MARGIN} = {_gib(need)}" + notes
    if free < need:
        return [CheckResult("disk", FAIL, f"{formula} > {_gib(free)} free at {where}",
                            f"free {_gib(need - free)} on the filesystem holding {ctx.install_dir} "
                            "(old versions: `install.sh --uninstall` of unused bundles)", str(ctx.install_dir))]
    results = [CheckResult("disk", PASS, f"{formula} ≤ {_gib(free)} free at {where}", subject=str(ctx.install_dir))]
    # Everything is staged and verified under /var/lib/llm/staging first, then renamed into place: on one
    # filesystem that costs nothing more; on another, the staged copy needs room there too.
    s_need = int((s_envs + s_models) * DISK_MARGIN)
    if two and s_need:
        s_st = os.statvfs(s_where)
        s_free = s_st.f_bavail * s_st.f_frsize
        detail = (f"staging (environments {_gib(s_envs)} + models {_gib(s_models)}) × {DISK_MARGIN} = "
                  f"{_gib(s_need)} {'>' if s_free < s_need else '≤'} {_gib(s_free)} free at {s_where}")
        if s_free < s_need:
            results.append(CheckResult("disk", FAIL, detail,
                                       f"free {_gib(s_need - s_free)} on the filesystem holding {staging} (the "
                                       "installer verifies everything there before placing it)", str(staging)))
        else:
            results.append(CheckResult("disk", PASS, detail, subject=str(staging)))
    return results


def port_free(host: str, port: int) -> OSError | None:
    """Try to bind ``host:port`` as vLLM (uvicorn) does; None when free, else the error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return e
    return None


def check_ports(ctx: _Context) -> list[CheckResult]:
    if not ctx.services:
        return []
    if not ctx.live:
        return [CheckResult("ports", SKIP, f"staging root {ctx.root}: ports are checked on the server that runs "
                            "it", subject=s.name) for s in ctx.services]
    out = []
    by_port: dict[int, list[str]] = {}
    for s in ctx.services:
        by_port.setdefault(s.port, []).append(s.name)
    for s in ctx.services:
        name, port, host = s.name, s.port, s.host
        others = [n for n in by_port[port] if n != name]
        if others:
            out.append(CheckResult("ports", FAIL, f"port {port} also used by service(s) {others} of this bundle",
                                   "give each service its own port", name))
            continue
        err = port_free(host, port)
        if err is None:
            out.append(CheckResult("ports", PASS, f"{host}:{port} free", subject=name))
        elif err.errno == errno.EADDRINUSE:
            owner = ctx.owned_ports.get(port)
            if owner == name:
                out.append(CheckResult("ports", WARN, f"{host}:{port} in use by llm@{name}, which this install "
                                       "restarts on the new version", "none needed; the port is taken over",
                                       name))
            elif owner:
                out.append(CheckResult("ports", FAIL, f"{host}:{port} in use by another instance llm@{owner}",
                                       f"change services[{name}].port or uninstall llm@{owner}", name))
            else:
                out.append(CheckResult("ports", FAIL, f"{host}:{port} in use by another program",
                                       f"`ss -ltnp 'sport = :{port}'` shows who holds it: stop it or change "
                                       f"services[{name}].port", name))
        else:
            out.append(CheckResult("ports", FAIL, f"cannot bind {host}:{port}: {err.strerror or err}",
                                   "use an address of this server (or 0.0.0.0) in services[].host", name))
    return out


def check_api_keys(ctx: _Context) -> list[CheckResult]:
    """API key files must be in place and usable before anything starts; a service that listens beyond
    loopback without one is a WARN (anyone who reaches the address can use the API)."""
    from installer import service as systemd

    out = []
    credentials = systemd.uses_credentials(ctx.root)
    how = ("systemd reads it as root (LoadCredential=)" if credentials
           else f"the service user {systemd.USER} reads it (this systemd has no LoadCredential=)")
    for s in ctx.services:
        if s.api_key_file is None:
            if not records.is_loopback(s.host):
                out.append(CheckResult("api-keys", WARN, f"listens on {s.host}:{s.port} without api_key_file: "
                                       "anyone who can reach this address can use the API",
                                       "set api_key_file: in the manifest (a file on this server), or host: "
                                       "127.0.0.1", s.name))
            else:
                out.append(CheckResult("api-keys", PASS, f"no API key; listens on loopback {s.host} only",
                                       subject=s.name))
            continue
        problems = systemd.check_api_key_file(ctx.root, s.api_key_file, via_credential=credentials)
        if not problems:
            out.append(CheckResult("api-keys", PASS, f"{s.api_key_file} in place; {how}", subject=s.name))
        elif not ctx.live:  # a staging tree: the key is put on the server that boots it
            out.append(CheckResult("api-keys", WARN, f"staging root {ctx.root}: " + "; ".join(problems),
                                   "put the key file in place on the server before starting the service "
                                   f"({systemd.key_install_command(s.api_key_file, via_credential=credentials)})",
                                   s.name))
        else:
            out.append(CheckResult("api-keys", FAIL, "; ".join(problems),
                                   f"{systemd.key_install_command(s.api_key_file, via_credential=credentials)} "
                                   "(a file with the key on its first line), then run the install again",
                                   s.name))
    return out


def check_systemd(ctx: _Context) -> list[CheckResult]:
    if not ctx.live:
        unit_dir = ctx.root / "etc/systemd/system"
        ok = any((ctx.root / p).exists() for p in ("usr/bin/systemctl", "bin/systemctl")) or unit_dir.is_dir()
        if ok:
            return [CheckResult("systemd", PASS, f"staging root {ctx.root} has systemd (not booted)",
                                subject="host")]
        return [CheckResult("systemd", WARN, f"staging root {ctx.root} has no systemd; units are written to "
                            f"{unit_dir} anyway", "install systemd in the image that boots this tree",
                            "host")]
    booted = Path("/run/systemd/system").is_dir()
    systemctl = shutil.which("systemctl")
    if booted and systemctl:
        return [CheckResult("systemd", PASS, f"systemd is PID 1 ({systemctl})", subject="host")]
    try:
        pid1 = Path("/proc/1/comm").read_text().strip()
    except OSError:
        pid1 = "?"
    what = "not booted with systemd" if not booted else "systemctl is not on PATH"
    return [CheckResult("systemd", FAIL, f"{what} (PID 1 is {pid1})",
                        "run on a systemd server, or use --root DIR to stage the install, or --skip-check "
                        "systemd and start vLLM yourself", "host")]
