"""A split bundle installs straight from its volumes, with no scratch copy of the bundle (real install.sh runs).

One real bundle (the test conda environment packed in independent zstd frames, as ``pack build`` writes it, the
installer runtime cut from it, a 48 MB model) is split with ``pack split`` into volumes small enough that the
environment and the model span several of them, and installed with ``install.sh --root``:

- the work directory (a dedicated ``TMPDIR``, watched while the install runs) only ever holds what install.sh
  itself runs: MANIFEST.json and its signature, SPLIT.json, install.sh, the installer and the runtime; never a
  byte of an environment or a model;
- the I/O of the install's whole process tree (``/proc/self/io`` of the test around the run: a reaped child's
  counts are added to its parent's) is measured: bytes read from storage ≈ the bundle (the volumes' page cache
  is dropped first), bytes written ≈ what is installed plus the bootstrap in the work directory;
- a corrupted piece on volume 2 (of the environment or the model) is refused, naming the volume and the piece,
  with nothing installed; a missing volume is named with how to continue, and the same command continues
  (what was verified is kept); a volume rewritten after the checks (bytes and VOLUME.sha256 both) is caught by
  the artifact's own hash; volumes mounted one at a time are asked for on a terminal.
"""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pty
import re
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from installer.sizes import human_size
from packager.env import pack as pack_mod
from packager.env.pack import pack_env
from packager.split import split_bundle
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    BundleSpec,
    EnvParts,
    keys,  # noqa: F401
    make_bundle,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
    tree_snapshot,
)

pytestmark = pytest.mark.timeout(900)

MODEL = "models/tiny/model.safetensors"
WEIGHTS = 48 << 20
BOOTSTRAP_NAMES = re.compile(r"llm-install\.[A-Za-z0-9]+(/(keys(/[0-9]+\.pub)?|install\.sh|members\.[A-Za-z0-9]+"
                             r"(\.err)?|verified(/(MANIFEST\.json(\.sig)?|SPLIT\.json|installer\.tar\.gz|runtime"
                             r"(/t1\.tar\.gz)?))?|installer(/.*)?|runtime(/.*)?))?"
                             # the installer's runtime has no `cryptography`: openssl checks the signature of the
                             # MANIFEST from a short-lived directory of the message, the signature and the key
                             r"|llm-sig-[A-Za-z0-9_]+(/(msg|sig|key\.pub))?")


@pytest.fixture(scope="module")
def framed(built_env, t1_parts, tmp_path_factory) -> EnvParts:
    """The test environment packed as `pack build` does (independent zstd frames, listed in MANIFEST.json),
    with small frames: many of them cross a piece boundary."""
    mp = pytest.MonkeyPatch()
    mp.setattr(pack_mod, "FRAME_BYTES", 256 << 10)
    try:
        packed = pack_env(built_env, tmp_path_factory.mktemp("framed") / "t1.tar.zst")
    finally:
        mp.undo()
    frames = [{"offset": o, "size": n, "sha256": h} for o, n, h in packed.frames]
    assert len(frames) > 20
    return dataclasses.replace(t1_parts, archive=packed.path, entry=dict(t1_parts.entry, frames=frames))


@pytest.fixture(scope="module")
def big(framed, keys, tmp_path_factory) -> Path:
    weights = hashlib.shake_256(b"weights").digest(WEIGHTS)
    return make_bundle(tmp_path_factory.mktemp("bigsplit"),
                       BundleSpec(version="1.0.0", env=framed, models=[tiny_model(weights=weights)],
                                  services=[service()]), keys)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    return r


def install_sh(first: Path, root: Path, pub: Path, tmpdir: Path, *args: str | Path, script: Path | None = None,
               **kw) -> subprocess.CompletedProcess:
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "TMPDIR": str(tmpdir)}
    cmd = ["bash", str(script or first / "install.sh"), "--root", str(root), "--pubkey", str(pub),
           *([] if script is None else ["--bundle", str(first)]), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600,
                          check=False, **kw)


