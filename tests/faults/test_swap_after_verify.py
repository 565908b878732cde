"""R5b swap-after-verify: bytes changed on the bundle's disk after they were hashed are never used.

Whoever can write the bundle's medium (a shared directory, a USB disk) gets a window between "hashed" and
"used" if the installer reads a file twice. Here a wrapper for ``sha256sum`` or ``tar``, first on PATH,
runs the real tool and then rewrites files on the medium in place (the same inode, so even an open reader
sees the new bytes): ``installer.tar.gz`` and ``runtime/*.tar.gz`` replaced by validly packed hostile
archives (their code would drop a marker file, running as root), and a model file by different bytes of the
same size. A watcher thread also flips the model file back and forth while the Python installer copies it.
The install must then either install exactly the verified content or refuse; no marker may appear and no
swapped byte may land on the target.
"""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from installer.bundle import INSTALLER_ARCHIVE, MANIFEST_NAME, SIGNATURE_NAME
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    INSTALLER_PKG,
    BundleSpec,
    keys,  # noqa: F401
    make_bundle,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
)

pytestmark = pytest.mark.timeout(900)

INSTALL_SH = INSTALLER_PKG / "bootstrap" / "install.sh"
MODEL = "models/tiny/model.safetensors"
MODEL_SIZE = 8 << 20

SWAP_LIB = r'''
# swap_after PATH: PATH was just read by the real tool; rewrite the medium's copy of that artifact in place
swap_after() {
    local src=$1 rel
    for rel in $SWAP_TARGETS; do
        case "$src" in
        */"$rel")
            if [ ! -e "$SWAP_STATE/$(echo "$rel" | tr / _)" ]; then
                : >"$SWAP_STATE/$(echo "$rel" | tr / _)"
                cat "$SWAP_EVIL/$rel" >"$SWAP_MEDIUM/$rel"       # same inode: in place
                if [ "$rel" = "$SWAP_WITH_MODEL_AFTER" ]; then
                    cat "$SWAP_EVIL/$SWAP_MODEL" >"$SWAP_MEDIUM/$SWAP_MODEL"
                fi
                echo "swapped $rel after $SWAP_TOOL read $src" >>"$SWAP_STATE/log"
            fi
            ;;
        esac
    done
}
'''

WRAPPERS = {
    # sha256sum reads its input on stdin in install.sh: which file it was is /proc/self/fd/0
    "sha256sum": r'''#!/bin/bash
SWAP_TOOL=sha256sum
source "$SWAP_STATE/lib.sh"
src=$(readlink -f /proc/$$/fd/0 2>/dev/null || true)
/usr/bin/sha256sum "$@"
rc=$?
swap_after "$src"
exit $rc
''',
    # tar: after the member listing (-t) and before the extraction (-x) of the same archive
    "tar": r'''#!/bin/bash
SWAP_TOOL=tar
source "$SWAP_STATE/lib.sh"
/usr/bin/tar "$@"
rc=$?
listing=0
for a in "$@"; do case "$a" in -t* | --list) listing=1 ;; esac; done
if [ "$listing" = 1 ]; then swap_after "${!#}"; fi
exit $rc
''',
}


