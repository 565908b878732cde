"""This server's part in a service that spans nodes: its role, cluster address and interface, the Ray units
it runs, the env file lines they read, and asking the head which nodes have joined.

The manifest says how many nodes (``services[].nodes``) and the Ray port; each server's part comes from its
``--overrides`` (``node: {role, head_address, address, interface}``). What is left out is found here, on the
server itself: the address is the local one the kernel picks to reach the head (a UDP ``connect``, which sends
nothing), the interface the one holding that address. Standard library only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import socket
import struct
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from installer.bundle.manifest import Manifest, ServiceRecord, bundle_resource
from installer.errors import InstallError
from installer.service.paths import check_instance_name

RAY_TEMPLATES = {"head": "llm-ray-head@.service", "worker": "llm-ray-worker@.service"}
RAY_LAUNCHER = Path("opt/llm/bin/llm-ray")
RAY_NODES = Path("opt/llm/bin/llm-ray-nodes")  # a Python script, run with the environment's python
SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class ClusterNode:
    """What this node's env file says about the cluster (resolved on the server)."""

    role: str
    address: str
    interface: str | None
    head: str  # host:port of the GCS
    port: int
    nodes: int
    resource: str
    wait_s: int

    def env(self) -> dict[str, str]:
        out = {"VLLM_HOST_IP": self.address, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": self.head,
               "LLM_RAY_ROLE": self.role, "LLM_RAY_HEAD": self.head, "LLM_RAY_PORT": str(self.port),
               "LLM_RAY_NODES": str(self.nodes), "LLM_RAY_RESOURCE": self.resource,
               "LLM_RAY_WAIT": str(self.wait_s)}
        if self.interface:
            # torch.distributed (Gloo), NCCL and the TP sockets use the cluster network, not the first interface
            for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME"):
                out[key] = self.interface
        return out


def ray_unit(role: str, name: str) -> str:
    return f"llm-ray-{role}@{check_instance_name(name)}.service"


def units_of(svc: ServiceRecord) -> list[str]:
    """The units this server runs for the service, in start order (instance names stand for ``llm@``)."""
    if not svc.multi_node or svc.node is None:
        return [svc.name]
    if svc.node.is_head:
        return [ray_unit("head", svc.name), svc.name]
    return [ray_unit("worker", svc.name)]


def bundle_tag(m: Manifest) -> str:
    """The Ray resource every node of this bundle declares: a digest of the bundle's name, version and
    every artifact's sha256 (what the nodes must share; not the per-server overrides)."""
    h = hashlib.sha256(f"{m.bundle.name}\0{m.bundle.version}\0".encode())
    for a in sorted(m.artifacts, key=lambda a: a.path):
        h.update(f"{a.path}\0{a.sha256}\0".encode())
    return bundle_resource(h.hexdigest())


def local_address_towards(host: str, port: int) -> str | None:
    """The local address the kernel would use to reach ``host`` (None when there is no route)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.connect(addr)  # UDP: picks the route and source address, sends nothing
                return s.getsockname()[0]
            except OSError:
                continue
    return None


def _ipv4_addresses() -> list[tuple[str, str]]:
    """(interface, IPv4 address) of every interface that has one."""
    try:
        names = [n for _, n in socket.if_nameindex()]
    except OSError:
        return []
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for n in names:
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", n.encode()[:15]))
            except OSError:
                continue
            out.append((n, socket.inet_ntoa(raw[20:24])))
    return out


def interface_of(address: str) -> str | None:
    """The interface holding the IPv4 ``address`` (None when none does, or for IPv6)."""
    return next((n for n, ip in _ipv4_addresses() if ip == address), None)


def resolve(svc: ServiceRecord, m: Manifest) -> ClusterNode | None:
    """This server's :class:`ClusterNode` for a multi-node service (None for a single-node one).

    Raises InstallError, saying what to put in the overrides, when the role is missing or the address
    cannot be found."""
    if not svc.multi_node:
        return None
    ray = svc.ray_settings
    node = svc.node
    if node is None:
        raise InstallError(
            f"service {svc.name} spans {svc.nodes} nodes and this server's part in it is not given",
            hint=missing_role_hint(svc))
    head_host = node.head_address or node.address
    address = node.address or (local_address_towards(head_host, ray.port) if head_host else None)
    if address is None and node.is_head:
        address = _only_address()
    if not address:
        raise InstallError(
            f"service {svc.name}: cannot tell this node's address on the cluster network"
            + (f" (no route to the head {head_host})" if head_host else ""),
            hint=f"set services.{svc.name}.node.address (this server's address the other nodes reach) in the "
                 "--overrides file")
    head = f"{head_host or address}:{ray.port}"
    if ":" in (head_host or address) and not (head_host or address).startswith("["):
        head = f"[{head_host or address}]:{ray.port}"
    return ClusterNode(role=node.role, address=address, interface=node.interface or interface_of(address),
                       head=head, port=ray.port, nodes=svc.nodes, resource=bundle_tag(m), wait_s=ray.wait_s)


def missing_role_hint(svc: ServiceRecord) -> str:
    head = json.dumps({"services": {svc.name: {"node": {"role": "head"}}}})
    worker = json.dumps({"services": {svc.name: {"node": {"role": "worker", "head_address": "HEAD-ADDRESS"}}}})
    return (f"install with --overrides FILE: on the head node {head}, on each of the {svc.nodes - 1} other(s) "
            f"{worker} (docs/multinode.md; `pack fleet` writes them from the inventory groups)")


def _only_address() -> str | None:
    """The one non-loopback IPv4 address of this host (None when there are none or several)."""
    found = [ip for _, ip in _ipv4_addresses() if not ip.startswith("127.")]
    return found[0] if len(found) == 1 else None


def cluster_nodes(python: str | Path, head: str, *, root: Path = Path("/"),
                  timeout: float = 30.0) -> tuple[list[dict], str | None]:
    """(alive nodes, error) as the head's GCS reports them, asked with the environment's own Ray."""
    try:
        r = subprocess.run([str(python), str(Path(root) / RAY_NODES), head], capture_output=True, text=True,
                           check=False, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"cannot run {RAY_NODES}: {e}"
    if r.returncode != 0:
        return [], (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    try:
        nodes = json.loads(r.stdout)
    except ValueError:
        return [], f"unexpected output of {RAY_NODES}: {r.stdout[:200]!r}"
    return [n for n in nodes if isinstance(n, Mapping) and n.get("alive")], None


def probe_port(host: str, port: int, timeout: float = 3.0) -> str:
    """``open`` (something answers), ``refused`` (the host answers, nothing listens) or ``unreachable``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "unreachable"


