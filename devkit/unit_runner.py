"""Run an installed ``llm@<name>`` instance the way its systemd unit says, on a machine without systemd.

For servers (or lent GPU machines) that have no systemd as PID 1: reads the installed template unit and the
instance's drop-ins, and runs ``ExecStartPre=``/``ExecStart=`` as the unit's ``User=``/``Group=`` with only the
variables of its ``EnvironmentFile=``/``Environment=`` (like systemd: nothing inherited), in its
``WorkingDirectory=`` with its ``UMask=`` and ``LimitNOFILE=`` (capped at the hard limit), after creating its
``CacheDirectory=`` owned by the user. It restarts the service like ``Restart=always`` with ``RestartSec=``,
except for an exit status in ``RestartPreventExitStatus=``, and logs each start and exit with a timestamp.

The hardening options (namespaces, seccomp, device policy) are systemd's and are not applied here.

    python3 -m devkit.unit_runner llm@tiny-gpu [--root /] [--max-starts N]
"""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

UNIT_DIR = "etc/systemd/system"
MULTI_KEYS = {"Environment", "EnvironmentFile", "ExecStartPre", "DeviceAllow", "RestartPreventExitStatus"}


def read_unit(root: Path, unit: str) -> dict[str, list[str]]:
    """[Service] settings of ``unit`` (``llm@name`` or ``llm@name.service``): template, then drop-ins in order."""
    unit = unit if unit.endswith(".service") else unit + ".service"
    prefix, _, rest = unit.partition("@")
    instance = rest.removesuffix(".service")
    template = root / UNIT_DIR / f"{prefix}@.service"
    files = [template] + sorted((root / UNIT_DIR / f"{unit}.d").glob("*.conf"))
    settings: dict[str, list[str]] = {}
    for f in files:
        if not f.is_file():
            if f == template:
                raise SystemExit(f"unit_runner: {template} is not installed")
            continue
        section = None
        for raw in f.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            if section != "Service" or "=" not in line:
                continue
            key, value = (x.strip() for x in line.split("=", 1))
            value = value.replace("%i", instance).replace("%C", "/var/cache").replace("%%", "%")
            if key in MULTI_KEYS:
                settings.setdefault(key, [])
                if value == "":
                    settings[key] = []  # an empty assignment resets the list, as in systemd
                else:
                    settings[key].append(value)
            else:
                settings[key] = [value]
    return settings


def environment(root: Path, settings: dict[str, list[str]]) -> dict[str, str]:
    from installer.service import parse_env_file

    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}  # systemd's default
    for item in settings.get("Environment", []):
        for pair in item.split():
            k, _, v = pair.partition("=")
            env[k] = v.strip('"')
    for path in settings.get("EnvironmentFile", []):
        optional = path.startswith("-")
        p = root / path.lstrip("-").lstrip("/")
        if not p.is_file():
            if optional:
                continue
            raise SystemExit(f"unit_runner: EnvironmentFile {p} is missing")
        env.update(parse_env_file(p.read_text()))
    return env


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} unit_runner: {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m devkit.unit_runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("unit")
    ap.add_argument("--root", type=Path, default=Path("/"))
    ap.add_argument("--max-starts", type=int, default=10, help="give up after this many starts (StartLimitBurst)")
    a = ap.parse_args(argv)
    s = read_unit(a.root, a.unit)
    first = lambda k, d=None: (s.get(k) or [d])[-1]  # noqa: E731
    user = pwd.getpwnam(first("User", "root"))
    group = first("Group")
    gid = user.pw_gid if group is None else __import__("grp").getgrnam(group).gr_gid
    env = environment(a.root, s)
    cache = first("CacheDirectory")
    if cache:
        d = Path("/var/cache") / cache
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(d, user.pw_uid, gid)
        env.setdefault("CACHE_DIRECTORY", str(d))
    cwd = first("WorkingDirectory", "/")
    umask = int(first("UMask", "0022"), 8)
    prevent = {int(x) for v in s.get("RestartPreventExitStatus", []) for x in v.split()}
    restart_sec = float(first("RestartSec", "0.1"))
    exec_start = first("ExecStart")
    if not exec_start:
        raise SystemExit("unit_runner: the unit has no ExecStart=")

    nofile = first("LimitNOFILE")

    def as_user() -> None:
        os.setsid()
        if nofile:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = int(nofile.split(":")[0])
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(user.pw_uid)
        os.umask(umask)

    child: subprocess.Popen | None = None

    def stop(signum, _frame) -> None:
        log(f"signal {signum}: stopping")
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pre in s.get("ExecStartPre", []):
        ignore, privileged = "-" in pre[:2], "+" in pre[:2]
        cmd = pre.lstrip("-+").split()
        r = subprocess.run(cmd, env=env, cwd=cwd, preexec_fn=None if privileged else as_user, check=False)
        log(f"ExecStartPre {' '.join(cmd)}: exit {r.returncode}")
        if r.returncode and not ignore:
            return r.returncode
    for n in range(1, a.max_starts + 1):
        t0 = time.monotonic()
        child = subprocess.Popen(exec_start.split(), env=env, cwd=cwd, preexec_fn=as_user)
        log(f"start {n}: {exec_start} as {user.pw_name}, pid {child.pid}")
        rc = child.wait()
        log(f"main process exited, status {rc} after {time.monotonic() - t0:.1f} s")
        if rc in prevent:
            log(f"status {rc} is in RestartPreventExitStatus=: not restarting")
            return rc
        time.sleep(restart_sec)
    log(f"start limit ({a.max_starts}) reached")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
