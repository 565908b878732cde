"""Placing a bundle's parts on the target and remembering who owns them (:class:`Installer`).

All-or-nothing: every environment, model directory, HF cache view and bootstrap copy is prepared under the
staging tree ``/var/lib/llm/staging`` (same layout as ``/opt/llm``, outside ``/opt/llm`` and ``/etc``) and
verified there: model files are copied and hashed in one pass, environments extracted while their archive
is hashed and conda-unpacked for their final path. Only when everything is staged and synced are the new
directories renamed into ``/opt/llm`` (a journal, ``staging/journal.json``, lists each step so that a crash
before the state commit is undone by the next run: :meth:`Installer.recover`). A refused install undoes the
same steps at once and keeps the staging tree as a resumable cache (named in the error; ``--clean`` removes
it): a re-run reuses what was verified. Directories that a committed version uses are never deleted: a
damaged one is replaced by ``renameat2(RENAME_EXCHANGE)`` with a verified copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from installer import fsutil
from installer.bundle import MANIFEST_NAME, overrides
from installer.deploy import state as st
from installer.deploy.delta import DeltaSources
from installer.deploy.journal import Journal
from installer.deploy.layout import (
    BUNDLE_RECORDS,
    ENVS,
    INSTALLERS,
    LINES,
    MODELS,
    RUNTIMES,
    Say,
    Target,
    staged,
)
from installer.deploy.staging import Staging
from installer.errors import InstallError, LlmPackError


class Installer(Journal, Staging):
    """One run of the installer against ``root`` (holds the state while the lock is held)."""

    def __init__(self, root: Path, say: Say = print) -> None:
        self.t = Target(Path(root))
        self.say = say
        self.state = st.load_state(self.t.root)
        self.txn: dict | None = None
        self.doing: str | None = None  # what the install is doing (named in an error from the OS)
        self.bytes_read = 0  # of the bundle, by this run (Staging)
        self.delta = DeltaSources()  # a delta bundle's provided artifacts on this server (install sets it)
        self.reused: dict[str, int] = {}
        self.reused_bytes = 0
        self.reconciled: list[str] = []  # lines whose state was one step behind their switch link
        self.reconcile()

    # ------------------------------------------------------------------ bookkeeping
    def save(self) -> None:
        st.save_state(self.t.root, self.state)

    def mkdir(self, target: str) -> Path:
        """mkdir -p, recording every directory this creates (uninstall removes them again if empty)."""
        missing = []
        p = self.t.host(target)
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            rel = "/" + d.relative_to(self.t.root).as_posix()
            if self.txn is not None:
                self._journal("dir", rel)  # before it exists: a crash right after mkdir is undone too
            d.mkdir(mode=0o755)
            if rel not in self.state["dirs"]:
                self.state["dirs"].append(rel)
        return self.t.host(target)

    def own(self, target: str, kind: str, user: str, **extra: object) -> None:
        obj = self.state["objects"].setdefault(target, {"kind": kind, "users": []})
        obj.update(extra)
        if user not in obj["users"]:
            obj["users"].append(user)

    def use(self, target: str, user: str) -> None:
        """Add ``user`` to an object the installer created (pre-existing things are never taken over)."""
        obj = self.state["objects"].get(target)
        if obj is not None and user not in obj["users"]:
            obj["users"].append(user)

    def release(self, user: str) -> list[str]:
        """Drop ``user`` from every object; delete the objects nobody uses any more. Returns those deleted."""
        gone = []
        for target, obj in sorted(self.state["objects"].items(), key=lambda kv: -len(kv[0])):
            if user in obj["users"]:
                obj["users"].remove(user)
            if not obj["users"]:
                fsutil.remove_path(self.t.host(target))
                del self.state["objects"][target]
                gone.append(target)
        self.prune_dirs()
        return gone

    def prune_dirs(self) -> None:
        for d in sorted(self.state["dirs"], key=len, reverse=True):
            p = self.t.host(d)
            if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
            if not p.exists():
                self.state["dirs"].remove(d)

    def in_use(self, target: str) -> bool:
        return bool((self.state["objects"].get(target) or {}).get("users"))

    def reconcile(self) -> None:
        """``lines[name].active`` follows the switch link ``/etc/llm/lines/<name>`` (a crash between the
        switch and the state write leaves the link one step ahead; the link is what the units use)."""
        d = self.t.host(LINES)
        names = set(self.state["lines"]) | ({p.name for p in d.iterdir() if p.is_symlink()} if d.is_dir() else set())
        for name in sorted(names):
            link = d / name
            if not link.is_symlink():
                continue
            bid = Path(os.readlink(link)).name
            rec = self.state["bundles"].get(bid)
            line = self.state["lines"].get(name) or {}
            if bid != line.get("active") and rec and rec.get("status") == "installed" and rec.get("name") == name:
                line = self.state["lines"].setdefault(
                    name, {"active": None, "previous": None, "instances": [], "unit_files": []}
                )
                if line.get("active") and line.get("active") != bid:
                    line["previous"] = line["active"]
                line["active"] = bid
                line["instances"] = list(rec.get("services") or [])
                for f in rec.get("unit_files") or []:
                    if f not in line["unit_files"]:
                        line["unit_files"].append(f)
                self.reconciled.append(name)

    def clean_partials(self) -> None:
        """Remove partial dirs an interrupted install left (never a complete directory)."""
        for base in (ENVS, MODELS, RUNTIMES, INSTALLERS, staged(ENVS), staged(MODELS)):
            top = self.t.host(base)
            if not top.is_dir():
                continue
            for d in list(top.glob(".*.partial-*")) + list(top.glob("*/.*.partial-*")):
                self.say(f"removing {d.name} left by an interrupted install")
                shutil.rmtree(d, ignore_errors=True)

    def stored_manifest(self, bid: str) -> dict:
        p = self.t.host(f"{BUNDLE_RECORDS}/{bid}/{MANIFEST_NAME}")
        try:
            m = json.loads(p.read_bytes())
        except (OSError, ValueError) as e:
            raise InstallError(
                f"the record of installed bundle {bid} is missing or damaged ({p}: {e})"
            ) from e
        ov = p.with_name(overrides.OVERRIDES_NAME)
        if ov.is_file():  # the per-server service fields this version was installed with
            try:
                m, _ = overrides.apply(m, overrides.parse(ov.read_bytes(), source=str(ov)), source=str(ov))
            except (OSError, LlmPackError) as e:
                raise InstallError(f"the record of installed bundle {bid} is damaged ({ov}: {e})") from e
        return m

    def line_of(self, name: str | None) -> tuple[str, dict]:
        lines = self.state["lines"]
        if name is None:
            if len(lines) == 1:
                name = next(iter(lines))
            elif not lines:
                raise InstallError("nothing is installed here", hint="install a bundle with install.sh first")
            else:
                raise InstallError(
                    f"several bundles are installed ({', '.join(sorted(lines))})",
                    hint="say which one with --name NAME",
                )
        if name not in lines:
            raise InstallError(
                f"no bundle named {name!r} is installed",
                hint=f"installed: {', '.join(sorted(lines)) or 'none'}",
            )
        return name, lines[name]


__all__ = ["Installer"]
