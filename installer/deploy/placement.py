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

import contextlib
import errno
import json
import os
import posixpath
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from installer import fsutil
from installer.bundle import MANIFEST_NAME, Bundle, check_relpath, sha256_file
from installer.deploy import state as st
from installer.deploy.layout import (
    BUNDLE_RECORDS,
    ENV_MARKER,
    ENVS,
    INSTALL_DIR,
    INSTALLERS,
    JOURNAL,
    LINES,
    MODELS,
    RUNTIMES,
    STAGING,
    Say,
    Target,
    env_dir,
    files_digest,
    hf_repo_dir,
    model_dir,
    model_version,
    staged,
)
from installer.errors import InstallError
from installer.sizes import human_size
from installer.unpack import CopyCancelled, copy_verified, extract_archive

VERIFIED_LOG = ".llm-verified"  # in a staged model dir: "sha256 size path" per verified, synced file


class Installer:
    """One run of the installer against ``root`` (holds the state while the lock is held)."""

    def __init__(self, root: Path, say: Say = print) -> None:
        self.t = Target(Path(root))
        self.say = say
        self.state = st.load_state(self.t.root)
        self.txn: dict | None = None
        self.doing: str | None = None  # what the install is doing (named in an error from the OS)
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
                remove_path(self.t.host(target))
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
            return json.loads(p.read_bytes())
        except (OSError, ValueError) as e:
            raise InstallError(
                f"the record of installed bundle {bid} is missing or damaged ({p}: {e})"
            ) from e

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

    # ------------------------------------------------------------------ the journal (undo log until commit)
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
                        remove_path(self.t.host(args[0]))
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

    # ------------------------------------------------------------------ environments
    def env_placed(self, target: str, env: Mapping) -> bool:
        """Installed and committed, and its marker names the same content (an ``existing`` environment: its
        python is there; the preflight checked that it imports vLLM)."""
        if env.get("existing"):
            return os.access(self.t.host(target) / "bin" / "python", os.X_OK)
        return self.in_use(target) and _marker_ok(self.t.host(target), env)

    def env_complete(self, target: str) -> bool:
        return (self.t.host(target) / ENV_MARKER).is_file()

    def stage_env(self, bundle: Bundle, env: Mapping, workers: int, *, test_compiler: bool = True) -> None:
        """Extract (hashing the archive), conda-unpack for the final path, build a shared object with the C
        compiler it carries (``test_compiler``), mark complete, in the staging tree."""
        target = env_dir(env)
        final = self.t.host(staged(target))
        if _marker_ok(final, env):
            self.say(f"environment {env['name']}: verified and unpacked by an earlier run (reused)")
            return
        if final.exists():
            shutil.rmtree(final)
        art = bundle.artifact(str(env["artifact"]))
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        self.say(f"environment {env['name']}: verifying and unpacking {art.path} ({human_size(art.size)})")
        self.doing = f"unpacking {art.path} into {final.parent}"
        try:
            res = extract_archive(
                bundle.path_of(art),
                partial,
                expected_sha256=art.sha256,
                expected_size=art.size,
                display_name=art.path,
                workers=workers,
            )
            os.chmod(partial, 0o755)
            self.say(
                f"environment {env['name']}: {res.members} files in {res.seconds:.1f} s; running conda-unpack"
            )
            run_conda_unpack(partial, target)
            if env.get("compiler") and test_compiler:
                self._test_compiler(env, partial, target)
            marker = {
                "environment": env["name"],
                "content_hash": env["content_hash"],
                "artifact_sha256": art.sha256,
            }
            fsutil.sync_fs(partial)
            fsutil.write_atomic(partial / ENV_MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
            fsutil.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def _test_compiler(self, env: Mapping, prefix: Path, target: str) -> None:
        """The preflight cannot run the carried compiler before the unpack: it is run here, once."""
        from installer.preflight.toolchain import carried_compile_test

        bad = carried_compile_test(prefix, str(env["compiler"]), env.get("python"))
        if bad:
            raise InstallError(
                f"environment {env['name']}: its C compiler {target}/{env['compiler']} does not work on this "
                f"server: {bad}",
                hint="vLLM compiles Triton's launcher with it at every GPU start; rebuild the bundle for this "
                "server (target.glibc), or give the services a compiler this server has (services[].env.CC) "
                "and install with --skip-check compiler")
        self.say(f"environment {env['name']}: its C compiler {env['compiler']} builds a shared object against "
                 "its Python.h")

    # ------------------------------------------------------------------ models
    def model_placed(self, target: str, model: Mapping) -> bool:
        """Committed with the digest of this file list (or a re-hash confirms it), every file its size."""
        obj = self.state["objects"].get(target) or {}
        files = list(model.get("files") or [])
        d = self.t.host(target)
        if not obj.get("users") or not d.is_dir() or not _sizes_ok(d, files):
            return False
        digest = files_digest(files)
        if obj.get("digest") == digest:
            return True
        if obj.get("digest") is None:  # recorded by an older installer: re-hash once, then remember
            for f in files:
                if sha256_file(d / f["path"])[0] != f["sha256"]:
                    return False
            obj["digest"] = digest
            return True
        return False

    def stage_model(self, bundle: Bundle, model: Mapping, workers: int) -> None:
        """Copy and hash every file into the staging tree; the first bad file stops the others (fail fast).

        Each verified file is synced and logged (``.llm-verified``): a re-run copies only the rest.
        """
        target = model_dir(model)
        final = self.t.host(staged(target))
        files = list(model.get("files") or [])
        src_dir = str(model.get("dir") or f"models/{model['name']}")
        arts = [(f, bundle.artifact(f"{src_dir}/{check_relpath(f['path'], what='model file')}")) for f in files]
        final.mkdir(parents=True, exist_ok=True)
        log = final / VERIFIED_LOG
        done = _read_verified(log)
        todo = [(f, a) for f, a in arts if not _verified_here(final, f, done)]
        if not todo:
            self.say(f"model {model['name']}: verified by an earlier run (reused)")
            return
        if len(todo) < len(arts):
            self.say(f"model {model['name']}: {len(arts) - len(todo)} of {len(arts)} files verified by an "
                     "earlier run (kept)")
        total = sum(a.size for _, a in todo)
        self.say(f"model {model['name']}: verifying and copying {len(todo)} files ({human_size(total)})")
        self.doing = f"copying model {model['name']} into {final}"
        for f, _ in todo:
            (final / f["path"]).parent.mkdir(parents=True, exist_ok=True)
        stop = threading.Event()
        lock = threading.Lock()

        def one(f: Mapping, a) -> None:
            if stop.is_set():
                return
            dst = final / f["path"]
            try:
                copy_verified(bundle.path_of(a), dst, expected_sha256=a.sha256, expected_size=a.size,
                              display_name=a.path, stop=stop)
            except CopyCancelled:
                return  # another file failed: its error is the one reported
            except BaseException:
                stop.set()  # in the worker itself: no other file starts after this one failed
                raise
            fsutil.fsync_file(dst)
            with lock, open(log, "a", encoding="utf-8") as lf:
                lf.write(f"{a.sha256} {a.size} {f['path']}\n")
                lf.flush()
                os.fsync(lf.fileno())
            fsutil.crash_point(f"verified {dst}")

        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            jobs = [pool.submit(one, f, a) for f, a in sorted(todo, key=lambda fa: -fa[1].size)]
            finished, _ = wait(jobs, return_when=FIRST_EXCEPTION)
            for j in finished:
                if j.exception() is not None:
                    stop.set()
                    raise j.exception()  # type: ignore[misc]
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        for d in [final, *(p for p in final.rglob("*") if p.is_dir())]:
            os.chmod(d, 0o755)

    def finish_staged_model(self, model: Mapping) -> None:
        """Drop the verified-files log before the directory goes into place (vLLM gets only model files)."""
        (self.t.host(staged(model_dir(model))) / VERIFIED_LOG).unlink(missing_ok=True)

    def stage_hf_view(self, model: Mapping, mdir: str, bid: str) -> str:
        """``models--org--name/snapshots/<sha>/<file>`` (relative links to the real files) and ``refs/main``,
        in this bundle's own HF cache: nothing is shared with another bundle. Returns the repo dir."""
        repo = model.get("repo") or model["name"]
        rdir = hf_repo_dir(bid, repo)
        ver = model_version(model)
        snap = f"{rdir}/snapshots/{ver}"
        host_snap = self.t.host(staged(snap))
        if host_snap.exists():
            shutil.rmtree(host_snap)
        host_snap.mkdir(parents=True)
        for f in model.get("files") or []:
            link = host_snap / f["path"]
            link.parent.mkdir(parents=True, exist_ok=True)
            rel = posixpath.relpath(f"{mdir}/{f['path']}", posixpath.dirname(f"{snap}/{f['path']}"))
            os.symlink(rel, link)
        refs = self.t.host(staged(f"{rdir}/refs"))
        refs.mkdir(parents=True, exist_ok=True)
        (refs / "main").write_text(ver)
        return rdir

    # ------------------------------------------------------------------ bootstrap copy
    def stage_bootstrap(self, bundle: Bundle, bootstrap: Path) -> list[tuple[str, str]]:
        """Stage the verified runtime, installer and install.sh (kept so rollback/uninstall/status work
        without the bundle). install.sh is copied and hashed against its MANIFEST entry, like every other
        artifact. Returns [(base, target)] of the copies that are not in place yet or are reused."""
        m = bundle.manifest
        out = []
        runtime = m.get("runtime") or None
        if runtime and (bootstrap / "runtime").is_dir():
            tgt = f"{RUNTIMES}/{bundle.artifact(runtime['artifact']).sha256[:16]}"

            def fill_runtime(d: Path) -> None:
                shutil.copytree(bootstrap / "runtime", d, symlinks=True, dirs_exist_ok=True)

            self._stage_dir(tgt, fill_runtime)
            out.append((RUNTIMES, tgt))
        inst_art = (m.get("installer") or {}).get("artifact")
        if inst_art and (bootstrap / "installer").is_dir():
            tgt = f"{INSTALLERS}/{bundle.artifact(inst_art).sha256[:16]}"

            def fill_installer(d: Path) -> None:
                shutil.copytree(bootstrap / "installer" / "installer", d / "installer", symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
                try:
                    sh = bundle.artifact("install.sh")
                except Exception as e:
                    raise InstallError(f"{bundle.root}: install.sh is not listed in {MANIFEST_NAME}",
                                       hint="the bundle was not produced by `pack build`") from e
                copy_verified(bundle.path_of(sh), d / "install.sh", expected_sha256=sh.sha256,
                              expected_size=sh.size, display_name=sh.path, mode=0o755)

            self._stage_dir(tgt, fill_installer)
            out.append((INSTALLERS, tgt))
        return out

    def _stage_dir(self, tgt: str, fill: Callable[[Path], None]) -> None:
        if self.in_use(tgt) and self.t.host(tgt).is_dir():
            return
        final = self.t.host(staged(tgt))
        if final.is_dir():
            shutil.rmtree(final)  # cheap to redo: copied from install.sh's private, verified dir
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        try:
            fill(tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove_staging(self) -> None:
        p = self.t.host(STAGING)
        if p.is_dir():
            shutil.rmtree(p)


def _marker_ok(d: Path, env: Mapping) -> bool:
    try:
        marker = json.loads((d / ENV_MARKER).read_bytes())
    except (OSError, ValueError):
        return False
    return marker.get("content_hash") == env.get("content_hash")


def _sizes_ok(d: Path, files: list) -> bool:
    for f in files:
        p = d / f["path"]
        try:
            if p.is_symlink() or p.stat().st_size != int(f["size"]):
                return False
        except OSError:
            return False
    return True


def _read_verified(log: Path) -> set[tuple[str, int, str]]:
    out = set()
    try:
        text = log.read_text(encoding="utf-8")
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and len(parts[0]) == 64 and parts[1].isdigit():
            out.add((parts[0], int(parts[1]), parts[2]))
    return out


def _verified_here(d: Path, f: Mapping, done: set) -> bool:
    """The log says this file was copied with this hash and synced, and it is still that size."""
    if (str(f["sha256"]), int(f["size"]), str(f["path"])) not in done:
        return False
    p = d / f["path"]
    try:
        return not p.is_symlink() and p.stat().st_size == int(f["size"])
    except OSError:
        return False


def run_conda_unpack(host_prefix: Path, target_prefix: str) -> None:
    """Run the env's ``conda-unpack`` with the env's own python so the prefix baked in is ``target_prefix``.

    The env is unpacked in the staging tree and renamed to ``target_prefix`` afterwards (on a live server as
    in a staging tree under ``--root``): the script's own records and replacement function are used with that
    prefix.
    """
    script = host_prefix / "bin" / "conda-unpack"
    if not script.is_file():
        return  # packed for a fixed destination: nothing to relocate
    py = host_prefix / "bin" / "python"
    if not py.exists():
        raise InstallError(f"{host_prefix}: the environment has no bin/python to run conda-unpack with")
    # no bytecode: it would be written into the env with the staging path in it (and differ between runs)
    env = {"PATH": f"{host_prefix}/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if str(host_prefix) == target_prefix:
        cmd = [str(py), str(script)]
    else:
        code = (
            "import os, sys\n"
            "script, new_prefix, actual = sys.argv[1:4]\n"
            "sys.path.insert(0, os.path.dirname(script))\n"
            "g = {'__name__': 'conda_unpack_as_library', '__file__': script}\n"
            "exec(compile(open(script).read(), script, 'exec'), g)\n"
            "for path, placeholder, mode in g['_prefix_records']:\n"
            "    g['update_prefix'](os.path.join(actual, path), new_prefix, placeholder, mode=mode)\n"
        )
        cmd = [str(py), "-c", code, str(script), target_prefix, str(host_prefix)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=host_prefix, check=False)
    if r.returncode != 0:
        raise InstallError(
            f"conda-unpack failed in {host_prefix} (exit {r.returncode}): "
            f"{(r.stderr or r.stdout).strip()[-2000:]}",
            hint="the environment's python cannot run on this server? see the message above",
        )


def model_intact(d: Path, files: list) -> bool:
    """Every file present with its size (a cheap look, for plans; reuse needs :meth:`Installer.model_placed`)."""
    return d.is_dir() and _sizes_ok(d, files)


def remove_path(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


__all__ = ["INSTALL_DIR", "Installer", "model_intact", "remove_path", "run_conda_unpack"]
