"""The fleet test's rig: three systemd-nspawn targets with sshd on a private bridge (devkit/nspawn/netns.py),
ansible-core installed offline from `pack fleet --with-ansible` wheels, playbooks run inside the admin
namespace (only the targets are reachable from there)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devkit.nspawn import SSH_PACKAGES, Container, ensure_rootfs
from devkit.nspawn.netns import Network

ROOT = Path(__file__).resolve().parents[2]
SMALL_DISK_HOST = "h3"  # its /opt/llm is a 400 MB tmpfs: the preflight refuses the 3.6 GB environment
PORTS = {"h1": 8001, "h2": 8002, "h3": 8003}


@dataclass
class Run:
    args: list[str]
    rc: int
    out: str
    seconds: float

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP: host -> {ok, changed, unreachable, failed, skipped, rescued, ignored}."""
        out = {}
        for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", self.out, re.M):
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        return out

    def preflight_table(self) -> str:
        m = re.search(r"(HOST\s+PASS\s+WARN\s+FAIL.*?fleet preflight: .*?ready\n(?:\n\s*problems:\n(?:\s+.*\n)+)?)",
                      self.out.replace("\\n", "\n"), re.S)
        return m.group(1) if m else ""


@dataclass
class Fleet:
    work: Path
    net: Network
    containers: dict[str, Container] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    ansible_bin: Path | None = None
    runs: list[Run] = field(default_factory=list)

    def pack(self, *args: str | Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "packager.cli", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=900,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def inventory(self, path: Path, extra: dict[str, str] | None = None) -> Path:
        lines = ["[llm_fleet]"]
        for h, addr in self.addresses.items():
            hv = f" {extra[h]}" if extra and h in extra else ""
            lines.append(f"{h} ansible_host={addr} llm_port={PORTS[h]} llm_host=0.0.0.0{hv}")
        lines += ["", "[llm_fleet:vars]", "ansible_user=root",
                  f"ansible_ssh_private_key_file={self.work / 'id'}",
                  f"ansible_ssh_common_args='-o StrictHostKeyChecking=accept-new "
                  f"-o UserKnownHostsFile={self.work / 'known_hosts'} -o ConnectTimeout=10'", ""]
        path.write_text("\n".join(lines))
        return path

    def playbook(self, playbook_dir: Path, *args: str, timeout: float = 900) -> Run:
        assert self.ansible_bin is not None
        env = {"PATH": f"{self.ansible_bin}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.work),
               "ANSIBLE_HOME": str(self.work / "ansible-home"), "ANSIBLE_FORCE_COLOR": "0",
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.work / "cp"), "LANG": "C.UTF-8"}
        argv = self.net.exec_argv(["env", "-C", str(playbook_dir), *[f"{k}={v}" for k, v in env.items()],
                                   str(self.ansible_bin / "ansible-playbook"), *args])
        t0 = time.monotonic()
        log = self.work / f"ansible-{len(self.runs) + 1}.log"  # follow a run with tail -f
        with open(log, "w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, check=False,
                                  timeout=timeout, env=env)
        run = Run(list(args), proc.returncode, log.read_text(), time.monotonic() - t0)
        self.runs.append(run)
        print(f"\n$ ansible-playbook {' '.join(args)}   ({run.seconds:.1f} s, rc {run.rc})\n{run.out[-5000:]}")
        return run

    def in_admin(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.net.exec_argv(argv), capture_output=True, text=True, check=False,
                              timeout=timeout)

    def completion(self, host: str) -> dict:
        body = json.dumps({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
        r = self.in_admin(["curl", "-sf", "-m", "120", "-H", "Content-Type: application/json", "-d", body,
                           f"http://{self.addresses[host]}:{PORTS[host]}/v1/chat/completions"], timeout=150)
        assert r.returncode == 0, f"{host}: no completion (curl exit {r.returncode}): {r.stderr}"
        return json.loads(r.stdout)

    def status(self, host: str) -> dict:
        r = self.containers[host].run(["/usr/local/sbin/llm-install", "--status", "--json"], check=False,
                                      timeout=60)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def active(self, host: str) -> str | None:
        b = self.status(host).get("bundles") or []
        return b[0]["active"] if b else None


@contextlib.contextmanager
def fleet_rig(work: Path) -> Iterator[Fleet]:
    rootfs = ensure_rootfs(packages=SSH_PACKAGES)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "id")], check=True)
    pub = (work / "id.pub").read_text()
    with Network() as net, contextlib.ExitStack() as stack:
        fleet = Fleet(work, net)
        for i, name in enumerate(("h1", "h2", "h3"), 1):
            ns, addr = net.add_host(i)
            args = ["--tmpfs=/tmp:mode=1777,size=2G"]
            if name == SMALL_DISK_HOST:
                args.append("--tmpfs=/opt/llm:mode=0755,size=400M")
            c = stack.enter_context(Container(rootfs, name=f"llm-fleet-{name}", network_namespace=ns,
                                              nspawn_args=args))
            c.write_file("/root/.ssh/authorized_keys", pub, mode=0o600)
            c.run(["chmod", "700", "/root/.ssh"])
            fleet.containers[name], fleet.addresses[name] = c, addr
        for name, addr in fleet.addresses.items():  # sshd up on every target, reachable from the admin side
            deadline = time.monotonic() + 60
            while fleet.in_admin(["bash", "-c", f"exec 3<>/dev/tcp/{addr}/22"], timeout=10).returncode != 0:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name}: sshd not reachable on {addr}:22\n"
                                         + fleet.containers[name].journal("ssh")[-2000:])
                time.sleep(0.5)
        yield fleet
