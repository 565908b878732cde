"""An Ansible INI inventory, read far enough to check each host's llm-pack variables before a rollout.

``pack fleet`` does not replace Ansible's inventory handling (the playbook uses the file as Ansible reads
it); it reads the same file to name, before anything is copied, a host whose overrides the installer would
refuse. Supported: ``[group]`` host lines with ``key=value`` variables (values quoted or plain), ``[group:vars]``,
``[group:children]``, ``#``/``;`` comments. Host ranges (``web[1:3]``) are refused with a hint.

The per-host variables (also what the role's ``overrides.json.j2`` turns into ``install.sh --overrides``):
``llm_port``, ``llm_host``, ``llm_gpus`` (``0,1`` or ``[0, 1]``), ``llm_api_key_file``,
``llm_tensor_parallel_size`` for the service ``llm_service`` (default: the bundle's only service), and
``llm_overrides`` (the whole ``{"services": {...}}`` object as JSON) on top.

A bundle whose service spans nodes (``nodes: N``, docs/multinode.md) takes each host's part from two groups:
the one host of ``[llm_ray_head]`` is the head, the hosts of ``[llm_ray_workers]`` its workers (their
``head_address`` is the head's ``llm_node_address``, else its ``ansible_host``, else its name);
``llm_node_address`` and ``llm_node_interface`` set a host's own cluster address and interface.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from installer.errors import UsageError

GROUP = "llm_fleet"  # the group the playbook rolls out to (all hosts of the inventory are checked)
SIMPLE_VARS = {"llm_port": "port", "llm_host": "host", "llm_gpus": "gpus", "llm_api_key_file": "api_key_file",
               "llm_tensor_parallel_size": "tensor_parallel_size"}
HEAD_GROUP, WORKER_GROUP = "llm_ray_head", "llm_ray_workers"
_SECTION = re.compile(r"\[([A-Za-z0-9_.-]+)(?::(vars|children))?\]")
_HOST = re.compile(r"[A-Za-z0-9_.:-]+")


@dataclass
class Inventory:
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> its own variables
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> hosts (direct)
    children: dict[str, list[str]] = field(default_factory=dict)
    group_vars: dict[str, dict[str, Any]] = field(default_factory=dict)

    def members(self, group: str, _seen: frozenset[str] = frozenset()) -> list[str]:
        out = list(self.groups.get(group, []))
        for child in self.children.get(group, []):
            if child not in _seen:
                out += [h for h in self.members(child, _seen | {group}) if h not in out]
        return out

    def host_vars(self, host: str) -> dict[str, Any]:
        """Variables of ``host``: group vars (all, then its groups) under its own (Ansible's precedence)."""
        out = dict(self.group_vars.get("all", {}))
        for g in sorted(self.group_vars):
            if g != "all" and host in self.members(g):
                out.update(self.group_vars[g])
        out.update(self.hosts.get(host, {}))
        return out


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse(text: str, *, source: str = "inventory") -> Inventory:
    inv = Inventory()
    section, kind = "ungrouped", None
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        where = f"{source}:{no}"
        if line.startswith("["):
            m = _SECTION.fullmatch(line)
            if not m:
                raise UsageError(f"{where}: {line!r} is not a section header",
                                 hint="write [group], [group:vars] or [group:children]")
            section, kind = m.group(1), m.group(2)
            inv.groups.setdefault(section, [])
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise UsageError(f"{where}: {e}", hint="close the quote") from e
        if kind == "vars":
            key, eq, val = line.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"{where}: expected key=value in [{section}:vars]")
            inv.group_vars.setdefault(section, {})[key.strip()] = _value(val.strip())
            continue
        if kind == "children":
            inv.children.setdefault(section, []).append(words[0])
            continue
        host = words[0]
        if "[" in host or not _HOST.fullmatch(host):
            raise UsageError(f"{where}: host {host!r}: host ranges and unusual names are not supported by "
                             "pack fleet's check", hint="list each host on its own line")
        hv = inv.hosts.setdefault(host, {})
        for w in words[1:]:
            key, eq, val = w.partition("=")
            if not eq:
                raise UsageError(f"{where}: {w!r}: expected key=value after the host name")
            hv[key] = _value(val)
        if host not in inv.groups.setdefault(section, []):
            inv.groups[section].append(host)
    return inv


