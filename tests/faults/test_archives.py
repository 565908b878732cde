"""R3 archives: one table of tar members, run against both member checks of the installer.

``install.sh``'s ``check_tar`` (bash, for the bootstrap archives: the installer and the bundle's Python) and
``installer.unpack`` (Python, for the environments) must follow one rule set: every hostile case is refused
by both, with the same reason, before anything is written (and nothing lands outside the destination); every
legitimate case extracts to the same tree with both. The bash function is called from the real install.sh,
sourced (its ``main`` runs only when it is executed). A real install.sh run on a signed bundle whose installer
archive is hostile is in tests/test_install_sh.py (it uses this table).

The R3 path cases at the end use a real signed bundle: an artifact that is a symlink (to identical bytes)
or a FIFO is refused by type, and a bundle directory reached through a symlink installs what is signed.
"""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

import installer
from installer.errors import UnsafeArchiveError
from installer.unpack import extract_archive
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import keys, t1_parts  # noqa: F401

INSTALL_SH = Path(installer.__file__).resolve().parent / "bootstrap" / "install.sh"
MTIME = 1_700_000_000


def reg(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), mode, MTIME
    return ti, data


def _special(name: str, type_: bytes, linkname: str = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = type_, linkname, mode, MTIME
    if type_ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    return ti, None


def sym(name: str, target: str):
    return _special(name, tarfile.SYMTYPE, target, 0o777)


def hard(name: str, target: str):
    return _special(name, tarfile.LNKTYPE, target)


def dir_(name: str, mode: int = 0o755):
    return _special(name, tarfile.DIRTYPE, mode=mode)


# (case, members, the reason both checks give; None: legitimate, must extract the same with both)
CASES: list[tuple[str, list, str | None]] = [
    ("absolute", [reg("/tmp/llm-r3-abs")], "absolute path"),
    ("dotdot", [reg("../llm-r3-up")], "'..' in the path"),
    ("dotdot-inner", [reg("a/../../llm-r3-up")], "'..' in the path"),
    ("dot-then-dotdot", [reg("./../llm-r3-up")], "'..' in the path"),
    ("empty-name-file", [reg(".")], "empty member name"),
    ("symlink-absolute", [sym("etc", "/etc")], "symlink to an absolute path"),
    ("symlink-escape", [dir_("a"), sym("a/l", "../../outside")], "symlink leaves the destination"),
    ("evil-dotdot-then-write", [sym("evil", ".."), reg("evil/x")], "symlink leaves the destination"),
    ("evil-nested-then-write", [dir_("a"), sym("a/evil", ".."), reg("a/evil/x")],
     "path goes through the symlink 'a/evil'"),
    ("symlink-then-write", [dir_("sub"), sym("l", "sub"), reg("l/x")], "path goes through the symlink 'l'"),
    ("symlink-dotdot-inside", [dir_("d"), sym("d/l2", "l1/.."), sym("d/l1", ".")],
     "symlink target with '..' inside it"),
    ("symlink-to-own-dir", [dir_("d"), sym("d/l", ".")], "symlink to its own directory"),
    ("hardlink-absolute", [hard("h", "/etc/passwd")], "hard link outside the archive"),
    ("hardlink-dotdot", [hard("h", "../sentinel")], "hard link outside the archive"),
    ("hardlink-through-symlink", [dir_("sub"), reg("sub/f"), sym("l", "sub"), hard("h", "l/f")],
     "hard link through a symlink"),
    ("hardlink-to-a-symlink", [reg("f"), sym("l", "f"), hard("h", "l")], "hard link through a symlink"),
    ("chardev", [_special("null", tarfile.CHRTYPE)], "device node"),
    ("blockdev", [_special("sda", tarfile.BLKTYPE)], "device node"),
    ("fifo", [_special("pipe", tarfile.FIFOTYPE)], "fifo"),
    ("setuid", [reg("su", b"#!/bin/sh\n", 0o4755)], "setuid/setgid bit"),
    ("setgid-dir", [dir_("sg", 0o2755)], "setuid/setgid bit"),
    ("setgid-file", [reg("sg", b"#!/bin/sh\n", 0o2711)], "setuid/setgid bit"),
    # legitimate: what conda environments and the installer runtime really contain
    ("ok-runtime-links", [
        dir_("bin"),
        reg("bin/python3.11", b"#!/bin/sh\necho hi\n", 0o755),
        sym("bin/python3", "python3.11"),
        sym("bin/python", "python3"),
        hard("bin/python3.11-hard", "bin/python3.11"),
        dir_("lib"),
        reg("lib/libz.so.1.3", b"\x7fELF" + bytes(300), 0o755),
        sym("lib/libz.so", "libz.so.1.3"),
        sym("lib64", "lib"),
        reg("lib/other.txt", b"beside a symlinked dir"),
        dir_("share/a/b"),
        sym("share/a/b/up", "../../../lib"),
        reg("share/doc/read me.txt", b"spaces are fine"),
        dir_("tmp", 0o1777),
    ], None),
    ("ok-dot-prefixed", [dir_("."), dir_("./bin"), reg("./bin/tool", b"t", 0o755), sym("./bin/t2", "./tool"),
                         hard("./bin/t3", "./bin/tool")], None),
]
HOSTILE = {c: (m, r) for c, m, r in CASES if r is not None}
LEGIT = {c: m for c, m, r in CASES if r is None}


def tar_gz(path: Path, members: list) -> str:
    """``members`` as a .tar.gz at ``path``, a good file first; returns its sha256."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        first, data = reg("good.txt", b"fine")
        t.addfile(first, io.BytesIO(data))
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    body = gzip.compress(raw.getvalue(), mtime=0)
    path.write_bytes(body)
    return hashlib.sha256(body).hexdigest()


def bash_check_and_extract(archive: Path, dest: Path, work: Path) -> subprocess.CompletedProcess:
    """install.sh's own ``check_tar`` then ``extract_tar`` (the functions, from the sourced script)."""
    work.mkdir(parents=True, exist_ok=True)
    script = 'source "$1"; WORK=$2; check_tar "$3"; extract_tar "$3" "$4"'
    return subprocess.run(["bash", "-c", script, "check", INSTALL_SH, work, archive, dest], capture_output=True,
                          text=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})


