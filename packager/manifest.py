"""Load and validate a bundle manifest (YAML) into `packager.spec.Manifest`.

Validation happens before anything is downloaded and reports every problem at once, each with the file,
line, field path, what was expected and what was found, plus a "did you mean" for unknown keys. The
schema below is a small JSON-Schema subset; `pack schema` publishes it for editors
(packager/schema/manifest.schema.json).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from installer.bundle import manifest as records
from installer.errors import ManifestError
from packager.env.compiler import sysroot_version
from packager.spec import BundleSpec, EnvSpec, Manifest, ModelSpec, PipSpec, ServiceSpec, TargetSpec


def _anchored(rx: re.Pattern) -> str:
    """A pattern of installer/bundle/manifest.py (the target's rules) for the JSON Schema (matched with fullmatch)."""
    return f"^{rx.pattern}$"


NAME_RE = _anchored(records.NAME_RE)
VERSION_RE = _anchored(records.VERSION_RE)
CUDA_RE = _anchored(records.CUDA_RE)
REVISION_RE = _anchored(records.REVISION_RE)
MAX_NODES = 200_000  # YAML aliases can make a small file a huge tree ("billion laughs"): refuse past this
MAX_DEPTH = 64
log = logging.getLogger(__name__)
_SCALAR_LOADER = yaml.SafeLoader("")  # only its constructors are used (reset before each use)
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when PyYAML has it (same nodes)


def _str(desc: str, **kw: Any) -> dict:
    return {"type": "string", "description": desc, **kw}


def _strlist(desc: str) -> dict:
    return {"type": "array", "items": {"type": "string"}, "description": desc}


def _obj(props: dict, required: tuple[str, ...] = (), desc: str = "") -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False,
            **({"description": desc} if desc else {})}


PIP_SCHEMA = _obj({
    "packages": _strlist("pip requirement specifiers, e.g. vllm==0.11.0"),
    "index_url": _str("pip --index-url (e.g. the PyTorch index for your CUDA)"),
    "extra_index_urls": _strlist("pip --extra-index-url values"),
    "find_links": _strlist("pip --find-links values (local wheel directories)"),
    "no_index": {"type": "boolean", "description": "pip --no-index: install only from find_links"},
    "remove": _strlist("distributions to uninstall after the pip layer"),
}, desc="the pip layer, installed with the environment's own pip")

ENV_SCHEMA = _obj({
    "name": _str("environment name (directory name on the target)", pattern=NAME_RE),
    "python": _str("Python version, e.g. '3.12'", pattern=r"^3\.[0-9]+(\.[0-9]+)?$"),
    "cuda": {"type": ["string", "null"], "pattern": CUDA_RE,
             "description": "CUDA version the environment is built for, e.g. '12.8'; null/omitted = CPU only"},
    "channels": _strlist("conda channels (names or URLs, file:// for a local channel)"),
    "conda": _strlist("conda match specs"),
    "pip": PIP_SCHEMA,
    "prefix": _str("pack this existing environment instead of building one"),
    "existing": _str("an environment the target server already has (absolute prefix holding bin/python with "
                     "vLLM): nothing is carried; the installer checks that it imports vLLM", pattern=r"^/.*$"),
    "download_kernels": {"type": "boolean", "description": "run `vllm download-kernels` at build time"},
    "compiler": {"type": "boolean", "description": "carry a C compiler (conda-forge gcc + a sysroot for "
                 "target.glibc; vLLM on CUDA compiles at every start); default: true when cuda is set"},
}, ("name",), "a conda environment (with vLLM) built for the target")

MODEL_SCHEMA = _obj({
    "name": _str("model name (directory name on the target)", pattern=NAME_RE),
    "source": {"type": "string", "enum": ["huggingface", "modelscope", "local"], "description": "where it comes from"},
    "repo": _str("hub repository id, org/name", pattern=_anchored(records.REPO_RE)),
    "revision": _str("branch, tag or commit (pinned to a commit at build time)", pattern=REVISION_RE),
    "path": _str("directory on the build host (source: local)"),
    "allow_patterns": _strlist("only files matching these glob patterns"),
    "ignore_patterns": _strlist("skip files matching these glob patterns"),
    "endpoint": _str("hub endpoint or mirror URL (default: HF_ENDPOINT / MODELSCOPE_ENDPOINT)",
                     pattern=_anchored(records.URL_RE)),
}, ("name", "source"), "a model snapshot")