def all_ray_units(names: Iterable[str]) -> list[str]:
    return [ray_unit(role, n) for n in names for role in RAY_TEMPLATES]


def node_settings(root: Path, name: str) -> dict[str, str]:
    from installer.service.envfile import parse_env_file
    from installer.service.paths import env_file_path

    try:
        return parse_env_file(env_file_path(Path(root), name).read_text(encoding="utf-8"))
    except OSError:
        return {}


def check_worker(root: Path, unit: str, say, *, timeout: float = 900.0) -> dict:
    """After a worker node's ``llm-ray-worker@`` started: it is running, and has joined when its head answers.

    A head that is not up yet is not a failure (workers are installed first; the unit keeps trying every
    5 s); a unit that stops with a configuration error (exit 78) is."""
    import time

    from installer.service.systemctl import unit_properties

    name = unit.split("@", 1)[1][: -len(".service")]
    env = node_settings(root, name)
    head, me, python = env.get("LLM_RAY_HEAD", ""), env.get("VLLM_HOST_IP", ""), env.get("LLM_PYTHON", "")
    say(f"waiting for {unit} to join the Ray cluster at {head}...")
    t0 = time.monotonic()
    deadline = t0 + min(timeout, 180.0)
    state: dict[str, str] = {}
    while True:
        state = unit_properties(unit, ["ActiveState", "ExecMainStatus", "NRestarts"])
        if state.get("ExecMainStatus") == "78":
            raise InstallError(f"{unit} refused its configuration (exit 78)",
                               hint=f"journalctl -u {unit} says why; fix the --overrides and install again")
        host = head.rsplit(":", 1)[0].strip("[]")
        port = int(head.rsplit(":", 1)[1]) if ":" in head else 0
        reach = probe_port(host, port) if port else "unreachable"
        if reach == "open":
            nodes, error = cluster_nodes(python, head, root=root)
            if any(n.get("address") == me for n in nodes):
                secs = time.monotonic() - t0
                say(f"{unit}: joined after {secs:.0f} s; the cluster has {len(nodes)} node(s): "
                    + ", ".join(sorted(str(n.get("address")) for n in nodes)))
                return {"joined": True, "joined_s": round(secs, 1), "nodes": [n.get("address") for n in nodes]}
        if time.monotonic() > deadline or (reach != "open" and time.monotonic() - t0 > 15
                                           and state.get("ActiveState") in ("active", "activating")):
            why = {"refused": "nothing listens on its Ray port yet", "unreachable": "it does not answer"}.get(
                reach, "this node is not in its node list yet")
            say(f"{unit} is running; the head {head}: {why}. It keeps trying every 5 s and joins when the head "
                f"is up (journalctl -u {unit})")
            return {"joined": False, "head": head, "head_state": reach, "active": state.get("ActiveState")}
        time.sleep(2)