def tree(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), bool(st.st_mode & 0o100),
                            st.st_nlink)
    return out


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(outside, box): destinations go inside ``box``, so anything escaping lands in ``outside``."""
    outside = tmp_path / "outside"
    (outside / "box").mkdir(parents=True)
    (outside / "sentinel").write_text("keep")
    return outside, outside / "box"


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_refused_by_both_checks(case: str, sandbox, tmp_path: Path) -> None:
    outside, box = sandbox
    members, reason = HOSTILE[case]
    archive = tmp_path / f"{case}.tar.gz"
    sha = tar_gz(archive, members)
    before = tree(outside)

    r = bash_check_and_extract(archive, box / "bash", tmp_path / "work")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"install.sh: error: {archive}: refusing member '" in r.stderr and reason in r.stderr, r.stderr
    assert not (box / "bash").exists(), "check_tar refuses before anything is extracted"

    with pytest.raises(UnsafeArchiveError) as ei:
        extract_archive(archive, box / "py", expected_sha256=sha)
    assert reason in ei.value.reason, ei.value.reason
    assert not (box / "py").exists(), "the partial destination is removed"

    assert tree(outside) == before, "nothing written outside the destination"
    assert not Path("/tmp/llm-r3-abs").exists() and not (tmp_path / "llm-r3-up").exists()


@pytest.mark.parametrize("case", sorted(LEGIT))
def test_legitimate_archive_extracts_the_same_with_both(case: str, sandbox, tmp_path: Path) -> None:
    outside, box = sandbox
    archive = tmp_path / f"{case}.tar.gz"
    sha = tar_gz(archive, LEGIT[case])
    r = bash_check_and_extract(archive, box / "bash", tmp_path / "work")
    assert r.returncode == 0, r.stderr
    extract_archive(archive, box / "py", expected_sha256=sha)
    by_bash, by_py = tree(box / "bash"), tree(box / "py")
    assert by_bash == by_py
    assert by_py["good.txt"][0] == "file" and len(by_py) > 3


def test_figure() -> None:
    """The R3 archive figure: every hostile case of the table is refused by both checks (asserted above)."""
    print(f"R3 archives: {len(HOSTILE)} hostile tar cases x 2 checks (bash check_tar, Python extract), "
          f"{len(LEGIT)} legitimate cases extracted identically by both")
    assert len(HOSTILE) >= 20 and len(LEGIT) >= 2


# --------------------------------------------------------------------------- R3 paths: links and FIFOs in a bundle

ARTIFACTS = ["install.sh", "installer.tar.gz", "runtime/t1.tar.gz", "envs/t1.tar.zst", "models/tiny/model.safetensors"]


@pytest.fixture(scope="module")
def r3_bundle(tmp_path_factory, t1_parts, keys) -> Path:
    from tests.installer_fixtures import BundleSpec, make_bundle, service, tiny_model

    return make_bundle(tmp_path_factory.mktemp("r3paths"),
                       BundleSpec(version="1.0.0", env=t1_parts, models=[tiny_model()], services=[service()]), keys)


def _farm(bundle: Path, dest: Path) -> Path:
    for dirpath, _dirs, files in os.walk(bundle):
        rel = Path(dirpath).relative_to(bundle)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(Path(dirpath, f), dest / rel / f)
    return dest


def _install_sh(bundle: Path, root: Path, pub: Path, work: Path) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", str(INSTALL_SH), "--bundle", str(bundle), "--root", str(root), "--pubkey",
                           str(pub), "--workdir", str(work)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}, check=False)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
@pytest.mark.parametrize("rel", ARTIFACTS)
def test_artifact_that_is_a_symlink_or_fifo_is_refused(kind, rel, r3_bundle, keys, tmp_path):
    """An artifact replaced by a symlink to identical bytes (the hash would match) or by a FIFO (a reader
    would hang): ``pack verify`` and install.sh refuse it by type, at once, and change nothing."""
    from click.testing import CliRunner

    from packager.cli import main as pack
    from tests.installer_fixtures import tree_snapshot

    b = _farm(r3_bundle, tmp_path / "b" / r3_bundle.name)
    size = (b / rel).stat().st_size
    (b / rel).unlink()
    if kind == "symlink":
        (b / rel).symlink_to(r3_bundle / rel)
    else:
        os.mkfifo(b / rel)
    r = CliRunner().invoke(pack, ["verify", str(b), "--pubkey", str(keys.pub)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert f"error: {rel}: type mismatch (expected regular file, got not a regular file)" in r.output
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    before = tree_snapshot(root)
    r = _install_sh(b, root, keys.pub, tmp_path / "w")
    if rel in ARTIFACTS[:3]:  # the bootstrap's own files: install.sh refuses them itself
        want = [f"install.sh: error: {rel}: not a regular file in the bundle (missing, a symlink or a special file)"]
    else:  # the Python installer's presence/type/size check, before anything is unpacked
        want = [f"error: {rel}: file mismatch (expected a file of {size} bytes", f"error: {rel}: not a regular file",
                f"error: {rel}: type mismatch"]
    assert r.returncode != 0 and any(w in r.stderr for w in want), r.stderr
    assert "Traceback" not in r.stderr
    assert tree_snapshot(root) == before
    assert not any((tmp_path / "w").iterdir())


def test_bundle_directory_that_is_a_symlink_installs_what_is_signed(r3_bundle, keys, tmp_path):
    """A bundle reached through a symlink (``/media/usb/current -> ...``) is resolved once: install.sh reads
    every file from the resolved directory, so re-pointing the link mid-install cannot mix two bundles."""
    from tests.installer_fixtures import tree_snapshot

    link = tmp_path / "current"
    link.symlink_to(r3_bundle)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = _install_sh(link, root, keys.pub, tmp_path / "w")
    assert r.returncode == 0 and "demo 1.0.0 is active" in r.stdout, r.stderr
    direct = tmp_path / "root2"
    (direct / "etc").mkdir(parents=True)
    r = _install_sh(r3_bundle, direct, keys.pub, tmp_path / "w2")
    assert r.returncode == 0, r.stderr

    for part in ("opt/llm/models", "opt/llm/envs"):  # the same bytes, the same layout
        assert tree_snapshot(root / part) == tree_snapshot(direct / part)


def test_bootstrap_reads_never_follow_a_link_or_block_on_a_fifo(tmp_path):
    """install.sh's one read of each file opens it with O_NOFOLLOW|O_NONBLOCK, so a symlink or a FIFO put in
    place of a file after its type was checked fails or reads as empty (the size check refuses it); no hang."""
    (tmp_path / "real").write_bytes(b"payload")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo")

    def read_plain(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", 'source "$1"; read_plain "$2"', "t", INSTALL_SH, tmp_path / name],
                              capture_output=True, timeout=10, check=False, env={"PATH": "/usr/bin:/bin"})

    assert read_plain("real").stdout == b"payload"
    r = read_plain("link")
    assert r.returncode != 0 and r.stdout == b"" and b"Too many levels of symbolic links" in r.stderr
    r = read_plain("fifo")
    assert r.stdout == b""
