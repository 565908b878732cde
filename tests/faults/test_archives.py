"""R3 archives: one table of tar members, run against both member checks of the installer.

``install.sh``'s ``check_tar`` (bash, for the bootstrap archives: the installer and the bundle's Python) and
``installer.extract`` (Python, for the environments) must follow one rule set: every hostile case is refused
by both, with the same reason, before anything is written (and nothing lands outside the destination); every
legitimate case extracts to the same tree with both. The bash function is called from the real install.sh,
sourced (its ``main`` runs only when it is executed). A real install.sh run on a signed bundle whose installer
archive is hostile is in tests/test_install_sh.py (it uses this table).
"""

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
from installer.extract import extract_archive

INSTALL_SH = Path(installer.__file__).resolve().parent / "install.sh"
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
