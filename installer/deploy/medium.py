"""Where the installer reads a bundle's bytes: a bundle directory, or split volumes read in place.

A split bundle is never joined into a scratch copy: :func:`source_of` gives each artifact's pieces on the
volumes (:class:`installer.unpack.pieces.Pieces`) to the same verifying readers as a whole bundle's files.
Volumes may be side by side, mounted in several places (``--volumes``), or mounted one at a time: on a
terminal the installer asks for a volume when it needs it (:func:`terminal_prompt`); elsewhere it stops naming
the volume to mount, and the same command continues (verified files are kept in the staging tree).

Also here: the cheap look at the volumes before the install (:func:`quick_check_volumes`), the piece that a
hash mismatch came from (:func:`name_damaged_piece`).
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from installer.bundle import SPLIT_INFO, Artifact, Bundle
from installer.bundle.volumes import Volumes
from installer.errors import BundleError, IntegrityError
from installer.unpack.pieces import Pieces
from installer.unpack.source import Source


def source_of(bundle: Bundle, art: Artifact) -> Source:
    """The bytes of ``art``: its file in the bundle directory, or its pieces on the volumes."""
    v = bundle.volumes
    if v is None:
        return bundle.path_of(art)
    return Pieces(art.path, art.size, v.spans_of(art.path), v)


def first_volume(bundle: Bundle, art: Artifact) -> tuple[int, int]:
    """Sort key: the volume (and offset there) where ``art`` starts, so media are asked for in order."""
    v = bundle.volumes
    if v is None:
        return (0, 0)
    s = v.spans_of(art.path)[0]
    return (s.volume, s.offset)


def all_mounted(src: Source) -> bool:
    return not isinstance(src, Pieces) or src.all_mounted()


def name_damaged_piece(bundle: Bundle, src: Source, e: IntegrityError, start: int = 0,
                       end: int | None = None) -> IntegrityError:
    """A hash mismatch of pieces read from volumes: the error, with the damaged piece named when its volume's
    VOLUME.sha256 says which one (read only now, after the failure)."""
    if not isinstance(src, Pieces) or bundle.volumes is None:
        return e
    try:
        bad = src.damaged(bundle.volumes.index, start, end)
    except (OSError, BundleError):
        bad = None
    if bad is None:
        return e
    number = bad.split(" ", 2)[1]
    e.hint = f"{bad}: this disk's copy is damaged: copy volume {number} again from the build host"
    return e


def quick_check_volumes(bundle: Bundle) -> None:
    """Presence, type and size of every piece on the volumes mounted now, and no unlisted files on them
    (volumes not mounted yet are looked at when they are needed)."""
    v = bundle.volumes
    assert v is not None
    for number in range(1, v.count + 1):
        d = v.locate(number)
        if d is None:
            continue
        extra = v.unlisted(number)
        if extra:
            raise BundleError(f"{v.label(number)} ({d}): file(s) not listed in SPLIT.json: {', '.join(extra[:5])}",
                              hint="something was added to the volume after `pack split`; copy it again")
    for art in bundle.artifacts:
        for s in v.spans_of(art.path):
            d = v.locate(s.volume)
            if d is None:
                continue
            p = d.joinpath(*s.name.split("/"))
            what = f"volume {s.volume} ({d}): {s.name}"
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise IntegrityError(what, expected=f"a file of {s.size} bytes", actual="missing", what="file",
                                     hint="copy that volume again") from None
            if not stat.S_ISREG(st.st_mode):
                found = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise IntegrityError(what, expected=f"a file of {s.size} bytes", actual=found, what="file",
                                     hint="copy that volume again")
            if st.st_size != s.size:
                raise IntegrityError(what, expected=str(s.size), actual=str(st.st_size), what="size",
                                     hint="copy that volume again")


def terminal_prompt() -> Callable[[str], bool] | None:
    """On a terminal: a prompt that waits for the operator to mount a volume (Enter) or stop (q, EOF)."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None

    def ask(wanted: str) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # only the main thread waits at the terminal (Ctrl-C reaches it); a worker stops
        print(f"\n{wanted}\n  press Enter when it is mounted (q to stop; running the same command later "
              "continues): ", end="", file=sys.stderr, flush=True)
        try:
            answer = sys.stdin.readline()
        except (OSError, ValueError):
            return False
        return bool(answer) and answer.strip().lower() not in ("q", "quit", "n", "no")

    return ask


def attach_volumes(bundle: Bundle, first: Path, info_dir: Path, search: Iterable[Path],
                   ask: Callable[[str], bool] | None) -> Bundle:
    """``bundle`` (its verified manifest) read from split volumes: volume 1 is ``first``; SPLIT.json is read from
    ``info_dir`` (install.sh's private copy beside the verified manifest) or from volume 1."""
    info = info_dir / SPLIT_INFO if (info_dir / SPLIT_INFO).is_file() else first / SPLIT_INFO
    vols = Volumes.load(first, info, {a.path: a.size for a in bundle.artifacts}, bundle.manifest_sha256,
                        search=search)
    vols.ask = ask
    vols.announce = lambda line: print(line, file=sys.stderr, flush=True)
    return dataclasses.replace(bundle, root=Path(first), volumes=vols)


def is_split(d: Path) -> bool:
    """``d`` is volume 1 of a split bundle (its SPLIT.json beside MANIFEST.json)."""
    return os.path.lexists(d / SPLIT_INFO)
