"""The manifest rules JSON Schema cannot express: names that must exist or be unique, fields that exclude
each other, ports, GPUs against the parallel sizes, the CUDA driver table, and the service rules the
installer applies to MANIFEST.json (one implementation: ``installer.bundle.manifest.service_problems``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from installer.bundle import manifest as records
from packager.env.compiler import sysroot_version
from packager.manifest.nodes import NodeTree
from packager.manifest.problems import Problems, did_you_mean
from packager.spec import TargetSpec


def cross_checks(problems: Problems, tree: NodeTree, data: dict, base: Path) -> None:
    """The rules JSON Schema cannot express, over ``data`` as `check_schema` left it (every problem at once)."""
    def add(path: list[Any], msg: str) -> None:
        problems.add(tree.node(path), path, msg)

    envs = data.get("environments") or []
    models = data.get("models") or []
    services = data.get("services") or []
    if not envs and not models:
        add([], "a manifest needs at least one entry under environments or models")
    adapters = data.get("adapters") or []
    for section, items in (("environments", envs), ("models", models), ("services", services)):
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            name = (item or {}).get("name")
            if isinstance(name, str):
                if name in seen:
                    add([section, i, "name"], f"duplicate name {name!r} (also {section}[{seen[name]}])")
                seen[name] = i
    from packager.manifest.serving_rules import serving_checks

    serving_checks(add, problems, data, base)
    for i, env in enumerate(envs):
        env = env or {}
        if env.get("existing") is not None:
            for key in ("conda", "pip", "channels", "python", "prefix", "download_kernels", "compiler"):
                if key in env:
                    add(["environments", i, key], f"{key!r} cannot be combined with 'existing' (the server's "
                                                  "own environment is used as it is)")
            from installer.bundle.manifest import abs_path_problem

            bad = abs_path_problem(str(env["existing"]))
            if bad:
                add(["environments", i, "existing"], bad)
        if env.get("prefix") is not None:
            for key in ("conda", "pip", "channels", "python"):
                if key in env:
                    add(["environments", i, key], f"{key!r} cannot be combined with 'prefix' (an existing "
                                                  "environment is packed as it is)")
            prefix = base / str(env["prefix"])
            if not problems.has(["environments", i, "prefix"]) and not _is_dir(prefix / "conda-meta"):
                add(["environments", i, "prefix"], f"{prefix} is not a conda environment (no conda-meta/)")
        if isinstance(env.get("cuda"), str):
            from installer.preflight import cuda as cuda_table

            try:
                cuda_table.min_driver(env["cuda"])
            except Exception as e:  # UsageError with the list of known versions
                add(["environments", i, "cuda"], getattr(e, "message", str(e)) +
                    " — pick a listed CUDA version, or add its minimum driver (NVIDIA's release notes) to the table")
        glibc = (data.get("target") or {}).get("glibc") or TargetSpec().glibc
        if wants_compiler(env) and env.get("prefix") is None and isinstance(glibc, str) \
                and not problems.has(["target", "glibc"]) and sysroot_version(glibc) is None:
            add(["environments", i, "compiler"] if "compiler" in env else ["environments", i],
                f"no conda-forge sysroot for target.glibc {glibc} (the oldest is 2.17) to carry the C compiler "
                "a CUDA environment gets by default: raise target.glibc, or set compiler: false")
        if env.get("prefix") is None and env.get("existing") is None and not env.get("conda") \
                and not env.get("python"):
            add(["environments", i], "an environment needs 'conda' specs (and usually 'python'), a 'prefix' "
                                    "or 'existing'")
    for section, items in (("models", models), ("adapters", adapters)):
        for i, m in enumerate(items):
            m = m or {}
            src = m.get("source")
            if src in ("huggingface", "modelscope"):
                if not m.get("repo"):
                    add([section, i], f"source {src} needs 'repo' (org/name)")
                if m.get("path") is not None:
                    add([section, i, "path"], f"'path' is only for source: local (source is {src})")
            elif src == "local":
                if not m.get("path"):
                    add([section, i], "source local needs 'path' (a directory on the build host)")
                elif not problems.has([section, i, "path"]) and not _is_dir(base / str(m["path"])):
                    add([section, i, "path"], f"{base / str(m['path'])} is not a directory")
                for key in ("repo", "revision", "endpoint"):
                    if m.get(key) is not None and key != "repo":
                        add([section, i, key], f"{key!r} does not apply to source: local")
    model_names = {m.get("name") for m in models if m}
    env_names = {e.get("name") for e in envs if e}
    listeners: list[tuple[str | None, int]] = []
    where: list[int] = []
    for i, s in enumerate(services):
        s = s or {}
        adapter_names = {(a or {}).get("name") for a in data.get("adapters") or []}
        if s.get("model") is not None and s["model"] not in model_names and s["model"] not in adapter_names:
            add(["services", i, "model"], f"no model named {s['model']!r} in this manifest"
                                          f"{did_you_mean(str(s['model']), [str(n) for n in model_names])}")
        if s.get("environment") is not None and s["environment"] not in env_names:
            add(["services", i, "environment"],
                f"no environment named {s['environment']!r} in this manifest"
                f"{did_you_mean(str(s['environment']), [str(n) for n in env_names])}")
        if s.get("environment") is None and len(env_names) > 1:
            add(["services", i], "several environments: say which one with 'environment'")
        tp, pp = s.get("tensor_parallel_size") or 1, s.get("pipeline_parallel_size") or 1
        gpus = s.get("gpus")
        nodes = s.get("nodes", 1)
        if isinstance(gpus, list) and gpus and isinstance(tp, int) and isinstance(pp, int) and nodes == 1 \
                and len(gpus) != tp * pp:
            add(["services", i, "gpus"], f"{len(gpus)} GPU(s) listed but tensor_parallel_size × "
                                         f"pipeline_parallel_size = {tp * pp}")
        if "node" in s:
            add(["services", i, "node"], "node: (head or worker) is one server's part, not the bundle's: give it "
                                         "when installing, with install.sh --overrides FILE (docs/multinode.md)")
        for rel, msg in records.cluster_problems({k: v for k, v in s.items() if k != "node"}):
            path = ["services", i, *rel]
            if not problems.has(path):
                add(path, msg)
        if isinstance(gpus, list) and len(set(gpus)) != len(gpus):
            add(["services", i, "gpus"], "a GPU index is listed twice")
        port = s.get("port", records.DEFAULT_PORT)  # the default port takes part in the check too
        host = s.get("host")
        if isinstance(port, int) and (host is None or isinstance(host, str)):
            listeners.append((host, port))
            where.append(i)
        # the service rules the installer applies to MANIFEST.json (one implementation: installer/bundle/manifest.py)
        for rel, msg in records.service_problems(s):
            path = ["services", i, *rel]
            if not problems.has(path):
                add(path, msg)
    for a, b in records.port_conflicts(listeners):
        s = services[where[a]] or {}
        add(["services", where[a], "port"] if "port" in s else ["services", where[a]],
            f"port {s.get('port', records.DEFAULT_PORT)}{'' if 'port' in s else ' (the default)'} is already "
            f"used by services[{where[b]}]")


def wants_compiler(env: dict) -> bool:
    """``compiler:`` as given, else the default: a C compiler for a built (or packed) CUDA environment."""
    if env.get("existing") is not None:
        return False
    given = env.get("compiler")
    return given if isinstance(given, bool) else isinstance(env.get("cuda"), str)


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):  # a NUL in the path, a name too long
        return False


def manifest_warnings(data: dict) -> list[str]:
    """Advice for a valid manifest (printed by `pack validate` and `pack build`; the build goes on)."""
    out = []
    for i, s in enumerate(data.get("services") or []):
        for rel, msg in records.service_warnings(s or {}):
            out.append(f"{records.field_path(['services', i, *rel])}: {msg}")
    return out
