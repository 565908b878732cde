"""Pack a conda environment fast, with conda-pack's relocation semantics, and cut the installer runtime.

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

**cut_runtime** writes ``runtime/<env>.tar.gz``: the env's interpreter, the shared libraries it and its
extension modules load from the env, the stdlib (without tests, idlelib, tkinter, ensurepip, bytecode
caches) and the ``zstandard`` module, so ``install.sh`` can run the installer on a server without Python
or zstd. It runs relocated: ``<dir>/bin/python3.X -I`` from any directory.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from installer.errors import EnvironmentBuildError
from packager.elf import GLIBC_SONAMES, read_elf
from packager.envs import BuiltEnv, pip_args, run_env
from packager.tarball import HashingWriter, write_tar_gz

CHUNK = 1 << 20
TEXT_IN_MEMORY_MAX = 32 << 20  # unmanaged text files up to this size are held for shebang rewriting
EXCLUDE_TOP = {"CACHEDIR.TAG"}


@dataclass(frozen=True)
class PackResult:
    path: Path
    sha256: str
    size: int  # bytes of the archive
    unpacked_size: int  # bytes of the regular files it holds
    files: int  # members (files, links, empty dirs)
    seconds: float = 0.0
    reused: bool = False


# --------------------------------------------------------------------------------------------- tar writer


class _TarStream:
    """Minimal streaming tar writer (PAX headers via tarfile.TarInfo) over a binary sink."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.offset = 0
        self.mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
        self.members = 0
        self.data_bytes = 0

    def _header(self, ti: tarfile.TarInfo) -> None:
        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = self.mtime, 0, 0, "", ""
        buf = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self.sink.write(buf)
        self.offset += len(buf)
        self.members += 1

    def _pad(self, size: int) -> None:
        pad = -size % tarfile.BLOCKSIZE
        if pad:
            self.sink.write(b"\0" * pad)
        self.offset += size + pad
        self.data_bytes += size

    def add_bytes(self, name: str, data: bytes, mode: int) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode = tarfile.REGTYPE, len(data), _norm_mode(mode)
        self._header(ti)
        self.sink.write(data)
        self._pad(len(data))

    def add_stream(self, name: str, chunks, size: int, mode: int, *, what: str) -> None:
        """A regular file of exactly ``size`` bytes from an iterable of byte chunks (written as they come)."""
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode = tarfile.REGTYPE, size, _norm_mode(mode)
        self._header(ti)
        written = 0
        for chunk in chunks:
            if written + len(chunk) > size:
                raise EnvironmentBuildError(f"{what} grew while it was being packed",
                                            hint="do not modify the environment while packing it")
            self.sink.write(chunk)
            written += len(chunk)
        if written != size:
            raise EnvironmentBuildError(f"{what} shrank while it was being packed",
                                        hint="do not modify the environment while packing it")
        self._pad(size)

    def add_symlink(self, name: str, target: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
        self._header(ti)

    def add_dir(self, name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
        self._header(ti)

    def add_file(self, name: str, path: str, size: int, mode: int, buf: bytearray, watch=None) -> None:
        """Stream ``path`` (``size`` bytes per lstat) into the archive; ``watch(chunk_view)`` sees each chunk."""
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode = tarfile.REGTYPE, size, _norm_mode(mode)
        self._header(ti)
        view = memoryview(buf)
        left = size
        with open(path, "rb", buffering=0) as f:
            while left:
                n = f.readinto(view[:min(left, len(buf))])
                if not n:
                    raise EnvironmentBuildError(f"{path} shrank while it was being packed",
                                                hint="do not modify the environment while packing it")
                chunk = view[:n]
                self.sink.write(chunk)
                if watch is not None:
                    watch(chunk)
                left -= n
        self._pad(size)

    def close(self) -> None:
        self.sink.write(b"\0" * (tarfile.BLOCKSIZE * 2))
        self.offset += tarfile.BLOCKSIZE * 2
        rem = self.offset % tarfile.RECORDSIZE
        if rem:
            self.sink.write(b"\0" * (tarfile.RECORDSIZE - rem))


def _norm_mode(mode: int) -> int:
    return 0o755 if mode & 0o111 else 0o644


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


# --------------------------------------------------------------------------------------------- pack


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


RESTORE_MAX_STRING = 16 << 20  # bytes of one C string holding the prefix kept while looking for its NUL


class PlaceholderRestorer:
    """Streaming :func:`restore_placeholder`: ``feed(chunk) -> bytes`` then ``finish() -> bytes``.

    Memory stays at about one chunk plus the C string being rewritten (at most ``RESTORE_MAX_STRING``):
    outside a string only ``len(installed) - 1`` bytes are kept back (a prefix cut by a chunk boundary).
    The output has exactly the input's length. Raises ValueError where the one-shot version does.
    """

    def __init__(self, installed: bytes, placeholder: bytes) -> None:
        self.extra = len(placeholder) - len(installed)
        if self.extra < 0:
            raise ValueError("placeholder shorter than the installed prefix")
        if not installed or b"\0" in installed:
            raise ValueError("the installed prefix must be a non-empty C string")
        self.installed, self.placeholder = installed, placeholder
        self.pending = bytearray()  # unprocessed input
        self.string: bytearray | None = None  # original bytes of the C string being rewritten (from the prefix)
        self.absorb = 0  # NUL padding still to be dropped after a rewritten string
        self.offset = 0  # input offset of pending[0]

    def feed(self, chunk: bytes) -> bytes:
        self.pending += chunk
        return self._run(final=False)

    def finish(self) -> bytes:
        out = self._run(final=True)
        if self.absorb:
            raise ValueError(f"no NUL padding after the prefix at offset {self._string_start}")
        if self.string is not None:  # a prefix with no NUL after it before the end: left as it is
            out += bytes(self.string)
            self.string = None
        return out

    def _run(self, *, final: bool) -> bytes:
        out = bytearray()
        data, inst = self.pending, self.installed
        i = 0
        while i < len(data):
            if self.absorb:
                take = min(self.absorb, len(data) - i)
                if data[i:i + take].count(0) != take:
                    raise ValueError(f"no NUL padding after the prefix at offset {self._string_start}")
                self.absorb -= take
                i += take
                continue
            if self.string is not None:
                nul = data.find(b"\0", i)
                end = len(data) if nul < 0 else nul + 1
                self.string += data[i:end]
                i = end
                if nul >= 0:
                    s = bytes(self.string)
                    out += s.replace(inst, self.placeholder)
                    self.absorb = self.extra * s.count(inst)
                    self.string = None
                elif len(self.string) > RESTORE_MAX_STRING:
                    raise ValueError(f"the string holding the prefix at offset {self._string_start} is longer "
                                     f"than {RESTORE_MAX_STRING} bytes without a NUL")
                continue
            hit = data.find(inst, i)
            if hit < 0:
                keep = 0 if final else min(len(inst) - 1, len(data) - i)
                out += data[i:len(data) - keep]
                i = len(data) - keep
                break
            out += data[i:hit]
            self._string_start = self.offset + hit
            self.string = bytearray()
            i = hit
        self.offset += i
        del data[:i]
        return bytes(out)


def restore_placeholder(data: bytes, installed: bytes, placeholder: bytes) -> bytes:
    """Undo an installer's binary prefix replacement: ``installed`` + rest of the C string + NUL padding
    becomes ``placeholder`` + rest + NUL again (same length), as in the package. (One-shot form of
    :class:`PlaceholderRestorer`, which the packer streams files through.)"""
    r = PlaceholderRestorer(installed, placeholder)
    return r.feed(data) + r.finish()


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
            hw = HashingWriter(raw)
            cctx = zstandard.ZstdCompressor(level=level, threads=threads if threads > 0 else -1,
                                            write_checksum=True)
            with cctx.stream_writer(hw, write_size=CHUNK, closefd=False) as zw:
                tar = _TarStream(zw)
                for f in files:
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
                    data, mode = capture.entries[target]
                    tar.add_bytes(target, data, mode)
                tar.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return PackResult(dest, hw.sha.hexdigest(), hw.size, tar.data_bytes, tar.members, time.monotonic() - t0)


def _add_restored(tar: _TarStream, f, prefix_b: bytes, placeholder: str, records: list) -> None:
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


def _add(tar: _TarStream, f, prefix: str, prefix_b: bytes, buf: bytearray, records: list, packages: list,
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
    path, rec_path = cache_dir / f"{stem}.tar.zst", cache_dir / f"{stem}.json"
    if path.is_file() and rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
            st = path.stat()
            if (rec["content_hash"] == built.content_hash and rec["size"] == st.st_size
                    and rec["mtime_ns"] == st.st_mtime_ns):
                return PackResult(path, rec["sha256"], rec["size"], rec["unpacked_size"], rec["files"], 0.0, True)
        except (OSError, ValueError, KeyError):
            pass
    res = pack_env(built, path, level=level, threads=threads)
    rec = {"content_hash": built.content_hash, "sha256": res.sha256, "size": res.size,
           "unpacked_size": res.unpacked_size, "files": res.files, "mtime_ns": path.stat().st_mtime_ns}
    tmp = rec_path.with_name(rec_path.name + ".tmp")
    tmp.write_text(json.dumps(rec, sort_keys=True, indent=1) + "\n")
    os.replace(tmp, rec_path)
    for old in cache_dir.glob(f"{built.spec.name}-*.tar.zst"):  # keep one packed version per env
        if old != path:
            old.unlink(missing_ok=True)
            old.with_suffix("").with_suffix(".json").unlink(missing_ok=True)
    return res


# --------------------------------------------------------------------------------------------- runtime

RUNTIME_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo",
                     "ensurepip", "__pycache__", "lib2to3"}
RUNTIME_SKIP_PREFIXES = ("config-",)
RUNTIME_SKIP_MODULES = ("_tkinter", "_test", "xxlimited", "xxsubtype", "_xxtestfuzz", "_ctypes_test")


def cut_runtime(built: BuiltEnv, dest: Path) -> PackResult:
    """Write ``dest`` (runtime/<env>.tar.gz): python + needed env libs + stdlib + zstandard."""
    t0 = time.monotonic()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = built.prefix
    py = f"python{built.python_short}"
    interp = prefix / "bin" / py
    stdlib = prefix / "lib" / py
    if not interp.exists() or not (stdlib / "os.py").is_file():
        raise EnvironmentBuildError(f"environment {built.spec.name}: no {py} interpreter/stdlib in {prefix}",
                                    hint="the first environment must contain python")
    entries: dict[str, Path] = {f"bin/{py}": interp.resolve()}
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel = Path(dirpath).relative_to(stdlib)
        dirnames[:] = sorted(d for d in dirnames
                             if d not in RUNTIME_SKIP_DIRS and not (rel == Path(".") and
                                                                   d.startswith(RUNTIME_SKIP_PREFIXES)))
        for fn in filenames:
            if fn.endswith((".pyc", ".pyo")) or (rel.name == "lib-dynload" and fn.startswith(RUNTIME_SKIP_MODULES)):
                continue
            src = Path(dirpath, fn)
            if src.is_file():
                entries[f"lib/{py}/{(rel / fn).as_posix()}"] = src.resolve()
    with tempfile.TemporaryDirectory(prefix="llm-runtime-") as tmp:
        zst_dir = _zstandard_source(built, Path(tmp))
        for dirpath, dirnames, filenames in os.walk(zst_dir / "zstandard"):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fn in filenames:
                if not fn.endswith((".pyc", ".pyo")):
                    src = Path(dirpath, fn)
                    entries[f"lib/{py}/site-packages/{src.relative_to(zst_dir).as_posix()}"] = src.resolve()
        for soname, src in _needed_env_libs(prefix, [p for a, p in entries.items() if _elfish(a)]).items():
            entries[f"lib/{soname}"] = src
        wf = write_tar_gz(dest, sorted(entries.items()), level=6)
        unpacked = sum(p.stat().st_size for p in entries.values())
    return PackResult(wf.path, wf.sha256, wf.size, unpacked, len(entries), time.monotonic() - t0)


def _elfish(arcname: str) -> bool:
    return arcname.startswith("bin/") or arcname.endswith(".so") or ".so." in arcname


def _zstandard_source(built: BuiltEnv, tmp: Path) -> Path:
    """A directory holding the ``zstandard`` package for the env's python (the env's own, else pip --target)."""
    site = built.prefix / "lib" / f"python{built.python_short}" / "site-packages"
    if (site / "zstandard" / "__init__.py").is_file():
        return site
    target = tmp / "zstd"
    run_env(built.prefix, ["-m", "pip", "install", "--no-warn-script-location", "--no-compile", "--target",
                           str(target), *pip_args(built.spec.pip), "zstandard"],
            progress=False, what=f"environment {built.spec.name}: pip install --target zstandard (installer runtime)",
            hint="the installer runtime needs the zstandard module: make it installable (index or find_links), "
            "or add zstandard to the environment's pip: packages")
    return target


def _needed_env_libs(prefix: Path, elf_files: list[Path]) -> dict[str, Path]:
    """Shared libraries (by soname) from ``<prefix>/lib`` that ``elf_files`` load, transitively."""
    libdir = prefix / "lib"
    found: dict[str, Path] = {}
    todo = list(elf_files)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        info = read_elf(path)
        if info is None:
            continue
        for lib in info.needed:
            if lib in found or lib in GLIBC_SONAMES:
                continue
            cand = libdir / lib
            if cand.exists():
                found[lib] = cand.resolve()
                todo.append(found[lib])
    return found
