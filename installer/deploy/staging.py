"""Staging a bundle's parts under ``/var/lib/llm/staging`` (:class:`Staging`, a part of
:class:`~installer.deploy.placement.Installer`): environments extracted while their archive is hashed and
conda-unpacked for their final path, model files copied and hashed in one pass (a re-run copies only what
is not verified yet), HF cache views and the bootstrap copy; and whether what is in place still matches.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from installer import fsutil
from installer.bundle import MANIFEST_NAME, Bundle, check_relpath, sha256_file
from installer.deploy.conda_unpack import run_conda_unpack
from installer.deploy.delta import DeltaSources, take_installed
from installer.deploy.layout import (
    ENV_MARKER,
    INSTALLERS,
    RUNTIMES,
    STAGING,
    VERIFIED_LOG,
    Say,
    Target,
    env_dir,
    files_digest,
    hf_repo_dir,
    model_dir,
    model_version,
    read_verified,
    staged,
    verified_here,
)
from installer.deploy.medium import all_mounted, first_volume, name_damaged_piece, source_of
from installer.errors import InstallError, IntegrityError
from installer.sizes import human_size
from installer.unpack import CopyCancelled, copy_verified, extract_archive
from installer.unpack.frames import Frame, extract_frames


class Staging:
    """Preparing and verifying parts in the staging tree; mixed into
    :class:`~installer.deploy.placement.Installer` (which provides ``in_use`` and the state)."""

    t: Target
    state: dict
    say: Say
    doing: str | None
    bytes_read: int  # of the bundle's artifacts, by this run (each read once; what a re-run kept is not read)
    delta: DeltaSources  # where a delta bundle's provided files are on this server
    reused: dict[str, int]  # provided model files taken from installed copies: {"hardlink"|"reflink"|"copy": n}
    reused_bytes: int

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
        src = source_of(bundle, art)
        try:
            frames = [Frame(int(x["offset"]), int(x["size"]), str(x["sha256"])) for x in env.get("frames") or []]
            try:
                if frames:  # independent zstd frames, each hashed: decoded on every core
                    # (in order, in this process, when its volumes are not all mounted: asked for in turn)
                    res = extract_frames(src, partial, frames, expected_size=art.size, display_name=art.path,
                                         workers=None if all_mounted(src) else 1)
                else:
                    res = extract_archive(
                        src,
                        partial,
                        expected_sha256=art.sha256,
                        expected_size=art.size,
                        display_name=art.path,
                        workers=workers,
                    )
            except IntegrityError as e:
                raise name_damaged_piece(bundle, src, e, *getattr(e, "byte_range", (0, None))) from None
            self.bytes_read += res.size
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
        done = read_verified(log)
        todo = [(f, a) for f, a in arts if not verified_here(final, f, done)]
        if not todo:
            self.say(f"model {model['name']}: verified by an earlier run (reused)")
            return
        if len(todo) < len(arts):
            self.say(f"model {model['name']}: {len(arts) - len(todo)} of {len(arts)} files verified by an "
                     "earlier run (kept)")
        total = sum(a.size for _, a in todo if not a.provided)
        mine = [a for _, a in todo if a.provided]
        if mine:
            self.say(f"model {model['name']}: {len(mine)} files ({human_size(sum(a.size for a in mine))}) from the "
                     "copies installed here (delta bundle): linked and hashed")
        if len(todo) > len(mine):
            self.say(f"model {model['name']}: verifying and copying {len(todo) - len(mine)} files "
                     f"({human_size(total)})")
        self.doing = f"copying model {model['name']} into {final}"
        for f, _ in todo:
            (final / f["path"]).parent.mkdir(parents=True, exist_ok=True)
        stop = threading.Event()
        lock = threading.Lock()

        def verified(f: Mapping, a, dst: Path) -> None:  # synced, then logged: a re-run skips it
            fsutil.fsync_file(dst)
            with lock, open(log, "a", encoding="utf-8") as lf:
                lf.write(f"{a.sha256} {a.size} {f['path']}\n")
                lf.flush()
                os.fsync(lf.fileno())

        def one(f: Mapping, a) -> None:
            if stop.is_set():
                return
            dst = final / f["path"]
            if a.provided:  # a delta leaves it to this server: an installed copy, linked and hashed here
                try:
                    how, n = take_installed(self.delta.candidates(a), dst, a)
                except BaseException:
                    stop.set()
                    raise
                with lock:
                    self.reused[how] = self.reused.get(how, 0) + 1
                    self.reused_bytes += n
                verified(f, a, dst)
                return
            src = source_of(bundle, a)
            try:
                try:
                    n = copy_verified(src, dst, expected_sha256=a.sha256, expected_size=a.size,
                                      display_name=a.path, stop=stop)
                except IntegrityError as e:
                    raise name_damaged_piece(bundle, src, e) from None
            except CopyCancelled:
                return  # another file failed: its error is the one reported
            except BaseException:
                stop.set()  # in the worker itself: no other file starts after this one failed
                raise
            with lock:
                self.bytes_read += n
            verified(f, a, dst)
            fsutil.crash_point(f"verified {dst}")

        # split volumes: the files whose volumes are all mounted now in parallel; then the others one by one,
        # in volume order, in this thread (each volume asked for, or named in the error, when it is needed)
        now = [(f, a) for f, a in todo if a.provided or all_mounted(source_of(bundle, a))]
        later = sorted((fa for fa in todo if fa not in now), key=lambda fa: first_volume(bundle, fa[1]))
        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            jobs = [pool.submit(one, f, a) for f, a in sorted(now, key=lambda fa: -fa[1].size)]
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
        for f, a in later:
            one(f, a)
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
        if runtime and bundle.artifact(runtime["artifact"]).provided:  # a delta: the runtime kept here
            tgt = f"{RUNTIMES}/{bundle.artifact(runtime['artifact']).sha256[:16]}"
            if not (self.in_use(tgt) and self.t.host(tgt).is_dir()):
                raise InstallError(f"this delta bundle needs the installer runtime {tgt}, which is not installed",
                                   hint="install the full bundle (`pack build` without --against)")
            out.append((RUNTIMES, tgt))
        elif runtime and (bootstrap / "runtime").is_dir():
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
                # install.sh's own verified copy (the medium may be gone by now), hashed again here
                own = bootstrap / "install.sh"
                src = own if own.is_file() and not own.is_symlink() else source_of(bundle, sh)
                copy_verified(src, d / "install.sh", expected_sha256=sh.sha256,
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


def model_intact(d: Path, files: list) -> bool:
    """Every file present with its size (a cheap look, for plans; reuse needs :meth:`Installer.model_placed`)."""
    return d.is_dir() and _sizes_ok(d, files)
