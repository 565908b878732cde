"""The preflight of a service that spans nodes (docs/multinode.md): this server's part is given and its
address found; Ray's fixed ports are free (or held by this service's own Ray unit); a worker reaches its head.

A head that answers "connection refused" is reachable (nothing listens yet: it is installed after its
workers), so that is a WARN; no answer at all is a FAIL (wrong address, firewall, another network).
"""

from __future__ import annotations

import errno

from installer.errors import InstallError
from installer.preflight.context import FAIL, PASS, SKIP, WARN, CheckResult, _Context
from installer.preflight.host import port_free


def check_cluster(ctx: _Context) -> list[CheckResult]:
    from installer.service import cluster

    out = []
    for s in ctx.services:
        if not s.multi_node:
            continue
        name = s.name
        try:
            node = cluster.resolve(s, ctx.manifest)
        except InstallError as e:
            out.append(CheckResult("cluster", FAIL, e.message, e.hint or "", name))
            continue
        assert node is not None
        out.append(CheckResult("cluster", PASS, f"{node.role} of {s.nodes} nodes; this node's cluster address "
                               f"{node.address}" + (f" on {node.interface}" if node.interface else "")
                               + f"; head {node.head}", subject=name))
        if node.interface is None:
            out.append(CheckResult("cluster", WARN, f"no interface holds {node.address}: NCCL and Gloo pick one "
                                   "themselves", f"set services.{name}.node.interface in the --overrides", name))
        if not ctx.live:
            out.append(CheckResult("cluster", SKIP, f"staging root {ctx.root}: ports and the head are checked on "
                                   "the server", subject=name))
            continue
        ray = s.ray_settings
        taken = []
        for what, port in ray.ports(head=node.role == "head").items():
            err = port_free("0.0.0.0", port)
            if err is not None and err.errno == errno.EADDRINUSE and ctx.owned_ports.get(port) != name:
                taken.append(f"{port} ({what})")
        if taken:
            out.append(CheckResult("cluster", FAIL, f"Ray port(s) in use by another program: {', '.join(taken)}",
                                   f"`ss -ltnp` shows who holds them; or move the cluster: services.{name}.ray.port "
                                   "in the manifest", name))
        else:
            lo, hi = ray.worker_ports
            out.append(CheckResult("cluster", PASS, f"Ray ports {ray.port}-{ray.port + 7} and workers' {lo}-{hi} "
                                   "(open them between the nodes)", subject=name))
        if node.role == "worker":
            host, _, port = node.head.rpartition(":")
            state = cluster.probe_port(host.strip("[]"), int(port))
            if state == "open":
                out.append(CheckResult("cluster", PASS, f"the head {node.head} answers", subject=name))
            elif state == "refused":
                out.append(CheckResult("cluster", WARN, f"the head's host {host} answers but nothing listens on "
                                       f"{port} yet", "install and start the head; this worker joins it when it "
                                       "is up", name))
            else:
                out.append(CheckResult("cluster", FAIL, f"the head {node.head} does not answer from this node",
                                       f"check head_address in the --overrides, the route and the firewall "
                                       f"between the nodes (Ray needs ports {ray.port}-{ray.port + 73})", name))
    return out
