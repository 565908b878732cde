"""Split volumes on the target: SPLIT.json read and checked, where each volume is, which pieces hold an artifact.

``pack split`` (packager/split.py) cuts a bundle into ``<name>-<version>.volNN/`` directories; SPLIT.json (on
volume 1, not signed) lists every artifact's pieces: ``{"file", "name", "volume", "offset", "size"}``. The
installer reads each artifact in place from its pieces, so SPLIT.json only says where to look: every byte
read is covered by the artifact's sha256 (or its frames' sha256) in the signed MANIFEST.json. It is still
checked before use (safe names, pieces that tile each artifact exactly, the manifest it was written for),
so a damaged or foreign SPLIT.json is refused by name rather than leading to a hash mismatch.

A volume is found beside volume 1 (``<first>/../<name>``) or in a ``--volumes`` directory (the volume itself,
or the directory holding it), as install.sh looks for it; it is "there" when its ``VOLUME.sha256`` is a regular
file. ``ask`` (set on a terminal) waits for the operator to mount a missing volume; without it a missing
volume is a :class:`VolumeMissingError` naming it, and a re-run continues (verified files are kept).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from installer.bundle.names import INSTALL_SH, MANIFEST_NAME, PIECE_SUFFIX, SIGNATURE_NAME, SPLIT_INFO, VOLUME_INDEX
from installer.bundle.reader import check_relpath
from installer.errors import BundleError

SPLIT_FORMAT = 1
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_PIECE_NUMBER = re.compile(r"[0-9]{4}")
_INDEX_LINE = re.compile(r"([0-9a-f]{64})  ([^\n\r\x00\\]+)")
_NOT_SPLIT = "the volumes were not written by `pack split`; copy them again"


class VolumeMissingError(BundleError):
    """A volume that holds bytes the install needs is not mounted where the installer looks."""


@dataclass(frozen=True, slots=True)
class Span:
    """One piece of an artifact: ``size`` bytes at ``offset`` of the artifact, file ``name`` of ``volume``."""

    volume: int
    name: str
    offset: int
    size: int


def read_small(path: Path, limit: int = 64 << 20) -> bytes:
    """A small file of a volume, read without following a symlink or waiting on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        what = "a symlink" if e.errno == errno.ELOOP else e.strerror or str(e)
        raise BundleError(f"{path}: cannot read it ({what})", hint="copy the first volume again") from e
    with os.fdopen(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{path}: not a regular file", hint="copy the first volume again")
        os.set_blocking(fd, True)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path}: larger than {limit} bytes", hint=_NOT_SPLIT)
    return data


