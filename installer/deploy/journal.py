"""The install journal (:class:`Journal`, a part of :class:`~installer.deploy.placement.Installer`): until
the state commit, every change outside the staging tree (a directory made, a file written or replaced, a
staged directory renamed or exchanged into ``/opt/llm``) is listed in ``staging/journal.json`` first, so
that a refused install undoes it at once (:meth:`Journal.undo`) and a crashed one on the next run
(:meth:`Journal.recover`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from installer import fsutil
from installer.deploy import state as st
from installer.deploy.layout import JOURNAL, STAGING, Say, Target, staged
from installer.errors import InstallError


class Journal:
    """The undo log of one install run; mixed into :class:`~installer.deploy.placement.Installer` (which
    provides ``mkdir``, ``save``, ``in_use`` and the state)."""

    t: Target
    state: dict
    say: Say
    txn: dict | None
    doing: str | None

    def begin(self, bid: str) -> str:
        """Start a transaction: until :meth:`commit`, every change outside the staging tree is journaled."""
        self.txn = {"bid": bid, "token": secrets.token_hex(8), "steps": []}
        self.t.host(STAGING).mkdir(parents=True, exist_ok=True)
        self._write_journal()
        return self.txn["token"]

    def _journal(self, kind: str, *args: str) -> None:
        assert self.txn is not None
        self.txn["steps"].append([kind, *args])
        self._write_journal()

    def _write_journal(self) -> None:
        fsutil.write_atomic(self.t.host(JOURNAL), json.dumps(self.txn, indent=1) + "\n")

    def commit(self) -> None:
        """The state (already carrying the bundle record with this transaction's token) is saved: done."""
        self.save()
        self.t.host(JOURNAL).unlink(missing_ok=True)
        self.txn = None

    def recover(self) -> None:
        """Undo what a run killed before its state commit changed (read from its journal)."""
        p = self.t.host(JOURNAL)
        if not p.is_file():
            return
        try:
            txn = json.loads(p.read_bytes())
        except ValueError:
            txn = None
        rec = (self.state["bundles"].get((txn or {}).get("bid")) or {})
        if txn and rec.get("txn") != txn.get("token"):
            self.say(f"undoing what an interrupted install of {txn.get('bid')} changed before it committed")
            self._undo(txn["steps"])
            self.save() if st.state_path(self.t.root).exists() else None
        p.unlink(missing_ok=True)

    def undo(self) -> None:
        """Refused before the commit: put /opt/llm and /etc back as they were (the staging tree stays)."""
        if self.txn is None:
            return
        self._undo(self.txn["steps"])
        self.t.host(JOURNAL).unlink(missing_ok=True)
        self.txn = None

    def _undo(self, steps: list) -> None:
        dirs = sorted((s for s in steps if s[0] == "dir"), key=lambda s: -len(s[1]))
        for step in [*reversed([s for s in steps if s[0] != "dir"]), *dirs]:
            kind, args = step[0], step[1:]
            with contextlib.suppress(OSError):
                if kind == "move":  # staged -> final: move it back into the staging tree
                    src, dst = self.t.host(args[0]), self.t.host(args[1])
                    if (dst.exists() or dst.is_symlink()) and not src.exists() and args[1] not in self.state[
                        "objects"
                    ]:
                        src.parent.mkdir(parents=True, exist_ok=True)
                        os.rename(dst, src)
                elif kind == "exchange":  # a damaged in-use dir was swapped with a verified one: swap back
                    a, b = self.t.host(args[0]), self.t.host(args[1])
                    if a.exists() and b.exists():
                        fsutil.exchange(a, b)
                elif kind == "create":  # a file or tree this run created outside the staging tree
                    if args[0] not in self.state["objects"]:
                        fsutil.remove_path(self.t.host(args[0]))
                elif kind == "replace":  # a file this run replaced: its old content was kept in staging
                    backup, path = self.t.host(args[0]), self.t.host(args[1])
                    if backup.exists() or backup.is_symlink():
                        os.replace(backup, path)
                elif kind == "dir":
                    d = self.t.host(args[0])
                    if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
                        d.rmdir()
                    if args[0] in self.state["dirs"] and not d.exists():
                        self.state["dirs"].remove(args[0])
                elif kind == "user":
                    from installer import service as systemd

                    systemd.remove_user(self.t.root)

    def journal_user_created(self) -> None:
        self._journal("user")

    def place_file(self, target: str, data: str | bytes, mode: int = 0o644) -> None:
        """Write a file outside the staging tree (units, links' targets...), undoable until the commit."""
        host = self.t.host(target)
        if host.is_file() and not host.is_symlink() and host.read_bytes() == (
            data.encode() if isinstance(data, str) else data
        ) and (host.stat().st_mode & 0o7777) == mode:
            return
        self._backup_or_create(target)
        self.mkdir(str(Path(target).parent))
        fsutil.write_atomic(host, data, mode=mode)

    def place_link(self, target: str, points_to: str) -> None:
        host = self.t.host(target)
        if host.is_symlink() and os.readlink(host) == points_to:
            return
        self._backup_or_create(target)
        self.mkdir(str(Path(target).parent))
        fsutil.replace_symlink(host, points_to)

    def _backup_or_create(self, target: str) -> None:
        host = self.t.host(target)
        if host.exists() or host.is_symlink():
            backup = f"{STAGING}/backup/{secrets.token_hex(6)}-{host.name}"
            hb = self.t.host(backup)
            hb.parent.mkdir(parents=True, exist_ok=True)
            if host.is_symlink():
                os.symlink(os.readlink(host), hb)
            else:
                shutil.copy2(host, hb)
            self._journal("replace", backup, target)
        else:
            self._journal("create", target)

    # ------------------------------------------------------------------ placing (rename from staging)
    def promote(self, target: str) -> None:
        """Rename the staged ``target`` into place (a new path), or swap it with a damaged one in use."""
        src, dst = self.t.host(staged(target)), self.t.host(target)
        self.doing = f"placing {dst}"
        self.mkdir(str(Path(target).parent))
        if dst.exists() or dst.is_symlink():
            if not self.in_use(target):
                raise InstallError(
                    f"{target} exists but was not created by this installer",
                    hint="move it away (the installer never deletes what it did not create) and run again",
                )
            self._journal("exchange", staged(target), target)
            fsutil.exchange(src, dst)  # the damaged copy is now at the staged path, removed after commit
            return
        self._journal("move", staged(target), target)
        try:
            fsutil.rename(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # staging and /opt/llm on different filesystems: copy beside the final place, then rename. The
            # staged copy stays (the staging tree goes after the commit), so an undo just removes this one.
            self._journal("create", target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
            self._journal("create", "/" + tmp.relative_to(self.t.root).as_posix())
            shutil.copytree(src, tmp, symlinks=True, dirs_exist_ok=True)
            os.chmod(tmp, src.stat().st_mode & 0o7777)
            fsutil.sync_fs(tmp)
            fsutil.rename(tmp, dst)
