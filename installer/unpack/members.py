"""The one rule set for archive members: what extraction refuses (lexical, no file-system look-ups).

install.sh applies the same rules to the archives it unpacks itself (tests/faults/test_archives.py).
"""

from __future__ import annotations

import stat
import tarfile

from installer.errors import UnsafeArchiveError


def _parts(path: str) -> list[str]:
    return [x for x in path.split("/") if x not in ("", ".")]


def check_member(archive: str, m: tarfile.TarInfo, symlinks: set[str]) -> None:
    """Refuse members that could write outside the destination or are not plain data.

    The rules are lexical and need no file-system look-ups (tarfile's ``data`` filter calls ``realpath`` for
    every member, which costs more than the file creation itself on a 60k-file environment), and they are
    stricter than that filter, so that no order of members can escape:

    - no absolute path, no ``..`` in a member's path, no path through a symlink the archive created;
    - a symlink's target is relative, ``..`` may only lead it (``../../lib/x``) and may not climb above the
      destination from where the link is; a hard link's target is a plain path inside the archive;
    - no device nodes, fifos or other special files; no setuid/setgid bits.

    ``symlinks`` holds the normalised names of the symlinks seen so far (updated here).

    ``install.sh``'s ``check_tar`` applies the same rules, in the same order, with the same reasons, to the
    bootstrap archives (it sees them through ``tar -tv``); tests/faults/test_archives.py runs one table of
    hostile and legitimate archives against both. Change them together.
    """
    name = m.name
    if name.startswith("/"):
        raise UnsafeArchiveError(archive, name, "absolute path")
    parts = _parts(name)
    if ".." in parts:
        raise UnsafeArchiveError(archive, name, "'..' in the path")
    if not parts:
        if m.isdir():
            return
        raise UnsafeArchiveError(archive, name, "empty member name")
    if m.ischr() or m.isblk():
        raise UnsafeArchiveError(archive, name, "device node")
    if m.isfifo():
        raise UnsafeArchiveError(archive, name, "fifo")
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafeArchiveError(archive, name, f"special file (tar type {m.type!r})")
    if m.mode & (stat.S_ISUID | stat.S_ISGID):
        raise UnsafeArchiveError(archive, name, "setuid/setgid bit")
    if symlinks:
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in symlinks:
                raise UnsafeArchiveError(archive, name, f"path goes through the symlink {prefix!r}")
    if m.issym():
        target = m.linkname
        if target.startswith("/"):
            raise UnsafeArchiveError(archive, name, f"symlink to an absolute path ({target})")
        tparts = _parts(target)
        ups = 0
        while ups < len(tparts) and tparts[ups] == "..":
            ups += 1
        if ".." in tparts[ups:]:
            raise UnsafeArchiveError(archive, name, f"symlink target with '..' inside it ({target})")
        if ups > len(parts) - 1:
            raise UnsafeArchiveError(archive, name, f"symlink leaves the destination ({target})")
        if not tparts:
            raise UnsafeArchiveError(archive, name, f"symlink to its own directory ({target!r})")
        symlinks.add("/".join(parts))
    elif m.islnk():
        target = m.linkname
        tparts = _parts(target)
        if target.startswith("/") or not tparts or ".." in tparts:
            raise UnsafeArchiveError(archive, name, f"hard link outside the archive ({target})")
        for i in range(1, len(tparts) + 1):
            if "/".join(tparts[:i]) in symlinks:
                raise UnsafeArchiveError(archive, name, f"hard link through a symlink ({target})")