SERVICE_SCHEMA = _obj({
    "name": _str("instance name: systemctl start llm@<name>", pattern=NAME_RE),
    "model": _str("a models[].name"),
    "environment": _str("an environments[].name"),
    "served_model_name": _str("name clients use in the API (default: name)"),
    "host": _str("address to listen on (default 127.0.0.1; another address needs api_key_file)"),
    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "TCP port"},
    "gpus": {"type": "array", "items": {"type": "integer", "minimum": 0}, "description": "GPU indices"},
    "tensor_parallel_size": {"type": "integer", "minimum": 1, "description": "vLLM --tensor-parallel-size"},
    "pipeline_parallel_size": {"type": "integer", "minimum": 1, "description": "vLLM --pipeline-parallel-size"},
    "max_model_len": {"type": "integer", "minimum": 1, "description": "vLLM --max-model-len"},
    "dtype": {"type": "string", "enum": ["auto", "half", "float16", "bfloat16", "float", "float32"],
              "description": "vLLM --dtype"},
    "gpu_memory_utilization": {"type": "number", "minimum": 0.05, "maximum": 1.0,
                               "description": "vLLM --gpu-memory-utilization"},
    "trust_remote_code": {"type": "boolean", "description": "vLLM --trust-remote-code"},
    "api_key_file": _str("file on the target holding the API key (never put the key in the manifest)",
                         pattern=r"^/.*$"),
    "serve_by": {"type": "string", "enum": ["path", "repo_id"],
                 "description": "serve the model from its directory, or by repo id from an offline HF cache"},
    "vllm_args": _strlist("extra vLLM arguments"),
    "env": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]},
            "description": "extra environment variables for the service"},
}, ("name", "model"), "a vLLM instance run by systemd as llm@<name>")

SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://llm-pack.invalid/manifest.schema.json",
    "title": "llm-pack bundle manifest",
    **_obj({
        "bundle": _obj({"name": _str("bundle name", pattern=NAME_RE),
                        "version": _str("bundle version, e.g. 2026.11.21", pattern=VERSION_RE),
                        "description": _str("free text")}, ("name", "version")),
        "target": _obj({"platform": {"type": "string", "enum": ["linux-64", "linux-aarch64"],
                                     "description": "conda platform of the target servers"},
                        "glibc": _str("oldest glibc on the target servers", pattern=_anchored(records.GLIBC_RE))}),
        "environments": {"type": "array", "items": ENV_SCHEMA},
        "models": {"type": "array", "items": MODEL_SCHEMA},
        "services": {"type": "array", "items": SERVICE_SCHEMA},
    }, ("bundle",)),
}

def _construct_scalar(node: yaml.ScalarNode) -> Any:
    return _construct(lambda loader: loader.construct_object(node, deep=True), node)


def _construct(fn, node: yaml.Node) -> Any:
    """PyYAML's safe constructors, with their own crashes (``!!timestamp`` of a non-date raises
    AttributeError, ``!!int`` of a huge value ValueError) turned into a ConstructorError at the node."""
    loader = _SCALAR_LOADER
    loader.constructed_objects, loader.recursive_objects = {}, {}
    try:
        return fn(loader)
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
        raise yaml.constructor.ConstructorError(
            None, None, f"cannot read the {node.tag} value {getattr(node, 'value', '')!r:.80} ({e})",
            node.start_mark) from e


_PY_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
             "object": dict, "null": type(None)}