def proc_io() -> dict[str, int]:
    """This process's /proc/self/io: its own I/O plus that of every child it has reaped (and theirs)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (ln.split(": ") for ln in f.read().splitlines())}


def drop_cache(dirs: list[Path]) -> None:
    """Drop the page cache of the volumes' files only (so that reading them is a read from storage)."""
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file() and not p.is_symlink():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def du(p: Path) -> int:
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.exists() else 0


class Watch(threading.Thread):
    """Polls a directory while the install runs: the largest total it ever held and every path seen in it."""

    def __init__(self, d: Path) -> None:
        super().__init__(daemon=True)
        self.d, self.done, self.peak, self.seen, self.polls = d, threading.Event(), 0, set(), 0

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            for dirpath, dirnames, files in os.walk(self.d):
                for n in dirnames + files:
                    p = Path(dirpath, n)
                    self.seen.add(p.relative_to(self.d).as_posix())
                    if n in files:
                        try:
                            total += p.lstat().st_size
                        except OSError:
                            pass
            self.peak = max(self.peak, total)
            self.polls += 1
            self.done.wait(0.05)


def placed(root: Path) -> dict[str, str]:
    return {k: v for k, v in tree_snapshot(root).items() if k.split("/")[0] in ("opt", "etc")}


def pieces_of(first: Path) -> list[dict]:
    return json.loads((first / "SPLIT.json").read_bytes())["pieces"]


def test_installs_from_its_volumes_with_no_scratch_copy(big, keys, root, tmp_path):
    vols = split_bundle(big, tmp_path / "usb", "8M")
    m = json.loads((big / "MANIFEST.json").read_bytes())
    arts = {a["path"]: a for a in m["artifacts"]}
    pieces = pieces_of(vols[0])
    env_vols = {p["volume"] for p in pieces if p["file"] == "envs/t1.tar.zst"}
    model_vols = {p["volume"] for p in pieces if p["file"] == MODEL}
    assert len(env_vols) >= 3 and len(model_vols) >= 5, (env_vols, model_vols)
    cuts = {p["offset"] for p in pieces if p["file"] == "envs/t1.tar.zst"}
    frames = m["environments"][0]["frames"]
    assert any(f["offset"] < c < f["offset"] + f["size"] for f in frames for c in cuts), "a frame spans pieces"
    bundle_bytes = sum(a["size"] for a in m["artifacts"]) + sum(
        (big / n).stat().st_size for n in ("MANIFEST.json", "MANIFEST.json.sig"))
    data_bytes = sum(a["size"] for a in m["artifacts"] if a["kind"] in ("environment", "model"))

    drop_cache(vols)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    watch = Watch(tmpdir)
    watch.start()
    before = proc_io()
    r = install_sh(vols[0], root, keys.pub, tmpdir)
    after = proc_io()
    watch.done.set()
    watch.join()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "demo 1.0.0 is active" in r.stdout and "nothing is joined" in r.stderr
    io = {k: after[k] - before[k] for k in before}

    # the work directory held what install.sh runs, and nothing else, and is gone
    assert not list(tmpdir.iterdir()), "the work directory is removed"
    assert watch.polls > 10 and watch.seen, "the watcher saw the install's work directory"
    others = sorted(p for p in watch.seen if not BOOTSTRAP_NAMES.fullmatch(p))
    assert not others, f"not a bootstrap file: {others[:10]}"
    assert not any(p.endswith((".tar.zst", ".safetensors")) or "/envs/" in p or "/models/" in p for p in watch.seen)
    runtime = du(root / "opt/llm/runtime/current/")
    installer_pkg = du(root / "opt/llm/installer/current/")
    bootstrap = arts["runtime/t1.tar.gz"]["size"] + arts["installer.tar.gz"]["size"] + runtime + installer_pkg
    assert watch.peak <= bootstrap + (4 << 20), (watch.peak, bootstrap)
    assert watch.peak - bootstrap < data_bytes / 10

    # I/O of the whole process tree: the bundle read once, what is installed written once (plus the bootstrap)
    installed = du(root / "opt/llm")
    assert 0.95 * bundle_bytes <= io["read_bytes"] <= 1.1 * bundle_bytes + (16 << 20), (io, bundle_bytes)
    assert installed <= io["write_bytes"] <= installed + watch.peak + data_bytes / 10 + (16 << 20), (io, installed)
    assert f"read {human_size(data_bytes)} of the environments and models ({human_size(data_bytes)}) from " \
           f"{len(vols)} volumes in place" in r.stdout
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("I/O of this install"))
    print(f"split bundle {bundle_bytes / 1e6:.1f} MB in {len(vols)} volumes (data {data_bytes / 1e6:.1f} MB); "
          f"installed {installed / 1e6:.1f} MB; work dir peak {watch.peak / 1e6:.1f} MB (bootstrap "
          f"{bootstrap / 1e6:.1f} MB); process tree: read_bytes {io['read_bytes'] / 1e6:.1f} MB, write_bytes "
          f"{io['write_bytes'] / 1e6:.1f} MB, rchar {io['rchar'] / 1e6:.1f} MB, wchar {io['wchar'] / 1e6:.1f} MB"
          f"\n  install.sh said: {line}")


