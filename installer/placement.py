"""Placing a bundle's parts on the target and remembering who owns them (:class:`Installer`).

Every environment and model directory is built beside its final place (``.<name>.partial-XXXX``) and
renamed when complete and verified, so an interrupted install leaves only partial directories, which the
next run removes (:meth:`Installer.clean_partials`). Every directory and object the installer creates is
recorded in the state with the bundles that use it; uninstall removes exactly those.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from installer import state as st
from installer.bundle import MANIFEST_NAME, Bundle, check_relpath
from installer.errors import InstallError
from installer.extract import copy_verified, extract_archive
from installer.layout import (
    BUNDLE_RECORDS,
    ENV_MARKER,
    ENVS,
    INSTALLERS,
    MODELS,
    RUNTIMES,
    WRAPPER,
    Say,
    Target,
    env_dir,
    hf_repo_dir,
    model_dir,
    model_version,
    wrapper_text,
)
from installer.sizes import human_size


class Installer:
    """One run of the installer against ``root`` (holds the state while the lock is held)."""

    def __init__(self, root: Path, say: Say = print) -> None:
        self.t = Target(Path(root))
        self.say = say
        self.state = st.load_state(self.t.root)

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
            d.mkdir(mode=0o755)
            rel = "/" + d.relative_to(self.t.root).as_posix()
            if rel not in self.state["dirs"]:
                self.state["dirs"].append(rel)
        return self.t.host(target)

    def own(self, target: str, kind: str, user: str) -> None:
        obj = self.state["objects"].setdefault(target, {"kind": kind, "users": []})
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

    def clean_partials(self) -> None:
        """Remove what an interrupted install left: partial dirs, envs without their completion marker."""
        for base in (ENVS, MODELS, RUNTIMES, INSTALLERS):
            top = self.t.host(base)
            if not top.is_dir():
                continue
            for d in list(top.glob(".*.partial-*")) + list(top.glob("*/.*.partial-*")):
                self.say(f"removing {d.name} left by an interrupted install")
                shutil.rmtree(d, ignore_errors=True)
        envs = self.t.host(ENVS)
        if envs.is_dir():
            for d in envs.glob("*/*"):
                if d.is_dir() and not d.name.startswith(".") and not (d / ENV_MARKER).exists():
                    self.say(f"removing incomplete environment {d} (interrupted before it was finished)")
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

    # ------------------------------------------------------------------ environments and models
    def env_complete(self, target: str) -> bool:
        return (self.t.host(target) / ENV_MARKER).is_file()

    def install_env(self, bundle: Bundle, env: Mapping, bid: str, workers: int) -> str:
        target = env_dir(env)
        final = self.t.host(target)
        if self.env_complete(target):
            self.use(target, bid)
            self.say(f"environment {env['name']}: already installed at {target} (reused)")
            return target
        if final.exists():  # renamed but conda-unpack/marker never finished: redo it
            shutil.rmtree(final)
        art = bundle.artifact(str(env["artifact"]))
        parent = self.mkdir(str(Path(target).parent))
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
        self.say(f"environment {env['name']}: verifying and unpacking {art.path} ({human_size(art.size)})")
        try:
            res = extract_archive(
                bundle.path_of(art),
                partial,
                expected_sha256=art.sha256,
                expected_size=art.size,
                display_name=art.path,
                workers=workers,
            )
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.chmod(partial, 0o755)
        os.rename(partial, final)
        self.own(target, "tree", bid)
        self.save()  # from here on uninstall knows the directory, even if conda-unpack fails
        self.say(
            f"environment {env['name']}: {res.members} files in {res.seconds:.1f} s; running conda-unpack"
        )
        run_conda_unpack(final, target)
        marker = {
            "environment": env["name"],
            "content_hash": env["content_hash"],
            "artifact_sha256": art.sha256,
            "installed_by": bid,
        }
        write_atomic(final / ENV_MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
        return target

    def install_model(self, bundle: Bundle, model: Mapping, bid: str, workers: int) -> str:
        target = model_dir(model)
        final = self.t.host(target)
        files = list(model.get("files") or [])
        if final.is_dir() and model_intact(final, files):
            self.use(target, bid)
            self.say(f"model {model['name']}: already installed at {target} (reused)")
            return target
        if final.exists():
            shutil.rmtree(final)
        src_dir = str(model.get("dir") or f"models/{model['name']}")
        arts = [
            (f, bundle.artifact(f"{src_dir}/{check_relpath(f['path'], what='model file')}")) for f in files
        ]
        total = sum(a.size for _, a in arts)
        parent = self.mkdir(str(Path(target).parent))
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
        self.say(f"model {model['name']}: verifying and copying {len(arts)} files ({human_size(total)})")
        try:
            for f, _ in arts:
                (partial / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                jobs = [
                    pool.submit(
                        copy_verified,
                        bundle.path_of(a),
                        partial / f["path"],
                        expected_sha256=a.sha256,
                        expected_size=a.size,
                        display_name=a.path,
                    )
                    for f, a in sorted(arts, key=lambda fa: -fa[1].size)
                ]
                for j in jobs:
                    j.result()
            for d in [partial, *(p for p in partial.rglob("*") if p.is_dir())]:
                os.chmod(d, 0o755)
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self.own(target, "tree", bid)
        return target

    def hf_view(self, model: Mapping, mdir: str, bid: str) -> str:
        """``models--org--name/snapshots/<sha>/<file>``: relative links to the real files. Returns the dir."""
        repo = model.get("repo") or model["name"]
        rdir = hf_repo_dir(repo)
        snap = f"{rdir}/snapshots/{model_version(model)}"
        host_snap = self.t.host(snap)
        if not host_snap.is_dir():
            self.mkdir(f"{rdir}/snapshots")
            tmp = Path(tempfile.mkdtemp(prefix=f".{host_snap.name}.partial-", dir=host_snap.parent))
            for f in model.get("files") or []:
                link = tmp / f["path"]
                link.parent.mkdir(parents=True, exist_ok=True)
                real = self.t.host(f"{mdir}/{f['path']}")
                rel = os.path.relpath(real, host_snap / Path(f["path"]).parent)
                os.symlink(rel, link)
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir() and not p.is_symlink())]:
                os.chmod(d, 0o755)
            os.rename(tmp, host_snap)
            self.own(snap, "tree", bid)
        else:
            self.use(snap, bid)
        return rdir

    def set_ref(self, rdir: str, commit: str, line: str) -> None:
        refs = self.mkdir(f"{rdir}/refs")
        write_atomic(refs / "main", commit)
        self.own(f"{rdir}/refs/main", "file", f"line:{line}")

    # ------------------------------------------------------------------ bootstrap copy
    def keep_bootstrap(self, bundle: Bundle, bootstrap: Path, bid: str) -> None:
        """Keep the verified runtime, installer and install.sh so rollback/uninstall/status work later."""
        m = bundle.manifest
        runtime = m.get("runtime") or None
        boot = self.state["bootstrap"]
        if runtime and (bootstrap / "runtime").is_dir():
            sha = bundle.artifact(runtime["artifact"]).sha256[:16]

            def fill_runtime(d: Path) -> None:
                shutil.copytree(bootstrap / "runtime", d, symlinks=True, dirs_exist_ok=True)

            boot["runtime"] = self._keep_current(RUNTIMES, sha, bid, fill_runtime)
            boot["python"] = runtime.get("python")
        inst_art = (m.get("installer") or {}).get("artifact")
        if inst_art and (bootstrap / "installer").is_dir():
            sha = bundle.artifact(inst_art).sha256[:16]

            def fill_installer(d: Path) -> None:
                shutil.copytree(bootstrap / "installer" / "installer", d / "installer", symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__"))
                sh = bundle.path_of("install.sh")
                if sh.is_file():
                    shutil.copy2(sh, d / "install.sh")
                    os.chmod(d / "install.sh", 0o755)

            boot["installer"] = self._keep_current(INSTALLERS, sha, bid, fill_installer)
        if boot.get("runtime") and boot.get("installer"):
            self.mkdir(str(Path(WRAPPER).parent))
            write_atomic(self.t.host(WRAPPER), wrapper_text(), mode=0o755)
            self.own(WRAPPER, "file", "bootstrap")
            boot["wrapper"] = WRAPPER

    def _keep_current(self, base: str, version: str, bid: str, fill: Callable[[Path], None]) -> str:
        """``base/version`` (filled by ``fill`` in a partial dir, then renamed) and ``base/current`` -> it."""
        tgt = f"{base}/{version}"
        if not self.t.host(tgt).is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=self.mkdir(base)))
            try:
                fill(tmp)
                os.chmod(tmp, 0o755)
                os.rename(tmp, self.t.host(tgt))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.own(tgt, "tree", bid)
        else:
            self.use(tgt, bid)
        _relink(self.t.host(f"{base}/current"), version)
        self.own(f"{base}/current", "file", "bootstrap")
        return tgt


def run_conda_unpack(host_prefix: Path, target_prefix: str) -> None:
    """Run the env's ``conda-unpack`` with the env's own python so the prefix baked in is ``target_prefix``.

    On a live server both are the same path and conda-pack's script runs as it is. In a staging tree
    (``--root``) the files are under the root, but the env will run at ``target_prefix`` on the booted
    image: the script's own records and replacement function are used with that prefix.
    """
    script = host_prefix / "bin" / "conda-unpack"
    if not script.is_file():
        return  # packed for a fixed destination: nothing to relocate
    py = host_prefix / "bin" / "python"
    if not py.exists():
        raise InstallError(f"{host_prefix}: the environment has no bin/python to run conda-unpack with")
    env = {"PATH": f"{host_prefix}/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
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
    """Every file present with its size (the hash was checked when it was copied here)."""
    for f in files:
        p = d / f["path"]
        try:
            if p.stat().st_size != int(f["size"]):
                return False
        except OSError:
            return False
    return True


def _relink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_path(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)
