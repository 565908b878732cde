"""`load_manifest`: read manifest.yaml, validate it (schema, then the semantic rules), build the typed spec.

Validation happens before anything is downloaded and reports every problem at once, each with the file,
line, column, field path, what was expected and what was found, plus a "did you mean" for unknown keys and
names. The steps: compose the YAML (no object is constructed from a tag), turn the nodes into data with
their locations (``nodes``), check that data against the published JSON Schema with jsonschema
(``validate``), then the rules the schema cannot express (``rules``); only a manifest with no problem is
constructed into ``packager.spec.Manifest``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from installer.bundle import manifest as records
from packager.errors import ManifestError
from packager.manifest.nodes import COMPOSER, MAX_NODES, NodeTree, TooBig, construct
from packager.manifest.problems import Problems
from packager.manifest.rules import cross_checks, manifest_warnings, wants_compiler
from packager.manifest.schema import SCHEMA
from packager.manifest.validate import check_schema
from packager.spec import BundleSpec, EnvSpec, Manifest, ModelSpec, PipSpec, ServiceSpec, TargetSpec

log = logging.getLogger("packager.manifest")


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
        root = yaml.compose(text, Loader=COMPOSER)
        if root is None:
            raise ManifestError(str(path), [f"{path}: the file is empty"])
        problems = Problems(str(path))
        tree = NodeTree(problems)
        data = check_schema(tree.build(root, SCHEMA), tree, problems)
        if isinstance(data, dict):
            cross_checks(problems, tree, data, path.parent)
        if problems:
            raise ManifestError(str(path), problems.messages())
        doc = construct(lambda loader: loader.construct_document(root), root)  # from the nodes: no 2nd parse
    except yaml.YAMLError as e:
        raise ManifestError(str(path), [_yaml_problem(path, e)]) from e
    except TooBig as e:
        line = e.node.start_mark.line + 1
        raise ManifestError(str(path), [f"{path}:{line}: {records.field_path(e.path)}: the document is nested too "
                                        f"deeply or expands to more than {MAX_NODES} values (YAML aliases?)"]) from None
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
            compiler=wants_compiler(e)))
    models = [ModelSpec(name=m["name"], source=m["source"], repo=m.get("repo"), revision=m.get("revision"),
                        path=(base / m["path"]).resolve() if m.get("path") else None,
                        allow_patterns=_tuple(m.get("allow_patterns")),
                        ignore_patterns=_tuple(m.get("ignore_patterns")), endpoint=m.get("endpoint"))
              for m in d.get("models") or []]
    models += [ModelSpec(name=a["name"], source=a["source"], repo=a.get("repo"), revision=a.get("revision"),
                         path=(base / a["path"]).resolve() if a.get("path") else None,
                         allow_patterns=_tuple(a.get("allow_patterns")),
                         ignore_patterns=_tuple(a.get("ignore_patterns")), endpoint=a.get("endpoint"),
                         adapter_of=a["base"])
               for a in d.get("adapters") or []]
    default_env = envs[0].name if len(envs) == 1 else None
    services = []
    for s in d.get("services") or []:
        kw = {k: v for k, v in s.items() if k not in ("gpus", "vllm_args", "env", "ray")}
        if s.get("ray") is not None:
            kw["ray"] = tuple(sorted(s["ray"].items()))
        kw.setdefault("environment", default_env)
        services.append(ServiceSpec(**kw, gpus=_tuple(s.get("gpus")), vllm_args=_tuple(s.get("vllm_args")),
                                    env=tuple(sorted((str(k), str(v)) for k, v in (s.get("env") or {}).items()))))
    b = d["bundle"]
    return Manifest(path=path, bundle=BundleSpec(name=b["name"], version=str(b["version"]),
                                                 description=b.get("description", "")),
                    target=target, environments=tuple(envs), models=tuple(models), services=tuple(services),
                    warnings=warnings)