@pytest.mark.parametrize("kind", ["environment", "model"])
def test_a_corrupted_piece_on_volume_2_is_refused_and_nothing_installed(kind, big, keys, root, tmp_path):
    vols = split_bundle(big, tmp_path / "usb", "40M")
    file = "envs/t1.tar.zst" if kind == "environment" else MODEL
    piece = next(p for p in pieces_of(vols[0]) if p["file"] == file and p["volume"] == 2)
    assert piece["name"] != file, "cut into pieces"
    path = vols[1] / piece["name"]
    with open(path, "r+b") as f:
        f.seek(piece["size"] // 2)
        b = f.read(1)
        f.seek(piece["size"] // 2)
        f.write(bytes([b[0] ^ 0x20]))
    before = placed(root)
    r = install_sh(vols[0], root, keys.pub, tmp_path / "tmp")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(rf"error: {re.escape(file)}( \(part \d+, bytes \d+-\d+\))?: sha256 mismatch", r.stderr), r.stderr
    assert f"volume 2 ({vols[1]}): {piece['name']} is corrupted (sha256 mismatch)" in r.stderr, r.stderr
    assert "copy volume 2 again" in r.stderr and "nothing under /opt/llm or /etc was changed" in r.stderr
    assert placed(root) == before
    assert not list((tmp_path / "tmp").iterdir())


def test_a_missing_volume_is_named_and_the_same_command_continues(big, keys, root, tmp_path):
    vols = split_bundle(big, tmp_path / "usb", "40M")
    assert len(vols) == 3
    shelf = tmp_path / "shelf"
    shutil.move(vols[2], shelf / vols[2].name)
    before = placed(root)
    r = install_sh(vols[0], root, keys.pub, tmp_path / "tmp")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: volume 3 of 3 ({vols[2].name}) not found" in r.stderr, r.stderr
    assert f"mount {vols[2].name} beside {vols[0]} (or pass the directory holding it with --volumes DIR), then " \
           "run the same command again" in r.stderr
    assert "what was verified is kept in" in r.stderr and placed(root) == before
    # the same command, with the volume where it can be found now: the environment is not read again
    r = install_sh(vols[0], root, keys.pub, tmp_path / "tmp", "--volumes", shelf)
    assert r.returncode == 0, r.stderr
    assert "environment t1: verified and unpacked by an earlier run (reused)" in r.stdout
    m = json.loads((big / "MANIFEST.json").read_bytes())
    model_bytes = m["models"][0]["size"]
    assert f"read {human_size(model_bytes)} of the environments and models" in r.stdout, r.stdout
    assert (root / "opt/llm/models/tiny").is_dir() and "demo 1.0.0 is active" in r.stdout


def test_a_volume_rewritten_after_the_checks_is_caught_by_the_artifact_hash(big, keys, root, tmp_path):
    """After install.sh and the installer's own look at the volumes, volume 3's model piece is rewritten in place
    with other bytes of the same size, and its VOLUME.sha256 with them: nothing on the volumes can tell, but
    the model's sha256 in the signed MANIFEST.json covers the bytes that are read."""
    vols = split_bundle(big, tmp_path / "usb", "40M")
    piece = next(p for p in pieces_of(vols[0]) if p["file"] == MODEL and p["volume"] == 3)
    target = vols[2] / piece["name"]
    evil = os.urandom(piece["size"])
    swapped = threading.Event()

    def swap_when_the_installer_starts() -> None:
        while not (root / "var/lib/llm").exists():  # the installer's lock: after every check, before any copy
            if done.wait(0.002):
                return
        with open(target, "r+b") as f:
            f.write(evil)
        index = vols[2] / "VOLUME.sha256"
        index.write_text("".join(
            f"{hashlib.sha256(evil).hexdigest()}  {piece['name']}\n" if ln.endswith(f"  {piece['name']}") else
            ln + "\n" for ln in index.read_text().splitlines()))
        swapped.set()

    done = threading.Event()
    t = threading.Thread(target=swap_when_the_installer_starts)
    t.start()
    before = placed(root)
    try:
        r = install_sh(vols[0], root, keys.pub, tmp_path / "tmp")
    finally:
        done.set()
        t.join()
    assert swapped.is_set()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {MODEL}: sha256 mismatch" in r.stderr, r.stderr
    assert placed(root) == before
    assert not any(hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(evil).digest()
                   for p in root.rglob("*.safetensors*") if p.is_file())


def test_volumes_mounted_one_at_a_time_are_asked_for_on_a_terminal(big, keys, root, tmp_path):
    """One drive: volume 1 is mounted, the others wait on the shelf. install.sh runs from a copy (bash reads its
    script as it goes: the drive could not be unmounted under it); on its terminal the installer asks for each
    volume when it needs it, and the test swaps the media: every volume is read once, in turn."""
    vols = split_bundle(big, tmp_path / "usb", "40M")
    shelf, drive = tmp_path / "shelf", tmp_path / "drive"
    shelf.mkdir()
    for v in vols:
        shutil.move(v, shelf / v.name)
    drive.mkdir()
    shutil.move(shelf / vols[0].name, drive / vols[0].name)
    script = tmp_path / "bin" / "install.sh"
    script.parent.mkdir()
    shutil.copy(drive / vols[0].name / "install.sh", script)
    master, slave = pty.openpty()
    out = open(tmp_path / "stdout", "w+")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "TMPDIR": str(tmp_path / "tmp"),
           "TERM": "dumb"}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(["bash", str(script), "--bundle", str(drive / vols[0].name), "--root", str(root),
                             "--pubkey", str(keys.pub)], stdin=slave, stdout=out, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    text, asked = "", []
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536).decode(errors="replace")
                except OSError:
                    break  # the terminal's other side closed: the install ended
                if not chunk:
                    break
                text += chunk
                wants = re.findall(r"volume \d+ of \d+ \((\S+)\) is needed now", text)
                if len(wants) > len(asked):
                    name = wants[len(asked)]
                    for d in drive.iterdir():  # the drive holds one medium: take it out, put the next one in
                        shutil.move(d, shelf / d.name)
                    shutil.move(shelf / name, drive / name)
                    asked.append(name)
                    os.write(master, b"\n")
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    out.seek(0)
    stdout = out.read()
    out.close()
    assert rc == 0, text[-3000:]
    assert asked == [vols[1].name, vols[2].name], (asked, text[-2000:])
    assert "demo 1.0.0 is active" in stdout
    model = root / "opt/llm/models/tiny" / ("1" * 40) / "model.safetensors"
    assert hashlib.sha256(model.read_bytes()).hexdigest() == hashlib.sha256(
        hashlib.shake_256(b"weights").digest(WEIGHTS)).hexdigest()
    print(f"one drive, {len(vols)} volumes: asked for {asked} in turn; installed")