@dataclass
class Volumes:
    """The volumes of one split bundle: what SPLIT.json says, checked against the verified manifest."""

    first: Path  # volume 1's directory (where install.sh ran from)
    names: tuple[str, ...]
    pieces: Mapping[str, tuple[Span, ...]]  # artifact path -> its pieces in order
    search: tuple[Path, ...] = ()
    ask: Callable[[str], bool] | None = field(default=None, repr=False)  # prompt; False: the operator stopped
    announce: Callable[[str], None] | None = field(default=None, repr=False)  # "volume 2/3: DIR", once each
    _seen: set[int] = field(default_factory=set, repr=False)

    @property
    def count(self) -> int:
        return len(self.names)

    @classmethod
    def load(cls, first: str | os.PathLike[str], info_file: str | os.PathLike[str], sizes: Mapping[str, int],
             manifest_sha256: str, search: Iterable[str | os.PathLike[str]] = ()) -> Volumes:
        """Read SPLIT.json (``info_file``: volume 1's, or install.sh's private copy of it) for the artifacts of
        the verified manifest (``sizes``: path -> size). Refuses what ``pack split`` would not have written."""
        info_file = Path(info_file)
        try:
            info = json.loads(read_small(info_file))
        except ValueError as e:
            raise BundleError(f"{info_file}: not valid JSON ({e})", hint="copy the first volume again") from e
        if not isinstance(info, dict) or info.get("format_version") != SPLIT_FORMAT:
            got = info.get("format_version") if isinstance(info, dict) else None
            raise BundleError(f"{info_file}: split format {got!r} is not supported",
                              hint="use the install.sh that came with these volumes")
        if info.get("manifest_sha256") != manifest_sha256:
            raise BundleError(f"{info_file}: these volumes were split from another MANIFEST.json",
                              hint="the volumes belong to another build of the bundle; use one set of volumes")
        names = info.get("volume_names")
        if (not isinstance(names, list) or info.get("volumes") != len(names) or not names
                or not all(isinstance(n, str) and _VOLUME_NAME.fullmatch(n) for n in names)):
            raise BundleError(f"{info_file}: the volume list is malformed", hint=_NOT_SPLIT)
        by_file: dict[str, list[Span]] = {}
        for p in info.get("pieces") if isinstance(info.get("pieces"), list) else ():
            try:
                file, name, vol, off, size = (p["file"], p["name"], p["volume"], p["offset"], p["size"])
                ok = all(isinstance(x, str) for x in (file, name)) and all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (vol, off, size))
            except (KeyError, TypeError):
                ok = False
            if not ok:
                raise BundleError(f"{info_file}: malformed piece entry {str(p)[:120]}", hint=_NOT_SPLIT)
            suffix = name[len(file):]
            if not (name == file or (name.startswith(file) and suffix.startswith(PIECE_SUFFIX)
                                     and _PIECE_NUMBER.fullmatch(suffix[len(PIECE_SUFFIX):]))):
                raise BundleError(f"{info_file}: piece {name!r} is not a piece of {file!r}", hint=_NOT_SPLIT)
            check_relpath(name, what=f"piece name in {SPLIT_INFO}")
            if file not in sizes:
                raise BundleError(f"{info_file}: {file!r} is not listed in MANIFEST.json", hint=_NOT_SPLIT)
            if not 1 <= vol <= len(names):
                raise BundleError(f"{info_file}: piece {name!r} on volume {vol} of {len(names)}", hint=_NOT_SPLIT)
            by_file.setdefault(file, []).append(Span(vol, name, off, size))
        pieces: dict[str, tuple[Span, ...]] = {}
        for path, size in sizes.items():
            spans = sorted(by_file.get(path, []), key=lambda s: (s.offset, s.size))
            if path == INSTALL_SH and not spans:  # install.sh is whole on volume 1, beside SPLIT.json
                spans = [Span(1, INSTALL_SH, 0, size)]
            pos, ok = 0, bool(spans)
            for s in spans:
                ok = ok and s.offset == pos and (s.size > 0 or (size == 0 and len(spans) == 1))
                pos += s.size
            if not ok or pos != size:
                raise BundleError(f"{info_file}: the pieces of {path} do not cover its {size} bytes exactly",
                                  hint=_NOT_SPLIT)
            pieces[path] = tuple(spans)
        return cls(Path(first), tuple(names), pieces, tuple(Path(d) for d in search))

    # ------------------------------------------------------------------ where the volumes are
    def label(self, number: int) -> str:
        return f"volume {number} of {self.count} ({self.names[number - 1]})"

    def candidates(self, number: int) -> list[Path]:
        if number == 1:
            return [self.first]
        name = self.names[number - 1]
        return [self.first.parent / name] + [c for d in self.search for c in (d / name, d) if c.name == name]

    def locate(self, number: int) -> Path | None:
        """The directory of volume ``number`` if it is mounted (its VOLUME.sha256 a regular file), else None."""
        for c in self.candidates(number):
            try:
                if stat.S_ISREG(os.lstat(c / VOLUME_INDEX).st_mode):
                    return c
            except OSError:
                continue
        return None

    def where(self, number: int) -> Path:
        """Volume ``number``'s directory; waits for it on a terminal (``ask``), else VolumeMissingError."""
        while True:
            found = self.locate(number)
            if found is not None:
                if number not in self._seen and self.announce is not None:
                    self.announce(f"volume {number}/{self.count}: {found}")
                self._seen.add(number)
                return found
            if self.ask is None or not self.ask(self.wanted(number)):
                looked = ", ".join(str(c) for c in self.candidates(number))
                raise VolumeMissingError(f"{self.label(number)} not found (looked for {looked})",
                                         hint=self.how_to_continue(number))

    def wanted(self, number: int) -> str:
        return (f"{self.label(number)} is needed now: mount it as {self.first.parent / self.names[number - 1]}"
                f"{' (or in a --volumes directory)' if self.search else ''}")

    def how_to_continue(self, number: int) -> str:
        return (f"mount {self.names[number - 1]} beside {self.first} (or pass the directory holding it with "
                "--volumes DIR), then run the same command again: what was verified is kept and not read again")

    def spans_of(self, path: str) -> tuple[Span, ...]:
        try:
            return self.pieces[path]
        except KeyError:
            raise BundleError(f"{path!r} is not on any volume (SPLIT.json)", hint=_NOT_SPLIT) from None

    def index(self, number: int) -> dict[str, str]:
        """Volume ``number``'s VOLUME.sha256 (name -> sha256); read only to name a damaged piece."""
        d = self.locate(number)
        if d is None:
            return {}
        out = {}
        for line in read_small(d / VOLUME_INDEX).decode("utf-8", "replace").splitlines():
            m = _INDEX_LINE.fullmatch(line)
            if m:
                out[m.group(2)] = m.group(1)
        return out

    def unlisted(self, number: int) -> list[str]:
        """Files on a mounted volume that are neither a piece nor one of volume 1's own files."""
        d = self.locate(number)
        if d is None:
            return []
        known = {s.name for spans in self.pieces.values() for s in spans if s.volume == number} | {VOLUME_INDEX}
        if number == 1:
            known |= {MANIFEST_NAME, SIGNATURE_NAME, SPLIT_INFO, INSTALL_SH}
        extra = []
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            for fn in sorted(filenames):
                rel = Path(dirpath, fn).relative_to(d).as_posix()
                if rel not in known:
                    extra.append(rel)
        return extra