class _Checker:
    """Walks the YAML node tree (for line numbers) against SCHEMA and collects problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[tuple[int, str]] = []
        self.bad_paths: set[str] = set()  # fields that already have a problem (reported once)
        self.nodes = 0

    def add(self, node: yaml.Node | None, path: str, msg: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 0
        where = f"{self.file}:{line}:{node.start_mark.column + 1}" if node is not None else self.file
        self.bad_paths.add(path)
        self.problems.append((line, f"{where}: {path or '<top>'}: {msg}"))

    def check(self, node: yaml.Node, schema: dict, path: str, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES or depth > MAX_DEPTH:
            raise _TooBig(node, path)
        if node.tag not in _PLAIN_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.add(node, path, f"the YAML tag {tag} is not accepted: only plain values (strings, numbers, "
                                 "booleans, null, lists, mappings); remove the tag")
            return None
        value = _plain(node)
        types = schema.get("type")
        if types is not None:
            tlist = types if isinstance(types, list) else [types]
            ok = any(isinstance(value, _PY_TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                     for t in tlist)
            if not ok:
                quote = (f" (write it in quotes: \"{node.value}\")"
                         if "string" in tlist and isinstance(value, (int, float)) and not isinstance(value, bool)
                         else "")
                self.add(node, path, f"expected {' or '.join(tlist)}, found {_describe(value)}{quote}")
                return None
        if isinstance(value, dict) and isinstance(node, yaml.MappingNode):
            return self._check_object(node, schema, path, depth)
        if isinstance(value, list) and isinstance(node, yaml.SequenceNode):
            items = schema.get("items", {})
            return [self.check(child, items, f"{path}[{i}]", depth + 1) for i, child in enumerate(node.value)]
        if "enum" in schema and value not in schema["enum"]:
            hint = _did_you_mean(str(value), [str(e) for e in schema["enum"]])
            self.add(node, path, f"expected one of {', '.join(map(str, schema['enum']))}, found {value!r}{hint}")
        if isinstance(value, str) and (bad := records.control_char_problem(value)):
            self.add(node, path, f"{value[:80]!r} {bad}")
            return value
        # fullmatch, not search: with search '^...$' accepts a trailing newline ("12.8\n")
        if isinstance(value, str) and "pattern" in schema and not re.fullmatch(schema["pattern"], value):
            self.add(node, path, f"{value!r} is not a valid {schema.get('description', 'value')} "
                                 f"(must match {schema['pattern']})")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema and value < schema["minimum"]:
                self.add(node, path, f"expected at least {schema['minimum']}, found {value}")
            if "maximum" in schema and value > schema["maximum"]:
                self.add(node, path, f"expected at most {schema['maximum']}, found {value}")
        return value

    def _check_object(self, node: yaml.MappingNode, schema: dict, path: str, depth: int = 0) -> dict:
        props: dict = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        out: dict = {}
        for knode, vnode in node.value:
            key = _plain(knode)
            kpath = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                self.add(knode, kpath, f"keys must be strings, found {_describe(key)}")
                continue
            if bad := records.control_char_problem(key):
                self.add(knode, kpath, f"key {key[:80]!r} {bad}")
                continue
            if key in out:
                self.add(knode, kpath, "duplicate key (the later value would silently win)")
                continue
            if key in props:
                out[key] = self.check(vnode, props[key], kpath, depth + 1)
            elif extra is False:
                self.add(knode, kpath, f"unknown key {key!r}{_did_you_mean(key, list(props))}; "
                                       f"allowed: {', '.join(props)}")
            else:
                out[key] = self.check(vnode, extra if isinstance(extra, dict) else {}, kpath, depth + 1)
        for req in schema.get("required", []):
            if req not in out and not any(_plain(k) == req for k, _ in node.value):
                self.add(node, f"{path}.{req}" if path else req, "required field is missing")
        return out


_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))


class _TooBig(Exception):
    def __init__(self, node: yaml.Node, path: str) -> None:
        self.node, self.path = node, path


def _plain(node: yaml.Node) -> Any:
    """Python value of a node (scalars resolved with YAML's core types)."""
    if isinstance(node, yaml.ScalarNode):
        return _construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return [None] * len(node.value)
    if isinstance(node, yaml.MappingNode):
        return {}
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    kind = {dict: "a mapping", list: "a list", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string"}.get(type(value), type(value).__name__)
    return kind if isinstance(value, (dict, list)) else f"{kind} {value!r}"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _node_at(root: yaml.Node, path: list[Any]) -> yaml.Node | None:
    node = root
    for part in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if _plain(k) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return None
        if node is None:
            return None
    return node


def _cross_checks(chk: _Checker, root: yaml.Node, data: dict, base: Path) -> None:
    def add(path: list[Any], msg: str) -> None:
        node = _node_at(root, path)
        chk.add(node, ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "["), msg)

    envs = data.get("environments") or []
    models = data.get("models") or []
    services = data.get("services") or []
    if not envs and not models:
        add([], "a manifest needs at least one entry under environments or models")
    for section, items in (("environments", envs), ("models", models), ("services", services)):
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            name = (item or {}).get("name")
            if isinstance(name, str):
                if name in seen:
                    add([section, i, "name"], f"duplicate name {name!r} (also {section}[{seen[name]}])")
                seen[name] = i
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
            if f"environments[{i}].prefix" not in chk.bad_paths and not _is_dir(prefix / "conda-meta"):
                add(["environments", i, "prefix"], f"{prefix} is not a conda environment (no conda-meta/)")
        if isinstance(env.get("cuda"), str):
            from installer.preflight import cuda as cuda_table

            try:
                cuda_table.min_driver(env["cuda"])
            except Exception as e:  # UsageError with the list of known versions
                add(["environments", i, "cuda"], getattr(e, "message", str(e)) +
                    " — pick a listed CUDA version, or add its minimum driver (NVIDIA's release notes) to the table")
        glibc = (data.get("target") or {}).get("glibc") or TargetSpec().glibc
        if _wants_compiler(env) and env.get("prefix") is None and isinstance(glibc, str) \
                and "target.glibc" not in chk.bad_paths and sysroot_version(glibc) is None:
            add(["environments", i, "compiler"] if "compiler" in env else ["environments", i],
                f"no conda-forge sysroot for target.glibc {glibc} (the oldest is 2.17) to carry the C compiler "
                "a CUDA environment gets by default: raise target.glibc, or set compiler: false")
        if env.get("prefix") is None and env.get("existing") is None and not env.get("conda") \
                and not env.get("python"):
            add(["environments", i], "an environment needs 'conda' specs (and usually 'python'), a 'prefix' "
                                    "or 'existing'")
    for i, m in enumerate(models):
        m = m or {}
        src = m.get("source")
        if src in ("huggingface", "modelscope"):
            if not m.get("repo"):
                add(["models", i], f"source {src} needs 'repo' (org/name)")
            if m.get("path") is not None:
                add(["models", i, "path"], f"'path' is only for source: local (source is {src})")
        elif src == "local":
            if not m.get("path"):
                add(["models", i], "source local needs 'path' (a directory on the build host)")
            elif f"models[{i}].path" not in chk.bad_paths and not _is_dir(base / str(m["path"])):
                add(["models", i, "path"], f"{base / str(m['path'])} is not a directory")
            for key in ("repo", "revision", "endpoint"):
                if m.get(key) is not None and key != "repo":
                    add(["models", i, key], f"{key!r} does not apply to source: local")
    model_names = {m.get("name") for m in models if m}
    env_names = {e.get("name") for e in envs if e}
    listeners: list[tuple[str | None, int]] = []
    where: list[int] = []
    for i, s in enumerate(services):
        s = s or {}
        if s.get("model") is not None and s["model"] not in model_names:
            add(["services", i, "model"], f"no model named {s['model']!r} in this manifest"
                                          f"{_did_you_mean(str(s['model']), [str(n) for n in model_names])}")
        if s.get("environment") is not None and s["environment"] not in env_names:
            add(["services", i, "environment"],
                f"no environment named {s['environment']!r} in this manifest"
                f"{_did_you_mean(str(s['environment']), [str(n) for n in env_names])}")
        if s.get("environment") is None and len(env_names) > 1:
            add(["services", i], "several environments: say which one with 'environment'")
        tp, pp = s.get("tensor_parallel_size") or 1, s.get("pipeline_parallel_size") or 1
        gpus = s.get("gpus")
        if isinstance(gpus, list) and gpus and isinstance(tp, int) and isinstance(pp, int) and len(gpus) != tp * pp:
            add(["services", i, "gpus"], f"{len(gpus)} GPU(s) listed but tensor_parallel_size × "
                                         f"pipeline_parallel_size = {tp * pp}")
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
            if records.field_path(path) not in chk.bad_paths:
                add(path, msg)
    for a, b in records.port_conflicts(listeners):
        s = services[where[a]] or {}
        add(["services", where[a], "port"] if "port" in s else ["services", where[a]],
            f"port {s.get('port', records.DEFAULT_PORT)}{'' if 'port' in s else ' (the default)'} is already "
            f"used by services[{where[b]}]")


def _wants_compiler(env: dict) -> bool:
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


def _yaml_problem(path: Path, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if isinstance(e, yaml.constructor.ConstructorError):
        return (f"{where}: {problem} (only plain YAML is accepted: strings, numbers, booleans, lists and "
                "mappings; remove the !!tag)")
    return f"{where}: not valid YAML: {problem}"


def load_manifest(path: str | Path) -> Manifest:
    """Parse and validate ``path``; raise ManifestError listing every problem (never a traceback)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ManifestError(str(path), ["file not found"]) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(str(path), [f"cannot read: {e}"]) from e
    try:
        root = yaml.compose(text, Loader=_COMPOSER)
        if root is None:
            raise ManifestError(str(path), [f"{path}: the file is empty"])
        chk = _Checker(str(path))
        data = chk.check(root, SCHEMA, "")
        if isinstance(data, dict):
            _cross_checks(chk, root, data, path.parent)
        if chk.problems:
            raise ManifestError(str(path), [msg for _, msg in sorted(chk.problems, key=lambda p: p[0])])
        doc = _construct(lambda loader: loader.construct_document(root), root)  # from the nodes: no 2nd parse
    except yaml.YAMLError as e:
        raise ManifestError(str(path), [_yaml_problem(path, e)]) from e
    except _TooBig as e:
        line = e.node.start_mark.line + 1
        raise ManifestError(str(path), [f"{path}:{line}: {e.path or '<top>'}: the document is nested too deeply "
                                        f"or expands to more than {MAX_NODES} values (YAML aliases?)"]) from None
    except RecursionError:
        raise ManifestError(str(path), [f"{path}: the document is nested too deeply"]) from None
    warnings = manifest_warnings(data)
    for w in warnings:
        log.warning("warning: %s: %s", path, w)
    return _to_spec(path, doc, tuple(warnings))


def _tuple(v: Any) -> tuple:
    return tuple(v or ())


def _to_spec(path: Path, d: dict, warnings: tuple[str, ...] = ()) -> Manifest:
    base = path.parent
    target = TargetSpec(**{k: str(v) for k, v in (d.get("target") or {}).items()})
    envs = []
    for e in d.get("environments") or []:
        pip = e.get("pip") or {}
        envs.append(EnvSpec(
            name=e["name"], python=e.get("python"), cuda=e.get("cuda"),
            channels=_tuple(e.get("channels", ["conda-forge"])), conda=_tuple(e.get("conda")),
            pip=PipSpec(packages=_tuple(pip.get("packages")), index_url=pip.get("index_url"),
                        extra_index_urls=_tuple(pip.get("extra_index_urls")),
                        find_links=_tuple(pip.get("find_links")), no_index=bool(pip.get("no_index", False)),
                        remove=_tuple(pip.get("remove"))),
            prefix=(base / e["prefix"]).resolve() if e.get("prefix") else None,
            download_kernels=bool(e.get("download_kernels", True)), existing=e.get("existing"),
            compiler=_wants_compiler(e)))
    models = [ModelSpec(name=m["name"], source=m["source"], repo=m.get("repo"), revision=m.get("revision"),
                        path=(base / m["path"]).resolve() if m.get("path") else None,
                        allow_patterns=_tuple(m.get("allow_patterns")),
                        ignore_patterns=_tuple(m.get("ignore_patterns")), endpoint=m.get("endpoint"))
              for m in d.get("models") or []]
    default_env = envs[0].name if len(envs) == 1 else None
    services = []
    for s in d.get("services") or []:
        kw = {k: v for k, v in s.items() if k not in ("gpus", "vllm_args", "env")}
        kw.setdefault("environment", default_env)
        services.append(ServiceSpec(**kw, gpus=_tuple(s.get("gpus")), vllm_args=_tuple(s.get("vllm_args")),
                                    env=tuple(sorted((str(k), str(v)) for k, v in (s.get("env") or {}).items()))))
    b = d["bundle"]
    return Manifest(path=path, bundle=BundleSpec(name=b["name"], version=str(b["version"]),
                                                 description=b.get("description", "")),
                    target=target, environments=tuple(envs), models=tuple(models), services=tuple(services),
                    warnings=warnings)


def schema_json() -> str:
    return json.dumps(SCHEMA, indent=2) + "\n"