def load(path: Path) -> Inventory:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--inventory {path}: cannot read it ({e})", hint="pass an INI inventory file") from e
    return parse(text, source=str(path))


def host_overrides(hv: Mapping[str, Any], services: Sequence[str], *, host: str) -> dict:
    """The ``--overrides`` object of one host (as the role's template writes it)."""
    fields: dict[str, Any] = {}
    for var, key in SIMPLE_VARS.items():
        if var not in hv:
            continue
        v = hv[var]
        if key == "gpus":
            v = _gpus(v, host)
        elif key in ("port", "tensor_parallel_size"):
            v = _int(v, var, host)
        fields[key] = v
    out: dict[str, Any] = {"services": {}}
    if fields:
        name = hv.get("llm_service") or (services[0] if len(services) == 1 else None)
        if not name:
            raise UsageError(f"host {host}: {', '.join(sorted(k for k in hv if k in SIMPLE_VARS))} need "
                             f"llm_service=NAME (the bundle has several services: {', '.join(services)})")
        out["services"][str(name)] = fields
    extra = hv.get("llm_overrides")
    if extra:
        if isinstance(extra, str):
            try:
                extra = json.loads(extra)
            except ValueError as e:
                raise UsageError(f"host {host}: llm_overrides is not JSON ({e})") from e
        if not isinstance(extra, dict) or not isinstance(extra.get("services", {}), dict):
            raise UsageError(f"host {host}: llm_overrides must be {{\"services\": {{NAME: {{...}}}}}}")
        for svc, f in extra.get("services", {}).items():
            out["services"].setdefault(svc, {}).update(f if isinstance(f, dict) else {"?": f})
    return out


def _int(v: Any, var: str, host: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str) or not str(v).isdigit():
        raise UsageError(f"host {host}: {var}={v!r} is not a whole number")
    return int(v)


def _gpus(v: Any, host: str) -> list[int]:
    items = v.split(",") if isinstance(v, str) else v if isinstance(v, list | tuple) else [v]
    return [_int(str(x).strip(), "llm_gpus", host) for x in items if str(x).strip()]


def cluster_nodes(inv: Inventory, hosts: Sequence[str], service: str, nodes: int) -> tuple[dict[str, dict], list[str]]:
    """Each host's ``node`` field for the multi-node ``service`` from the inventory groups, and the problems
    (a host in neither group, not exactly one head, not ``nodes`` hosts in all)."""
    heads = [h for h in inv.members(HEAD_GROUP) if h in hosts]
    workers = [h for h in inv.members(WORKER_GROUP) if h in hosts and h not in heads]
    problems = []
    if len(heads) != 1:
        problems.append(f"service {service} spans {nodes} nodes: [{HEAD_GROUP}] must name exactly one host of "
                        f"[{GROUP}] (it names {len(heads)}: {', '.join(heads) or 'none'})")
    for h in hosts:
        if h not in heads and h not in workers:
            problems.append(f"host {h}: service {service} spans {nodes} nodes: put {h} in [{HEAD_GROUP}] or "
                            f"[{WORKER_GROUP}]")
    if len(heads) == 1 and len(heads) + len(workers) != nodes:
        problems.append(f"service {service} spans {nodes} nodes but the inventory has {len(heads) + len(workers)} "
                        f"(1 in [{HEAD_GROUP}], {len(workers)} in [{WORKER_GROUP}])")
    out: dict[str, dict] = {}
    if problems:
        return out, problems
    hv = inv.host_vars(heads[0])
    head_address = str(hv.get("llm_node_address") or hv.get("ansible_host") or heads[0])
    for h in heads + workers:
        v = inv.host_vars(h)
        node: dict[str, Any] = {"role": "head"} if h in heads else {"role": "worker", "head_address": head_address}
        for var, key in (("llm_node_address", "address"), ("llm_node_interface", "interface")):
            if v.get(var):
                node[key] = str(v[var])
        out[h] = node
    return out, problems
