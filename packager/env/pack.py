"""Pack a conda environment fast, with conda-pack's relocation semantics.

**pack_env** writes ``envs/<env>.tar.zst``. conda-pack decides *what* goes in: the file list
(``conda_pack.CondaEnv.from_prefix``), the prefix placeholder of every conda-managed file, the ``conda-unpack``
script with its prefix records, the activate scripts, the cleaned ``conda-meta`` records, and its checks
(files pip deleted from conda packages, editable installs). The bytes are written by this module: a
streaming tar writer feeding a multi-threaded zstd compressor (``zstandard``, level 3, all cores by default),
hashing the compressed stream as it is written. conda-pack's own writer reads every unmanaged (pip) file
into memory and its ``tar.zst`` ignores the level and thread count (always level 9 on one thread); see
``bench/pack_env.py`` for the figures.

Deterministic output: env members sorted by path, then the files conda-pack generates (``bin/conda-unpack``
...) sorted; mtime 0 (or ``SOURCE_DATE_EPOCH``), uid/gid 0, no owner names, mode 0755/0644, PAX format,
hard links stored as regular files, absolute symlinks into the prefix made relative (links leaving the env
are refused: the installer's safe extraction would reject them).

Unmanaged (pip) files are handled like conda-pack does, in one streaming pass: a file that is valid UTF-8
is text, and gets a prefix record if it contains the build prefix; a text file in ``bin/`` whose shebang
points into the prefix is rewritten to ``#!/usr/bin/env pythonX.Y``; binary unmanaged files are not
rewritten (conda-pack does not trust binary replacement in files it did not see built).

What this means for the target (the installer):

- ``bin/`` scripts installed by pip start with ``#!/usr/bin/env pythonX.Y``: run the env's tools by absolute
  path through its python (``<env>/bin/python -m vllm...``) or with ``<env>/bin`` first on ``PATH``.
- ``bin/conda-unpack`` starts with ``#!/usr/bin/env python``: run it as ``<env>/bin/python <env>/bin/conda-unpack``
  after extracting at the final path; it rewrites the recorded prefixes (text and binary) in place.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from packager.env.build import BuiltEnv
from packager.env.placeholder import PlaceholderRestorer
from packager.env.tarstream import TarStream
from packager.errors import EnvironmentBuildError
from packager.tarball import HashingWriter

CHUNK = 1 << 20
TEXT_IN_MEMORY_MAX = 32 << 20  # unmanaged text files up to this size are held for shebang rewriting
EXCLUDE_TOP = {"CACHEDIR.TAG"}


FRAME_BYTES = 32 << 20  # tar bytes per zstd frame: the installer decodes frames in parallel


@dataclass(frozen=True)
class PackResult:
    path: Path
    sha256: str
    size: int  # bytes of the archive
    unpacked_size: int  # bytes of the regular files it holds
    files: int  # members (files, links, empty dirs)
    seconds: float = 0.0
    reused: bool = False
    frames: tuple[tuple[int, int, str], ...] = ()  # (offset, size, sha256) of each zstd frame, in order


class _FrameHasher:
    """Between the compressor and the file: hashes the whole archive and each frame's byte range."""

    def __init__(self, raw) -> None:
        self.whole = HashingWriter(raw)
        self.frames: list[tuple[int, int, str]] = []
        self._start = 0
        self._sha = hashlib.sha256()

    def write(self, b) -> int:
        n = self.whole.write(b)
        self._sha.update(memoryview(b)[:n])
        return n

    def end_frame(self) -> None:
        size = self.whole.size - self._start
        if size:
            self.frames.append((self._start, size, self._sha.hexdigest()))
        self._start, self._sha = self.whole.size, hashlib.sha256()


class _Watch:
    """Follows a streamed file: is it UTF-8 text, does it contain the build prefix?"""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = True
        self.has_prefix = False
        self.tail = b""

    def __call__(self, chunk: memoryview) -> None:
        if not self.text:
            return
        data = bytes(chunk)
        if self.text:
            try:
                self.decoder.decode(data)
            except UnicodeDecodeError:
                self.text = False
        if self.text and not self.has_prefix:
            self.has_prefix = self.prefix in self.tail + data
            self.tail = data[-(len(self.prefix) - 1):] if len(self.prefix) > 1 else b""

    def finish(self) -> None:
        if self.text:
            try:
                self.decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.text = False


