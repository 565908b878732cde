"""The real systemd test target: boots, has no network, no python3/zstd, and systemd supervises units."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from devkit.nspawn import Container, ContainerCommandError, reap_stale
from devkit.nspawn.workdirs import base_dir
from tests.nspawn import fixtures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The shared fixtures (a conftest.py could load them with pytest_plugins instead).
nspawn_rootfs = fixtures.nspawn_rootfs
nspawn_container = fixtures.nspawn_container

REPO = Path(__file__).resolve().parent.parent

TICK_SCRIPT = """#!/bin/sh
echo "tick-loop started pid $$"
while true; do sleep 0.2; done
"""

TICK_UNIT = """[Unit]
Description=nspawn harness test: a loop that systemd must bring back

[Service]
ExecStart=/usr/local/bin/tick-loop
Restart=always
RestartSec=200ms
"""


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_boots_to_running_with_systemd_as_pid1(nspawn_container: Container) -> None:
    c = nspawn_container
    state = c.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded"), c.run("systemctl --failed", check=False).stdout
    assert c.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert c.timings["boot_s"] < 30
    # A realistic server: hostname resolves (vLLM's gloo needs it), libnuma is there.
    hostname = c.run(["hostname"]).stdout.strip()
    assert c.run(["getent", "hosts", hostname]).stdout.split()[0].startswith("127.")
    assert c.run("ldconfig -p | grep -c libnuma.so.1").stdout.strip() != "0"
    for tool in ("curl", "openssl", "tar", "gzip", "sha256sum", "ip", "ps", "useradd", "journalctl"):
        c.run(["sh", "-c", f"command -v {tool}"])


def test_no_network_but_loopback(nspawn_container: Container) -> None:
    links = nspawn_container.run(["ip", "-o", "link"]).stdout.strip().splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in links]
    assert names == ["lo"], links
    routes = nspawn_container.run(["ip", "route", "show"]).stdout.strip()
    assert routes == ""
    res = nspawn_container.run(["curl", "-sS", "-m", "3", "http://deb.debian.org/"], check=False)
    assert res.returncode != 0


def test_no_python_no_zstd(nspawn_container: Container) -> None:
    for tool in ("python3", "python", "zstd", "unzstd"):
        res = nspawn_container.run(["sh", "-c", f"command -v {tool}"], check=False)
        assert res.returncode != 0, f"{tool} must not be on the target: {res.stdout}"
    assert not nspawn_container.path("/usr/bin/python3").exists()


def test_run_env_is_clean_and_errors_carry_output(nspawn_container: Container) -> None:
    env = nspawn_container.run("env", env={"FOO": "bar"}).stdout.splitlines()
    assert "FOO=bar" in env
    assert not any(line.startswith("VIRTUAL_ENV=") or line.startswith("PYTEST_") for line in env)
    assert nspawn_container.run("pwd", cwd="/etc").stdout.strip() == "/etc"
    with pytest.raises(ContainerCommandError) as ei:
        nspawn_container.run("echo to-stderr >&2; exit 3")
    assert ei.value.returncode == 3 and "to-stderr" in str(ei.value)


def test_run_timeout_kills_the_command_inside(nspawn_container: Container) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        nspawn_container.run("exec sleep 1234", timeout=1)
    # the kill is delivered at once but reaping is asynchronous: allow the kernel a moment
    deadline = time.monotonic() + 10
    while (left := nspawn_container.run("pgrep -x sleep || true").stdout.strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == ""


def test_systemd_restarts_a_killed_service_and_journal_has_it(nspawn_container: Container) -> None:
    c = nspawn_container
    c.write_file("/usr/local/bin/tick-loop", TICK_SCRIPT, mode=0o755)
    c.write_file("/etc/systemd/system/tick.service", TICK_UNIT)
    assert c.path("/etc/systemd/system/tick.service").read_text() == TICK_UNIT
    c.systemctl("daemon-reload")
    c.systemctl("start", "tick.service")
    assert c.show("tick.service", "ActiveState") == "active"
    pid1 = int(c.show("tick.service", "MainPID"))
    assert pid1 > 0

    c.run(["kill", "-9", str(pid1)])

    def restarted() -> int:
        pid = int(c.show("tick.service", "MainPID") or 0)
        active = c.show("tick.service", "ActiveState") == "active"
        return pid if active and pid not in (0, pid1) else 0

    pid2 = _wait(restarted, 15, "systemd to restart tick.service")
    assert int(c.show("tick.service", "NRestarts")) >= 1

    def logged() -> str:
        j = c.journal("tick.service")
        return j if f"tick-loop started pid {pid2}" in j else ""

    journal = _wait(logged, 10, "the restarted service's line in journalctl -u")
    assert f"tick-loop started pid {pid1}" in journal
    assert "status=9/KILL" in journal, journal


def test_copy_in_and_path(nspawn_container: Container, tmp_path: Path) -> None:
    c = nspawn_container
    src = tmp_path / "payload"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "data.bin").write_bytes(os.urandom(4096))
    os.symlink("sub/data.bin", src / "link")
    c.copy_in(src, "/opt/payload")
    host_view = c.path("/opt/payload/sub/data.bin")
    assert host_view.read_bytes() == (src / "sub" / "data.bin").read_bytes()
    assert c.run(["readlink", "/opt/payload/link"]).stdout.strip() == "sub/data.bin"
    assert c.run(["stat", "-c", "%U", "/opt/payload/sub/data.bin"]).stdout.strip() == "root"
    # path() resolves symlinks inside the rootfs, not on the host.
    assert c.path("/lib/systemd/systemd") == c.path("/usr/lib/systemd/systemd")
    assert c.path("/lib/systemd/systemd").is_file()


def test_readonly_bind_is_a_usb_disk(nspawn_rootfs: Path, tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    (usb / "bundle.part0").write_bytes(b"volume zero\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    binds = [(usb, "/media/usb", True), (scratch, "/srv/scratch", False)]
    tmpfs = ["--tmpfs=/tmp:mode=1777,size=64M"]
    with Container(nspawn_rootfs, binds=binds, name="usb-test", nspawn_args=tmpfs) as c:
        assert c.run("df -k --output=size /tmp | tail -1").stdout.strip() == str(64 * 1024)
        assert c.run(["cat", "/media/usb/bundle.part0"]).stdout == "volume zero\n"
        res = c.run("echo x > /media/usb/bundle.part0", check=False)
        assert res.returncode != 0 and "Read-only file system" in res.stderr
        res = c.run(["touch", "/media/usb/new"], check=False)
        assert res.returncode != 0
        c.run("echo written-inside > /srv/scratch/out")
    assert (usb / "bundle.part0").read_bytes() == b"volume zero\n"
    assert not (usb / "new").exists()
    assert (scratch / "out").read_text() == "written-inside\n"
    # Teardown deleted the container tree but not the bound host directories.
    assert c.dir is not None and not c.dir.exists()


@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "extracted"])
def test_stop_cleans_up_everything(nspawn_rootfs: Path, overlay: bool) -> None:
    c = Container(nspawn_rootfs, name="stop-test", overlay=overlay)
    c.start()
    c.wait_running(timeout=30)
    leader, tree = c.leader_pid, c.dir
    assert c.overlay is overlay
    c.run("echo kept > /root/marker")
    assert c.path("/root/marker").read_text() == "kept\n"
    c.run("nohup sleep 1000 >/dev/null 2>&1 &")
    c.stop()
    assert tree is not None and not tree.exists()
    assert not Path(f"/proc/{leader}").exists()
    assert c.timings["stop_s"] < 20


CRASHER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from devkit.nspawn import Container
    c = Container(Path(sys.argv[1]), name="crashed")
    c.start()
    c.wait_running(timeout=30)
    print(json.dumps({"dir": str(c.dir), "leader": c.leader_pid}), flush=True)
    os._exit(0)  # a crashed pytest: no stop(), no atexit
    """
)


def test_leftover_container_from_a_crashed_run_is_reaped(nspawn_rootfs: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CRASHER, str(nspawn_rootfs)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    tree, leader = Path(info["dir"]), info["leader"]
    assert tree.exists() and Path(f"/proc/{leader}").exists()  # really left behind, still running
    removed = reap_stale(base_dir())
    assert tree in removed
    assert not tree.exists()
    _wait(lambda: not Path(f"/proc/{leader}").exists(), 10, "the leftover container to die")


def test_changed_paths_records_what_was_written(nspawn_container: Container) -> None:
    c = nspawn_container
    assert c.overlay, "the overlay is the default where the kernel supports it"
    before = set(c.changed_paths())
    c.run("mkdir -p /opt/llm/envs/x && echo 1 > /opt/llm/envs/x/f && rm /etc/issue.net")
    after = set(c.changed_paths())
    assert {"/opt/llm", "/opt/llm/envs/x/f", "/etc/issue.net"} <= after - before
    assert "/etc/issue.net" not in before
    # The golden tree under the overlay is untouched.
    assert c._lower is not None and (c._lower / "etc" / "issue.net").exists()
