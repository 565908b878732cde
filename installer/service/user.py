"""The ``llm`` service user: created through sysusers.d (or useradd), removed only when nothing it owns is left."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from installer.errors import InstallError
from installer.fsutil import write_atomic
from installer.service.paths import GROUP, SYSUSERS_CONF, USER, log


def _passwd_entry(root: Path, name: str) -> list[str] | None:
    if Path(root) == Path("/"):
        try:
            p = pwd.getpwnam(name)
        except KeyError:
            return None
        return [p.pw_name, "x", str(p.pw_uid), str(p.pw_gid)]
    try:
        text = (Path(root) / "etc/passwd").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        fields = line.split(":")
        if fields and fields[0] == name:
            return fields
    return None


def _group_id(root: Path, name: str) -> int | None:
    if Path(root) == Path("/"):
        import grp

        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None
    try:
        text = (Path(root) / "etc/group").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    return None


def _llm_ids(root: Path) -> tuple[int | None, int | None]:
    entry = _passwd_entry(root, USER)
    if not entry or len(entry) < 4:
        return None, None
    return int(entry[2]), int(entry[3])


def sysusers_text(root: Path) -> str:
    return (
        "# Written by the llm-pack installer: the unprivileged user of llm@.service.\n"
        f'u {USER} - "LLM inference server (llm-pack)" /nonexistent {_nologin(root)}\n'
    )


def _nologin(root: Path) -> str:
    for rel in ("usr/sbin/nologin", "sbin/nologin"):
        if (Path(root) / rel).exists():
            return "/" + rel
    return "/bin/false"


def ensure_user(root: Path) -> bool:
    """Make sure the system user and group ``llm`` exist; True if this call created them.

    Writes ``/etc/sysusers.d/llm.conf`` (so an image made from a staging tree gets the user at boot too),
    then creates the user with ``systemd-sysusers`` or, failing that, ``useradd --system`` / ``adduser
    --system``. In a staging tree the user is added to its ``/etc/passwd`` (``--root``) when it has one.
    """
    root = Path(root)
    conf = write_atomic(root / SYSUSERS_CONF, sysusers_text(root))
    if _passwd_entry(root, USER) is not None:
        return False
    live = root == Path("/")
    if not live and not (root / "etc/passwd").exists():
        log.info("%s has no etc/passwd: user %s is created at boot from %s", root, USER, SYSUSERS_CONF)
        return False
    nologin = _nologin(root)
    root_opt = [] if live else [f"--root={root}"]
    attempts = [
        ["systemd-sysusers", *root_opt, str(conf)],
        [
            "useradd",
            *([] if live else ["--prefix", str(root)]),
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            nologin,
            "--comment",
            "LLM inference server (llm-pack)",
            USER,
        ],
    ]
    if live:
        attempts.append(
            [
                "adduser",
                "--system",
                "--group",
                "--no-create-home",
                "--home",
                "/nonexistent",
                "--shell",
                nologin,
                USER,
            ]
        )
    errors = []
    for cmd in attempts:
        if shutil.which(cmd[0]) is None:
            errors.append(f"{cmd[0]}: not found")
            continue
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode == 0 and _passwd_entry(root, USER) is not None:
            log.info("created system user %s with %s", USER, cmd[0])
            return True
        errors.append(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    raise InstallError(
        f"could not create the system user {USER!r}:\n  " + "\n  ".join(errors),
        hint=f"create it by hand: useradd --system --user-group --no-create-home --shell {nologin} {USER}",
    )


# Where files owned by the service user or group can be: its state, caches, the operator's key files.
SERVICE_ID_DIRS = ("etc/llm", "var/cache/llm", "var/lib/llm", "opt/llm", "run/llm")


def files_owned_by_service_ids(root: Path, extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Files under ``root`` owned by the ``llm`` user or group (target paths, sorted).

    Looks in :data:`SERVICE_ID_DIRS` and at the ``extra`` target paths (e.g. every ``api_key_file`` of the
    installed services, which may live anywhere). A removed user or group whose numeric id is still on
    a file hands that file to whoever gets the id next.
    """
    root = Path(root)
    entry = _passwd_entry(root, USER)
    uid = int(entry[2]) if entry and len(entry) >= 4 and entry[2].isdigit() else None
    gid = _group_id(root, GROUP)
    if uid is None and gid is None:
        return []
    found: set[Path] = set()

    def look(p: Path) -> None:
        try:
            st = p.lstat()
        except OSError:
            return
        if st.st_uid == uid or st.st_gid == gid:
            found.add(Path("/") / p.relative_to(root))

    for d in SERVICE_ID_DIRS:
        top = root / d
        if not top.exists():
            continue
        look(top)
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames + filenames:
                look(Path(dirpath, n))
    for e in extra:
        look(root / str(e).lstrip("/"))
    return sorted(found)


def user_removal_decision(root: Path, extra: Iterable[str | os.PathLike[str]] = ()) -> tuple[bool, str]:
    """``(remove, why)``: the ``llm`` user and group may go only when no file references their ids."""
    owned = files_owned_by_service_ids(root, extra)
    if not owned:
        return True, f"no file is owned by user {USER} or group {GROUP}"
    shown = ", ".join(str(p) for p in owned[:5]) + (" ..." if len(owned) > 5 else "")
    return False, (f"kept user {USER} and group {GROUP}: {len(owned)} file(s) still owned by them ({shown}); "
                   f"a later user or group with the same id would own them. Remove or chown those files, "
                   f"then run: userdel {USER}")


def remove_user(root: Path, *, referenced: Iterable[str | os.PathLike[str]] = ()) -> bool:
    """Remove the ``llm`` user and its sysusers.d entry (only call it if :func:`ensure_user` created it).

    The user and group are kept (and the sysusers.d entry with them) while a file is still owned by them
    (:func:`user_removal_decision`; ``referenced`` adds target paths to look at, e.g. API key files):
    returns False then and logs why.
    """
    root = Path(root)
    if _passwd_entry(root, USER) is None:
        (root / SYSUSERS_CONF).unlink(missing_ok=True)
        return False
    remove, why = user_removal_decision(root, referenced)
    if not remove:
        log.warning("%s", why)
        return False
    (root / SYSUSERS_CONF).unlink(missing_ok=True)
    cmd = ["userdel", *([] if root == Path("/") else ["--prefix", str(root)]), USER]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise InstallError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return True
