"""Services that span servers: ``nodes: N`` with a Ray cluster (``ray: {port}``), and each server's part in it
(``node: {role, head_address, address, interface}``, given per server with ``install.sh --overrides``).

vLLM serves a model larger than one server with a Ray cluster: a head node and N-1 workers, then one API
server on the head with ``--distributed-executor-backend ray``, ``--tensor-parallel-size`` (usually the GPUs
of one node) × ``--pipeline-parallel-size`` (usually the nodes) workers in all, spread evenly over the nodes.
The same signed bundle is installed on every node (the same environment and model paths everywhere); the
head's vLLM waits until N nodes carrying that bundle have joined (:data:`RESOURCE_PREFIX`).

The rules here run on the MANIFEST (installer) and on the manifest.yaml (``pack validate``), like
:func:`~installer.bundle.manifest.service_problems`. Standard library only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from installer.bundle.manifest.fields import FieldReader
from installer.bundle.manifest.record import Record
from installer.bundle.manifest.rules import Problem, host_problem

ROLES = ("head", "worker")
MAX_NODES = 64
DEFAULT_RAY_PORT = 6379
DEFAULT_WAIT_S = 900
# Ray's ports on every node, fixed so a firewall between the nodes can be opened for exactly these: the GCS
# (head only) and then, at fixed offsets from it, the per-node services; the worker processes take a range.
PORT_OFFSETS = {"gcs": 0, "node-manager": 1, "object-manager": 2, "runtime-env-agent": 3,
                "dashboard-agent-grpc": 4, "dashboard-agent-http": 5, "metrics-export": 6}
WORKER_PORTS = (10, 73)  # offsets of the first and last worker port (64 worker processes per node)
MAX_RAY_PORT = 65535 - WORKER_PORTS[1]
# a Ray custom resource each node declares: the sha256 of the signed MANIFEST.json it was installed from (the
# head counts only nodes with its own: one bundle on every node)
RESOURCE_PREFIX = "llm-bundle-"
RAY_FIELDS = ("port", "wait_s")
NODE_FIELDS = ("role", "head_address", "address", "interface")


@dataclass(frozen=True)
class RaySettings(Record):
    """``services[].ray``: the cluster's GCS port (the other ports follow it) and how long the head's vLLM
    waits for the nodes before it gives up (and systemd starts it again)."""

    port: int = DEFAULT_RAY_PORT
    wait_s: int = DEFAULT_WAIT_S

    @classmethod
    def read(cls, r: FieldReader) -> RaySettings:
        r.only_keys(RAY_FIELDS)
        return cls(port=r.int("port", minimum=1024, maximum=MAX_RAY_PORT, optional=True, default=DEFAULT_RAY_PORT),
                   wait_s=r.int("wait_s", minimum=10, maximum=86400, optional=True, default=DEFAULT_WAIT_S))

    def ports(self, *, head: bool) -> dict[str, int]:
        """Every fixed port a node of this cluster listens on (the GCS only on the head)."""
        return {k: self.port + off for k, off in PORT_OFFSETS.items() if head or k != "gcs"}

    @property
    def worker_ports(self) -> tuple[int, int]:
        return self.port + WORKER_PORTS[0], self.port + WORKER_PORTS[1]


@dataclass(frozen=True)
class NodeRole(Record):
    """``services[].node`` (per server, from ``--overrides``): this server's part in the cluster.

    ``head_address``: where the head's GCS is reached (required on a worker; on the head its own address).
    ``address``: this node's address on the cluster network (VLLM_HOST_IP, Ray's node IP); default: the
    local address that routes to the head. ``interface``: the interface NCCL and Gloo use (default: the one
    holding ``address``).
    """

    role: str
    head_address: str | None = None
    address: str | None = None
    interface: str | None = None

    @classmethod
    def read(cls, r: FieldReader) -> NodeRole:
        r.only_keys(NODE_FIELDS)
        node = cls(role=r.str("role", choices=ROLES), head_address=r.str("head_address", optional=True),
                   address=r.str("address", optional=True), interface=r.str("interface", optional=True))
        for rel, msg in node_problems(node.to_dict()):
            r.fail(rel, msg)
        return node

    @property
    def is_head(self) -> bool:
        return self.role == "head"


def node_problems(node: Mapping) -> list[Problem]:
    out: list[Problem] = []
    for key in ("head_address", "address"):
        v = node.get(key)
        if isinstance(v, str):
            bad = host_problem(v)
            if bad:
                out.append(((key,), bad))
            elif _is_wildcard(v):
                out.append(((key,), f"{v} is not one node's address"))
    if node.get("role") == "worker" and not node.get("head_address"):
        out.append((("head_address",), "a worker needs head_address: the head node's address on the cluster "
                                       "network"))
    iface = node.get("interface")
    if isinstance(iface, str) and not (0 < len(iface) < 16 and iface.replace("-", "").replace(".", "")
                                       .replace("_", "").isalnum()):
        out.append((("interface",), f"{iface!r} is not a network interface name"))
    return out


def _is_wildcard(v: str) -> bool:
    try:
        return ipaddress.ip_address(v).is_unspecified
    except ValueError:
        return False


def cluster_problems(svc: Mapping) -> list[Problem]:
    """The multi-node rules for a service (MANIFEST entry or manifest.yaml, defaults not filled)."""
    out: list[Problem] = []
    nodes = svc.get("nodes", 1)
    if not isinstance(nodes, int) or isinstance(nodes, bool):
        return out
    tp, pp = svc.get("tensor_parallel_size") or 1, svc.get("pipeline_parallel_size") or 1
    if nodes == 1:
        for key in ("ray", "node"):
            if svc.get(key) is not None:
                out.append(((key,), f"{key}: is for a service that spans nodes: set nodes: 2 or more"))
        return out
    if not (isinstance(tp, int) and isinstance(pp, int)):
        return out
    world = tp * pp
    if world < nodes or world % nodes:
        out.append((("nodes",), f"tensor_parallel_size {tp} × pipeline_parallel_size {pp} = {world} worker(s) "
                                f"cannot be spread evenly over {nodes} nodes: usually tensor_parallel_size is "
                                f"the GPUs of one node and pipeline_parallel_size the number of nodes "
                                f"(pipeline_parallel_size: {nodes})"))
    gpus = svc.get("gpus")
    if isinstance(gpus, (list, tuple)) and gpus and world % nodes == 0 and len(gpus) != world // nodes:
        out.append((("gpus",), f"{len(gpus)} GPU(s) listed but each of the {nodes} nodes runs {world // nodes} of "
                               f"the {world} workers (tensor_parallel_size {tp} × pipeline_parallel_size {pp}): "
                               f"gpus: lists one node's GPUs"))
    args = svc.get("vllm_args") or ()
    for i, a in enumerate(args):
        if not isinstance(a, str):
            continue
        flag, _, value = a.partition("=")
        if flag == "--distributed-executor-backend":
            nxt = args[i + 1] if not value and i + 1 < len(args) else value
            if nxt != "ray":
                out.append((("vllm_args", i), "a service that spans nodes runs with --distributed-executor-"
                                              "backend ray (set by the installer): remove it from vllm_args"))
    return out


def bundle_resource(manifest_sha256: str) -> str:
    """The Ray custom resource a node of this bundle declares (the head waits for N of them)."""
    return RESOURCE_PREFIX + manifest_sha256[:16]