class _Capture:
    """Archive stand-in handed to conda-pack's Packer.finish(): keeps the files it generates (small)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[bytes, int]] = {}

    def add(self, source: str, target: str) -> None:
        st = os.stat(source)
        with open(source, "rb") as f:
            self.entries[target] = (f.read(), st.st_mode)

    def add_bytes(self, source: str, data: bytes, target: str) -> None:
        self.entries[target] = (data, os.stat(source).st_mode)


def load_env_files(built: BuiltEnv) -> tuple[list, dict[str, str]]:
    """conda-pack's view of the env: File records (source, target, file_mode, prefix_placeholder), and the
    binary files whose package placeholder must be restored (see ``_fill_from_conda_meta``)."""
    from conda_pack.core import CondaEnv, CondaPackException

    try:
        env = CondaEnv.from_prefix(str(built.prefix), on_missing_cache="ignore")
    except CondaPackException as e:
        text = str(e).strip()
        if "editable" in text:
            hint = "reinstall those packages without -e: pip install --no-deps --force-reinstall <path>"
        elif "deleted/overwritten" in text:
            hint = ("install each package with conda or with pip, not both (drop it from conda: or from pip:); "
                    "for a hand-built env, `conda install --force-reinstall` the packages listed")
        else:
            hint = "check that the environment is a complete conda environment"
        raise EnvironmentBuildError(f"environment {built.spec.name}: conda-pack refuses {built.prefix}: {text}",
                                    hint=hint) from e
    files = [f for f in env.files if f.target not in EXCLUDE_TOP]
    restore = _fill_from_conda_meta(built.prefix, files)
    return files, restore


def _fill_from_conda_meta(prefix: Path, files: list) -> dict[str, str]:
    """Packages whose cache entry is gone (``conda clean``): conda-pack then sees only the installed files.

    Their placeholders come from conda-meta ``paths_data`` instead: a text file is recorded with the prefix
    it was installed at (``prefix``; text replacement works at any length); a binary file must go into the
    archive as the package had it (placeholder + NUL padding), so conda-unpack has room for a longer path:
    returns {target: placeholder} of the binary files to restore while packing.
    """
    restore: dict[str, str] = {}
    if not any(f.is_conda and f.file_mode == "unknown" for f in files):
        return restore
    known: dict[str, tuple[str | None, str | None]] = {}
    for p in (prefix / "conda-meta").glob("*.json"):
        meta = json.loads(p.read_text())
        for e in (meta.get("paths_data") or {}).get("paths", []):
            known[e["_path"]] = (e.get("prefix_placeholder"), e.get("file_mode"))
    for f in files:
        if not (f.is_conda and f.file_mode == "unknown" and f.target in known):
            continue
        placeholder, mode = known[f.target]
        if not placeholder:
            f.prefix_placeholder, f.file_mode = None, None
        elif mode == "binary":
            f.prefix_placeholder, f.file_mode = placeholder, "binary"
            restore[f.target] = placeholder
        else:
            f.prefix_placeholder, f.file_mode = str(prefix), "text"
    return restore



def pack_env(built: BuiltEnv, dest: Path, *, level: int = 3, threads: int = 0) -> PackResult:
    """Write ``dest`` (.tar.zst) atomically; ``threads=0`` uses every core (like ``zstd -T0``)."""
    import zstandard
    from conda_pack.core import BIN_DIR, Packer, rewrite_conda_meta, rewrite_shebang

    t0 = time.monotonic()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(built.prefix)
    prefix_b = prefix.encode()
    files, restore = load_env_files(built)
    records: list[tuple[str, str, str]] = []
    packages: list[dict] = []
    buf = bytearray(CHUNK)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            hw = _FrameHasher(raw)
            cctx = zstandard.ZstdCompressor(level=level, threads=threads if threads > 0 else -1,
                                            write_checksum=True)
            with cctx.stream_writer(hw, write_size=CHUNK, closefd=False) as zw:
                tar = TarStream(zw)
                frame_start = 0

                def frame_boundary(force: bool = False) -> None:
                    nonlocal frame_start
                    if tar.offset > frame_start and (force or tar.offset - frame_start >= FRAME_BYTES):
                        zw.flush(zstandard.FLUSH_FRAME)
                        hw.end_frame()
                        frame_start = tar.offset

                # frame 0: directories and symlinks; every later frame: regular files only (parallel-safe)
                kinds = {f.target: _kind(f.source) for f in files}
                for f in files:
                    if kinds[f.target] != "file":
                        _add(tar, f, prefix, prefix_b, buf, records, packages, BIN_DIR, rewrite_conda_meta,
                             rewrite_shebang)
                frame_boundary(force=True)
                for f in files:
                    if kinds[f.target] != "file":
                        continue
                    frame_boundary()
                    if f.target in restore:
                        _add_restored(tar, f, prefix_b, restore[f.target], records)
                        continue
                    _add(tar, f, prefix, prefix_b, buf, records, packages, BIN_DIR, rewrite_conda_meta,
                         rewrite_shebang)
                capture = _Capture()
                packer = Packer(prefix, capture)
                packer.prefixes, packer.packages = records, packages
                packer.finish()
                for target in sorted(capture.entries):
                    frame_boundary()
                    data, mode = capture.entries[target]
                    tar.add_bytes(target, data, mode)
                tar.close()
            hw.end_frame()
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return PackResult(dest, hw.whole.sha.hexdigest(), hw.whole.size, tar.data_bytes, tar.members,
                      time.monotonic() - t0, frames=tuple(hw.frames))


def _kind(path: str) -> str:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "file"  # _add reports it
    return "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"


def _add_restored(tar: TarStream, f, prefix_b: bytes, placeholder: str, records: list) -> None:
    """Stream ``f`` into the archive with its package placeholder put back (bounded memory: one chunk
    plus the C string being rewritten, whatever the file's size)."""
    try:
        with open(f.source, "rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            r = PlaceholderRestorer(prefix_b, placeholder.encode())

            def chunks():
                while chunk := fh.read(CHUNK):
                    yield r.feed(chunk)
                yield r.finish()

            tar.add_stream(f.target, chunks(), st.st_size, st.st_mode, what=f.source)
    except ValueError as e:
        raise EnvironmentBuildError(
            f"{f.source}: cannot restore the package's prefix placeholder ({e})",
            hint="the environment was moved after it was installed, or its package cache was cleaned and the "
            "file changed; reinstall the package (or keep the conda package cache) and pack again") from e
    records.append((f.target, placeholder, "binary"))


def _add(tar: TarStream, f, prefix: str, prefix_b: bytes, buf: bytearray, records: list, packages: list,
         bin_dir: str, rewrite_conda_meta, rewrite_shebang) -> None:
    target = f.target
    try:
        st = os.lstat(f.source)
    except FileNotFoundError as e:
        raise EnvironmentBuildError(f"{f.source} disappeared while packing",
                                    hint="do not modify the environment while packing it") from e
    if stat.S_ISLNK(st.st_mode):
        tar.add_symlink(target, _link_target(prefix, target, os.readlink(f.source)))
        return
    if stat.S_ISDIR(st.st_mode):
        tar.add_dir(target)
        return
    if not stat.S_ISREG(st.st_mode):
        raise EnvironmentBuildError(f"{f.source}: not a regular file, link or directory; cannot pack it",
                                    hint="remove device files, sockets and FIFOs from the environment")
    mode = f.file_mode
    if mode is None:
        if target.startswith("conda-meta/") and target.endswith(".json"):
            data, meta = rewrite_conda_meta(f.source)
            packages.append(meta)
            tar.add_bytes(target, data, st.st_mode)
        else:
            tar.add_file(target, f.source, st.st_size, st.st_mode, buf)
        return
    in_bin = target.startswith(bin_dir + "/")
    if mode in ("text", "binary") and not (mode == "text" and in_bin):
        tar.add_file(target, f.source, st.st_size, st.st_mode, buf)
        records.append((target, f.prefix_placeholder, mode))
        return
    if in_bin and st.st_size <= TEXT_IN_MEMORY_MAX:
        # a script in bin/: conda-pack rewrites a shebang into the prefix to `#!/usr/bin/env pythonX.Y`
        with open(f.source, "rb") as fh:
            data = fh.read()
        placeholder = f.prefix_placeholder if mode == "text" else prefix
        if mode == "text" or _is_text(data):
            data, fixed = rewrite_shebang(data, target, placeholder)
            if not fixed and (mode == "text" or placeholder.encode() in data):
                records.append((target, placeholder, "text"))
        tar.add_bytes(target, data, st.st_mode)
        return
    # unmanaged (pip) file, one pass: stream it while checking for text and the build prefix
    watch = _Watch(prefix_b)
    tar.add_file(target, f.source, st.st_size, st.st_mode, buf, watch=watch)
    watch.finish()
    if mode == "text":
        records.append((target, f.prefix_placeholder, "text"))
    elif watch.text and watch.has_prefix:
        records.append((target, prefix, "text"))


def _is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _link_target(prefix: str, member: str, link: str) -> str:
    """Keep relative links inside the env; make absolute links into the prefix relative; refuse the rest."""
    if os.path.isabs(link):
        if link != prefix and not link.startswith(prefix + "/"):
            raise EnvironmentBuildError(
                f"{prefix}/{member} is a symlink to {link}, outside the environment",
                hint="replace it with a copy of the file or a relative link inside the environment")
        return os.path.relpath(link, os.path.join(prefix, os.path.dirname(member)))
    resolved = os.path.normpath(os.path.join(os.path.dirname(member), link))
    if resolved == ".." or resolved.startswith("../") or os.path.isabs(resolved):
        raise EnvironmentBuildError(
            f"{prefix}/{member} is a symlink to {link}, which leaves the environment",
            hint="replace it with a copy of the file or a relative link inside the environment")
    return link


def cached_pack(built: BuiltEnv, cache_dir: Path, *, level: int = 3, threads: int = 0) -> PackResult:
    """Pack into ``cache_dir/<name>-<content_hash[:16]>.tar.zst`` unless an intact one is already there.

    A record (``.json`` beside the archive) holds size and sha256; the archive is reused when its size and
    mtime still match the record (no re-hash of gigabytes on every build).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{built.spec.name}-{built.content_hash[:16]}"
    # one pack of an environment at a time: a second build on this host waits, then reuses the archive
    with open(cache_dir / f".{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cached_pack_locked(built, cache_dir, stem, level=level, threads=threads)


def _cached_pack_locked(built: BuiltEnv, cache_dir: Path, stem: str, *, level: int, threads: int) -> PackResult:
    path, rec_path = cache_dir / f"{stem}.tar.zst", cache_dir / f"{stem}.json"
    if path.is_file() and rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
            st = path.stat()
            if (rec["content_hash"] == built.content_hash and rec["size"] == st.st_size
                    and rec["mtime_ns"] == st.st_mtime_ns and rec.get("frames")):
                return PackResult(path, rec["sha256"], rec["size"], rec["unpacked_size"], rec["files"], 0.0, True,
                                  frames=tuple(tuple(x) for x in rec["frames"]))
        except (OSError, ValueError, KeyError):
            pass
    res = pack_env(built, path, level=level, threads=threads)
    rec = {"content_hash": built.content_hash, "sha256": res.sha256, "size": res.size,
           "unpacked_size": res.unpacked_size, "files": res.files, "mtime_ns": path.stat().st_mtime_ns,
           "frames": [list(x) for x in res.frames]}
    tmp = rec_path.with_name(rec_path.name + ".tmp")
    tmp.write_text(json.dumps(rec, sort_keys=True, indent=1) + "\n")
    os.replace(tmp, rec_path)
    for old in cache_dir.glob(f"{built.spec.name}-*.tar.zst"):  # keep one packed version per env
        if old != path:
            old.unlink(missing_ok=True)
            old.with_suffix("").with_suffix(".json").unlink(missing_ok=True)
            (cache_dir / f".{old.name.removesuffix('.tar.zst')}.lock").unlink(missing_ok=True)
    return res