def pad_to(data: bytes, size: int) -> bytes:
    """``data`` (a gzip stream of a tar) grown to exactly ``size`` bytes with a second gzip member of zeros
    (a valid multi-member gzip; zeros after the tar's end blocks are ignored), so that only the hash tells
    the swapped file from the good one."""
    rest = size - len(data)
    bulk = b""
    if rest > 4096:  # most of it in one stored member (5 bytes of overhead per 64 KiB block), the rest below
        bulk = gzip.compress(bytes(rest - 18 - 5 * (rest // 65535 + 2) - 200), compresslevel=0, mtime=0)
    for n in range(0, 4096):
        pad = gzip.compress(bytes(n), compresslevel=0, mtime=0)
        if len(data) + len(bulk) + len(pad) == size:
            return data + bulk + pad
    raise AssertionError(f"cannot pad {len(data)} bytes to {size}")


def _tar_gz(members: dict[str, tuple[bytes, int]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, (data, mode) in members.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), mode
            t.addfile(ti, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


@pytest.fixture(scope="module")
def good(tmp_path_factory, t1_parts, keys) -> Path:
    weights = bytes(range(256)) * (MODEL_SIZE // 256)
    return make_bundle(
        tmp_path_factory.mktemp("r5b"),
        BundleSpec(version="1.0.0", env=t1_parts, models=[tiny_model(weights=weights)], services=[service()]),
        keys,
    )


def medium_copy(good: Path, dest: Path, private: set[str]) -> Path:
    """The bundle as hard links, with the files an attacker rewrites as private copies (the fixture stays)."""
    for dirpath, _dirs, files in os.walk(good):
        rel = Path(dirpath).relative_to(good)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            (shutil.copy2 if (rel / f).as_posix() in private else os.link)(Path(dirpath, f), dest / rel / f)
    return dest


def evil_files(d: Path, good: Path, marker: Path, runtime_rel: str, runtime_py: str) -> Path:
    """Hostile replacements of the same sizes, each a well-formed archive whose code would leave ``marker``."""
    pwn = f"open({str(marker)!r}, 'a').write('pwned by the swapped installer\\n')\n"
    cli = f"{pwn}\ndef main(argv=None):\n    {pwn.strip()}\n    return 0\n".encode()
    files = {
        INSTALLER_ARCHIVE: _tar_gz({"installer/__init__.py": (b"", 0o644), "installer/cli.py": (cli, 0o644),
                                    "installer/__main__.py": (cli, 0o644)}),
        runtime_rel: _tar_gz({runtime_py: (f"#!/bin/sh\necho pwned by the swapped runtime >>{marker}\nexit 0\n"
                                           .encode(), 0o755)}),
        MODEL: os.urandom(MODEL_SIZE),
    }
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        size = (good / rel).stat().st_size
        (d / rel).write_bytes(data if len(data) == size else pad_to(data, size))
        assert (d / rel).stat().st_size == size
    return d


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def watch_and_flip(root: Path, model: Path, good_bytes: bytes, evil_bytes: bytes, done: threading.Event,
                   flips: list[int]) -> None:
    """Once the installer starts on the models (a models dir appears in its staging tree or /opt/llm), rewrite
    the medium's model in place, alternating evil and good content, until the install ends."""
    while not done.is_set():
        if any(p.name == "models" for base in (root / "var/lib/llm", root / "opt/llm") if base.exists()
               for p in base.rglob("models")):
            break
        done.wait(0.002)
    n = 0
    while not done.is_set():
        with open(model, "r+b") as f:
            f.write(evil_bytes if n % 2 == 0 else good_bytes)
        n += 1
        done.wait(0.001)
    with open(model, "r+b") as f:
        f.write(good_bytes)  # the medium ends as it began: the result must match what was verified
    flips.append(n)


@pytest.mark.parametrize(("tool", "swap_model"), [
    ("sha256sum", False), ("sha256sum", True), ("tar", False), ("tar", True), ("model-during-copy", True),
])
def test_swapped_on_the_medium_after_hashing_is_never_used(tool, swap_model, good, keys, tmp_path):
    m = json.loads((good / MANIFEST_NAME).read_bytes())
    runtime_rel, runtime_py = m["runtime"]["artifact"], m["runtime"]["python"]
    targets = {INSTALLER_ARCHIVE, runtime_rel, MODEL}
    medium = medium_copy(good, tmp_path / "medium" / good.name, targets | {MANIFEST_NAME, SIGNATURE_NAME})
    marker = tmp_path / "PWNED"
    evil = evil_files(tmp_path / "evil", good, marker, runtime_rel, runtime_py)
    state = tmp_path / "state"
    state.mkdir()
    (state / "lib.sh").write_text(SWAP_LIB)
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    if tool in WRAPPERS:
        (wrap / tool).write_text(WRAPPERS[tool])
        (wrap / tool).chmod(0o755)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    env = {
        "PATH": f"{wrap}:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "TMPDIR": str(tmp_path),
        "SWAP_STATE": str(state), "SWAP_EVIL": str(evil), "SWAP_MEDIUM": str(medium),
        "SWAP_TARGETS": f"{INSTALLER_ARCHIVE} {runtime_rel}", "SWAP_MODEL": MODEL,
        "SWAP_WITH_MODEL_AFTER": runtime_rel if swap_model else "-",
    }
    done = threading.Event()
    flips: list[int] = []
    watcher = None
    if tool == "model-during-copy":
        watcher = threading.Thread(target=watch_and_flip, args=(root, medium / MODEL, (good / MODEL).read_bytes(),
                                                                (evil / MODEL).read_bytes(), done, flips))
        watcher.start()
    try:
        r = subprocess.run(["bash", str(INSTALL_SH), "--bundle", str(medium), "--root", str(root), "--pubkey",
                            str(keys.pub), "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                           timeout=600, env=env, check=False)
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
    log = (state / "log").read_text() if (state / "log").exists() else ""
    if tool in WRAPPERS:
        # the swaps really happened, after the tool read the file and before the installer went on
        assert f"swapped {INSTALLER_ARCHIVE} after {tool}" in log and f"swapped {runtime_rel} after {tool}" in log, (
            log, r.stderr)
        assert (medium / INSTALLER_ARCHIVE).read_bytes() == (evil / INSTALLER_ARCHIVE).read_bytes()
    assert not marker.exists(), f"swapped code ran: {marker.read_text()}\n{r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    installed = tree_hashes(root / "opt/llm") if (root / "opt/llm").exists() else {}
    evil_model = hashlib.sha256((evil / MODEL).read_bytes()).hexdigest()
    assert evil_model not in installed.values(), "a swapped model file was installed"
    if r.returncode == 0:
        # installed: exactly the verified content
        assert "demo 1.0.0 is active" in r.stdout
        want = {hashlib.sha256((good / MODEL).read_bytes()).hexdigest()}
        assert want <= set(installed.values()), "the verified model is what was installed"
        cli = (root / "opt/llm/installer/current/installer/cli.py").read_bytes()
        assert cli == (INSTALLER_PKG / "cli.py").read_bytes(), "the verified installer was kept"
        outcome = "installed the verified bytes"
    else:
        # refused, naming a file that was swapped (the model; or a bootstrap archive, if the Python installer
        # checks the medium's copies again)
        swapped = [MODEL] if swap_model else []
        if tool in WRAPPERS:
            swapped += [INSTALLER_ARCHIVE, runtime_rel]
        assert any(f"{rel}: sha256 mismatch" in r.stderr for rel in swapped), r.stderr
        assert not (root / "opt/llm/models").exists() or not any((root / "opt/llm/models").rglob("*.safetensors"))
        outcome = "refused"
    swaps = len(log.splitlines()) + sum(flips)
    what = f"{tool}, model too" if swap_model else tool
    print(f"R5b swap-after-verify ({what}): {swaps} swaps on the medium after hashing -> {outcome}; "
          "no swapped byte used")
