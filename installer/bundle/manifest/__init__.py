"""MANIFEST.json as typed, validated records: loaded once on the target, every field checked.

:meth:`Manifest.from_json` turns the bytes of a bundle's MANIFEST.json into frozen dataclasses, refusing
anything `pack build` would not have written: a wrong type, a name that is not a plain name (checked with
``re.fullmatch``, so ``"12.8\\n"`` is not a CUDA version), a path that is absolute or climbs with ``..``, a
newline or NUL anywhere, a ``%`` (systemd's specifier character) or shell syntax in what reaches the unit
files and the launcher. The error is a :class:`ManifestFieldError` naming the JSON path of the field
(``services[1].vllm_args[2]``). :meth:`Manifest.to_json` writes a record back as canonical JSON.

The service rules (no API key in ``vllm_args``/``env``, what an argument or a variable may contain, the
key file path, the host) live once, in :func:`service_problems` (services.py): the installer applies them to
the MANIFEST and when it renders units (installer/service/), and ``pack validate``/``pack build``
(packager/manifest.py) apply the same function to the YAML, so a bundle that the installer would refuse
is never built and signed.

``from installer.bundle.manifest import Manifest, ServiceRecord, NAME_RE, ...`` is the public face; the
modules are rules.py (patterns, allowed values, text/path/host rules), fields.py (typed field access and
:class:`ManifestFieldError`), record.py (the frozen record base), services.py, environments.py, models.py
and document.py (the whole MANIFEST: header, artifacts, cross-checks, canonical JSON).

Standard library only: this runs on the target with the bundle's bare Python.
"""

from installer.bundle.manifest.cluster import (
    MAX_NODES,
    MAX_RAY_PORT,
    ROLES,
    NodeRole,
    RaySettings,
    bundle_resource,
    cluster_problems,
)
from installer.bundle.manifest.document import (
    ArtifactRecord,
    ArtifactRef,
    BundleInfo,
    Manifest,
    TargetInfo,
    as_manifest,
)
from installer.bundle.manifest.environments import EnvFrame, EnvironmentRecord, VllmInfo, as_environment
from installer.bundle.manifest.fields import ManifestFieldError
from installer.bundle.manifest.models import HEX40_RE, HEX64_RE, AdapterInfo, ModelFile, ModelRecord
from installer.bundle.manifest.rules import (
    ABS_PATH_RE,
    API_KEY_ENV,
    ARCHES,
    CLIMB_RE,
    COMMIT_RE,
    CUDA_RE,
    CUDA_RUNTIME_RE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DRIVER_RE,
    DTYPES,
    ENV_KEY_RE,
    FORBIDDEN_IN_VALUES,
    GLIBC_RE,
    HOSTNAME_RE,
    LOOPBACK_HOSTS,
    MAX_TEXT,
    MODULE_RE,
    NAME_RE,
    PATH_PART_RE,
    PLATFORMS,
    PYTHON_RE,
    REPO_RE,
    REVISION_RE,
    RUNTIME_ARTIFACT_RE,
    RUNTIME_PYTHON_RE,
    SERVE_BY,
    SERVED_NAME_RE,
    SHA256_RE,
    SONAME_RE,
    SOURCES,
    TOOL_RE,
    URL_RE,
    VERSION_RE,
    Problem,
    abs_path_problem,
    control_char_problem,
    field_path,
    host_problem,
    is_loopback,
    relpath_problem,
    value_problem,
)
from installer.bundle.manifest.services import (
    SERVICE_FIELDS,
    WILDCARD_HOSTS,
    ServiceRecord,
    as_service,
    port_conflicts,
    service_problems,
    service_warnings,
)
from installer.bundle.manifest.tasks import (
    LORA_RANKS,
    MAX_LORA_RANK,
    TASKS,
    adapter_problems,
    lora_flags,
    parse_version,
    rank_problem,
    task_flags,
    task_problems,
)

__all__ = [
    "ABS_PATH_RE", "API_KEY_ENV", "ARCHES", "CLIMB_RE", "COMMIT_RE", "CUDA_RE", "CUDA_RUNTIME_RE", "DEFAULT_HOST",
    "DEFAULT_PORT", "DRIVER_RE", "DTYPES", "ENV_KEY_RE", "FORBIDDEN_IN_VALUES", "GLIBC_RE", "HEX40_RE", "HEX64_RE",
    "HOSTNAME_RE", "LOOPBACK_HOSTS", "MAX_TEXT", "MODULE_RE", "NAME_RE", "PATH_PART_RE", "PLATFORMS", "PYTHON_RE",
    "REPO_RE", "REVISION_RE", "RUNTIME_ARTIFACT_RE", "RUNTIME_PYTHON_RE", "SERVED_NAME_RE", "SERVE_BY",
    "SERVICE_FIELDS", "SHA256_RE", "SONAME_RE", "SOURCES", "TOOL_RE", "URL_RE", "VERSION_RE", "WILDCARD_HOSTS",
    "LORA_RANKS", "MAX_LORA_RANK", "TASKS", "AdapterInfo", "adapter_problems", "lora_flags", "parse_version",
    "rank_problem", "task_flags", "task_problems",
    "MAX_NODES", "MAX_RAY_PORT", "ROLES", "NodeRole", "RaySettings", "bundle_resource", "cluster_problems",
    "ArtifactRecord", "ArtifactRef", "BundleInfo", "EnvFrame", "EnvironmentRecord", "Manifest", "ManifestFieldError",
    "ModelFile", "ModelRecord", "Problem", "ServiceRecord", "TargetInfo", "VllmInfo", "abs_path_problem",
    "as_environment", "as_manifest", "as_service", "control_char_problem", "field_path", "host_problem",
    "is_loopback", "port_conflicts", "relpath_problem", "service_problems", "service_warnings", "value_problem",
]
