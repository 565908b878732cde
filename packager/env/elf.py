"""A small ELF reader (stdlib only): the dynamic section (DT_NEEDED, DT_SONAME, RPATH/RUNPATH) and the
symbol versions a file needs (DT_VERNEED, e.g. ``GLIBC_2.34`` from ``libc.so.6``).

Enough to tell which shared libraries an environment needs from the system and the oldest glibc it can run
on, without pyelftools. Only the headers, the dynamic segment and the string table are read.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29
DT_VERNEED, DT_VERNEEDNUM = 0x6FFFFFFE, 0x6FFFFFFF

# Libraries that are part of glibc itself (always on the target, versioned by GLIBC_x.y symbol versions).
GLIBC_SONAMES = frozenset({
    "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1",
    "libresolv.so.2", "libanl.so.1", "libnsl.so.1", "libBrokenLocale.so.1", "libmvec.so.1",
    "libthread_db.so.1", "libc_malloc_debug.so.0", "libmemusage.so", "libpcprofile.so",
    "libnss_files.so.2", "libnss_dns.so.2", "libnss_compat.so.2", "libnss_db.so.2", "libnss_hesiod.so.2",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "ld-linux.so.2", "ld64.so.2", "ld64.so.1",
    "linux-vdso.so.1", "linux-gate.so.1", "linux-vdso64.so.1",
})
_GLIBC_VERSION = re.compile(r"^GLIBC_(\d+(?:\.\d+)+)$")


@dataclass(frozen=True)
class ElfInfo:
    needed: tuple[str, ...]
    soname: str | None
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    versions: tuple[tuple[str, str], ...]  # (library, version name) pairs from DT_VERNEED

    def glibc_needed(self) -> str | None:
        """Newest ``GLIBC_x.y`` symbol version this file needs (None if it needs none)."""
        best: tuple[int, ...] | None = None
        for _lib, name in self.versions:
            m = _GLIBC_VERSION.match(name)
            if m:
                v = tuple(int(x) for x in m.group(1).split("."))
                best = v if best is None or v > best else best
        return ".".join(map(str, best)) if best else None


def is_elf(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def read_elf(path: str | os.PathLike) -> ElfInfo | None:
    """Parse ``path``; None when it is not an ELF file or is truncated/garbled."""
    try:
        with open(path, "rb") as f:
            return _read(f)
    except (OSError, struct.error, ValueError, IndexError):
        return None


def _read(f) -> ElfInfo | None:
    ident = f.read(16)
    if len(ident) < 16 or ident[:4] != ELF_MAGIC or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return None
    is64 = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    if is64:
        hdr = struct.unpack(end + "HHIQQQIHHHHHH", f.read(48))
        phoff, phentsize, phnum = hdr[4], hdr[8], hdr[9]
        ph_fmt, dyn_fmt = end + "IIQQQQQQ", end + "qQ"
    else:
        hdr = struct.unpack(end + "HHIIIIIHHHHHH", f.read(36))
        phoff, phentsize, phnum = hdr[4], hdr[8], hdr[9]
        ph_fmt, dyn_fmt = end + "IIIIIIII", end + "iI"
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    f.seek(phoff)
    raw = f.read(phentsize * phnum)
    for i in range(phnum):
        ph = struct.unpack_from(ph_fmt, raw, i * phentsize)
        if is64:
            p_type, p_offset, p_vaddr, p_filesz = ph[0], ph[2], ph[3], ph[5]
        else:
            p_type, p_offset, p_vaddr, p_filesz = ph[0], ph[1], ph[2], ph[4]
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:  # static executable or object file
        return ElfInfo((), None, (), (), ())

    def to_offset(addr: int) -> int:
        for vaddr, offset, filesz in loads:
            if vaddr <= addr < vaddr + filesz:
                return addr - vaddr + offset
        raise ValueError(f"address {addr:#x} not in a PT_LOAD segment")

    f.seek(dynamic[0])
    data = f.read(dynamic[1])
    size = struct.calcsize(dyn_fmt)
    entries: list[tuple[int, int]] = []
    for off in range(0, len(data) - size + 1, size):
        tag, val = struct.unpack_from(dyn_fmt, data, off)
        if tag == DT_NULL:
            break
        entries.append((tag, val))
    tags = dict(entries)
    if DT_STRTAB not in tags:
        return ElfInfo((), None, (), (), ())
    f.seek(to_offset(tags[DT_STRTAB]))
    strtab = f.read(tags.get(DT_STRSZ, 1 << 20))

    def s(off: int) -> str:
        stop = strtab.find(b"\0", off)
        return strtab[off:stop if stop >= 0 else len(strtab)].decode("utf-8", "replace")

    needed = tuple(s(v) for t, v in entries if t == DT_NEEDED)
    soname = s(tags[DT_SONAME]) if DT_SONAME in tags else None
    rpath = tuple(p for t, v in entries if t == DT_RPATH for p in s(v).split(":") if p)
    runpath = tuple(p for t, v in entries if t == DT_RUNPATH for p in s(v).split(":") if p)
    versions: list[tuple[str, str]] = []
    if DT_VERNEED in tags:
        pos = to_offset(tags[DT_VERNEED])
        for _ in range(tags.get(DT_VERNEEDNUM, 0)):
            f.seek(pos)
            _ver, cnt, file_off, aux, nxt = struct.unpack(end + "HHIII", f.read(16))
            lib = s(file_off)
            apos = pos + aux
            for _ in range(cnt):
                f.seek(apos)
                _hash, _flags, _other, name_off, anext = struct.unpack(end + "IHHII", f.read(16))
                versions.append((lib, s(name_off)))
                if not anext:
                    break
                apos += anext
            if not nxt:
                break
            pos += nxt
    return ElfInfo(needed, soname, rpath, runpath, tuple(versions))


@dataclass(frozen=True)
class ElfScan:
    """What the ELF files of a tree need from the system."""

    files: int  # ELF files seen
    provided: frozenset[str]  # sonames and lib*.so* file names inside the tree
    needed: dict[str, list[str]]  # soname -> tree-relative paths of files needing it (only those not provided)
    glibc: str | None  # newest GLIBC_x.y any file needs
    glibc_file: str | None  # a file that needs it


def scan_tree(root: Path) -> ElfScan:
    """Walk ``root`` (symlinks not followed) and collect what its ELF files need but do not provide."""
    provided: set[str] = set()
    needs: dict[str, list[str]] = {}
    glibc: tuple[int, ...] | None = None
    glibc_file = None
    count = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for fn in filenames:
            path = os.path.join(dirpath, fn)
            if ".so" in fn:
                provided.add(fn)  # a library file (or symlink) a loader can find by this name
            if os.path.islink(path) or not is_elf(path):
                continue
            info = read_elf(path)
            if info is None:
                continue
            count += 1
            rel = os.path.relpath(path, root)
            if info.soname:
                provided.add(info.soname)
            for lib in info.needed:
                needs.setdefault(lib, []).append(rel)
            g = info.glibc_needed()
            if g:
                gv = tuple(int(x) for x in g.split("."))
                if glibc is None or gv > glibc:
                    glibc, glibc_file = gv, rel
    missing = {lib: sorted(paths) for lib, paths in sorted(needs.items())
               if lib not in provided and lib not in GLIBC_SONAMES}
    return ElfScan(count, frozenset(provided), missing, ".".join(map(str, glibc)) if glibc else None, glibc_file)
