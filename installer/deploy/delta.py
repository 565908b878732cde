"""Installing a delta bundle: what it leaves to this server (``artifacts[].provided == "target"``) must be
here, checked before anything changes, and is taken from the installed copies.

- the installer runtime: ``/opt/llm/runtime/<sha[:16]>/`` kept by an earlier install (install.sh runs it;
  the directory is named by the sha256 of the archive it was verified from);
- an environment: installed and committed at ``/opt/llm/envs/<env>/<content_hash[:16]>/`` with the marker of
  an archive of the same sha256 (the same directory is used, as for a full bundle with an unchanged env);
- a model file: any installed model file listed with the same sha256 and size in the MANIFEST.json of an
  installed version. It is hardlinked (or reflinked, or copied when it must be: another filesystem) into the
  staging tree and hashed there before the new version uses it, so a damaged installed copy is refused by
  name and nothing under /opt/llm or /etc changes.

A delta installed on a server that lacks its base is refused before the preflight, naming what is missing and
the bundle versions it was built against.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from installer.bundle import MANIFEST_NAME, Bundle, sha256_file
from installer.bundle.reader import Artifact
from installer.deploy.layout import BUNDLE_RECORDS, ENV_MARKER, RUNTIMES, env_dir, model_dir
from installer.errors import InstallError, IntegrityError
from installer.sizes import human_size
from installer.unpack import copy_verified

if TYPE_CHECKING:
    from installer.deploy.placement import Installer

FICLONE = 0x40049409  # linux/fs.h: share the extents of another file (btrfs, xfs, bcachefs)


@dataclass
class DeltaSources:
    """Where each artifact the delta leaves to this server is found (host paths); empty for a full bundle."""

    files: dict[str, list[Path]] = field(default_factory=dict)  # model artifact path -> installed copies
    environments: dict[str, str] = field(default_factory=dict)  # env artifact path -> its installed dir
    runtime: str | None = None  # target path of the installed runtime

    def candidates(self, artifact: Artifact) -> list[Path]:
        return self.files.get(artifact.path, [])


def model_files_here(inst: Installer) -> dict[str, list[tuple[Path, int]]]:
    """sha256 -> [(host path, size)] of every model file of every installed version (from the MANIFEST.json
    copies the installer keeps; only model directories in use)."""
    out: dict[str, list[tuple[Path, int]]] = {}
    for bid, rec in inst.state["bundles"].items():
        if rec.get("status") != "installed":
            continue
        try:
            m = json.loads(inst.t.host(f"{BUNDLE_RECORDS}/{bid}/{MANIFEST_NAME}").read_bytes())
        except (OSError, ValueError):
            continue
        for model in m.get("models") or []:
            tgt = (rec.get("models") or {}).get(model["name"]) or model_dir(model)
            if not inst.in_use(tgt):
                continue
            d = inst.t.host(tgt)
            for f in model.get("files") or []:
                p = d / str(f["path"])
                entry = (p, int(f["size"]))
                lst = out.setdefault(str(f["sha256"]), [])
                if entry not in lst:
                    lst.append(entry)
    return out


def check_delta(inst: Installer, bundle: Bundle) -> DeltaSources:
    """Everything the delta leaves to this server is here (cheap: presence, size, the env marker's archive
    sha256); raises naming what is missing. Model files are hashed when they are taken (staging)."""
    src = DeltaSources()
    if not bundle.provided:
        return src
    m = bundle.manifest
    missing: list[str] = []
    by_path = {a.path: a for a in bundle.provided}
    rt = (m.get("runtime") or {}).get("artifact")
    if rt in by_path:
        tgt = f"{RUNTIMES}/{by_path[rt].sha256[:16]}"
        if inst.in_use(tgt) and inst.t.host(tgt).is_dir():
            src.runtime = tgt
        else:
            missing.append(f"the installer runtime {by_path[rt].sha256[:16]} ({RUNTIMES}/{by_path[rt].sha256[:16]})")
    for env in m.get("environments") or []:
        a = by_path.get(str(env.get("artifact") or ""))
        if a is None:
            continue
        tgt = env_dir(env)
        if inst.env_placed(tgt, env) and _marker_sha(inst.t.host(tgt)) == a.sha256:
            src.environments[a.path] = tgt
        else:
            missing.append(f"environment {env['name']} (content {str(env['content_hash'])[:16]}, archive sha256 "
                           f"{a.sha256[:16]}) at {tgt}")
    here = None
    for model in m.get("models") or []:
        prefix = f"{model.get('dir') or 'models/' + model['name']}/"
        wanted = [a for p, a in by_path.items() if p.startswith(prefix)]
        if not wanted or inst.model_placed(model_dir(model), model):
            continue
        if here is None:
            here = model_files_here(inst)
        absent = []
        for a in wanted:
            found = [p for p, size in here.get(a.sha256, []) if size == a.size and _plain_file(p, a.size)]
            if found:
                src.files[a.path] = found
            else:
                absent.append(a)
        if absent:
            names = ", ".join(a.path[len(prefix):] for a in absent[:3]) + (" ..." if len(absent) > 3 else "")
            missing.append(f"model {model['name']} @ {model.get('commit')}: {len(absent)} file(s) "
                           f"({human_size(sum(a.size for a in absent))}) it shares with an earlier version "
                           f"({names})")
    if missing:
        raise InstallError(
            f"{bundle.name} {bundle.version} is a delta bundle ({human_size(bundle.provided_size())} left to "
            f"the server) and this server lacks what it needs: " + "; ".join(missing)
            + f". It was built against {describe_base(m)}",
            hint="install the full bundle (`pack build` without --against), or first the version it was built "
            "against; nothing was changed")
    return src


def describe_base(m: Mapping) -> str:
    base = ((m.get("delta") or {}).get("base")) or []
    parts = [f"{b.get('name')} {b.get('version')}" for b in base if b.get("name")]
    how = (m.get("delta") or {}).get("against") or "an earlier install"
    return (", ".join(parts) + f" ({how})") if parts else how


def _marker_sha(d: Path) -> str | None:
    try:
        return json.loads((d / ENV_MARKER).read_bytes()).get("artifact_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def _plain_file(p: Path, size: int) -> bool:
    try:
        st = p.lstat()
    except OSError:
        return False
    import stat

    return stat.S_ISREG(st.st_mode) and st.st_size == size


def take_installed(candidates: list[Path], dst: Path, artifact: Artifact) -> tuple[str, int]:
    """Put an installed copy of ``artifact`` at ``dst`` (staging): hardlink, else reflink, else copy; then
    hash what is at ``dst`` (the same inode for a link). Returns (how, bytes hashed). A copy that does not
    hash to the artifact's sha256 is refused by name (the next candidate is tried first)."""
    tmp = dst.with_name(f".{dst.name}.delta")
    bad: list[str] = []
    for src in candidates:
        tmp.unlink(missing_ok=True)
        how = _link_or_clone(src, tmp)
        if how == "copy":  # another filesystem: one read, hashed on the way (dst appears only if it matches)
            try:
                return how, copy_verified(src, dst, expected_sha256=artifact.sha256, expected_size=artifact.size,
                                          display_name=f"{artifact.path} (installed copy {src})")
            except IntegrityError:
                bad.append(str(src))
                continue
        digest, n = sha256_file(tmp)
        if digest == artifact.sha256 and n == artifact.size:
            os.replace(tmp, dst)
            return how, n
        bad.append(str(src))
        tmp.unlink(missing_ok=True)
    raise IntegrityError(
        f"{artifact.path} (installed copy {', '.join(bad)})", expected=artifact.sha256, actual="a different sha256",
        hint="an installed model file was changed or damaged since it was installed: install the full bundle "
        "(`pack build` without --against), which carries it; nothing was changed")


def _link_or_clone(src: Path, dst: Path) -> str:
    """Hardlink ``src`` at ``dst``, else reflink it; "copy" (and nothing at ``dst``) when neither works."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return "hardlink"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
            raise
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.ioctl(out, FICLONE, fd)
            return "reflink"
        except OSError:
            os.unlink(dst)
            return "copy"
        finally:
            os.close(out)
    finally:
        os.close(fd)
