"""systemd integration on the target: the `llm@.service` template, one env file per instance, the `llm` user.

Layout written under ``root`` (``/`` on a live server, a staging tree with ``--root``)::

    /etc/systemd/system/llm@.service                          the template (installer/units/llm@.service)
    /etc/systemd/system/llm@<name>.service.d/devices.conf     per instance: CPU (no devices) or NVIDIA devices
    /etc/llm/<name>.env                                        per instance: offline, paths, vLLM args
    /opt/llm/bin/llm-serve                                     bash launcher: env file -> vLLM command line
    /etc/sysusers.d/llm.conf                                   the system user `llm` (also re-created at boot)

Standard library only: this runs on the bundle's minimal Python. ``systemctl`` is only ever run against the
live system (``root`` is ``/``); with a staging tree only unit-file verbs (``enable``...) run, with
``--root``.
See docs/systemd.md.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from installer.bundle import manifest as records
from installer.bundle.manifest import EnvironmentRecord, Manifest, ServiceRecord
from installer.errors import InstallError, UsageError
from installer.fsutil import write_atomic

log = logging.getLogger(__name__)

USER = "llm"
GROUP = "llm"
TEMPLATE = "llm@.service"
UNIT_DIR = Path("etc/systemd/system")
ENV_DIR = Path("etc/llm")
LAUNCHER = Path("opt/llm/bin/llm-serve")
SYSUSERS_CONF = Path("etc/sysusers.d/llm.conf")
DROPIN_NAME = "devices.conf"
KEY_DROPIN_NAME = "api-key.conf"  # LoadCredential= of the instance's API key file
CREDENTIAL_NAME = "api-key"
# LoadCredential= came with systemd 247, the %d specifier (the credentials directory) with 248.
MIN_CREDENTIALS_SYSTEMD = 248
CACHE_ROOT = Path("/var/cache/llm")  # CacheDirectory=llm/%i
DEFAULT_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNITS_SRC = Path(__file__).resolve().parent / "units"

# /proc/devices names of the NVIDIA character devices CUDA opens (seen on driver 580: nvidia, nvidiactl,
# nvidia-uvm, nvidia-caps; older drivers call major 195 nvidia-frontend). A name the running driver does
# not have is skipped by systemd.
NVIDIA_DEVICE_GROUPS = ("nvidia-frontend", "nvidia", "nvidiactl", "nvidia-uvm", "nvidia-caps")
NVIDIA_MODPROBE_PATHS = ("usr/bin/nvidia-modprobe", "usr/sbin/nvidia-modprobe", "bin/nvidia-modprobe")
# systemctl verbs that only edit unit files, so they work on a staging tree with --root
UNIT_FILE_VERBS = frozenset(
    {"enable", "disable", "reenable", "preset", "mask", "unmask", "is-enabled", "revert"}
)

_NAME_RE = records.NAME_RE  # always fullmatch: with match/search, '$' lets a trailing newline through
_PLAIN_VALUE_RE = re.compile(r"[A-Za-z0-9_./:,@+=-]*")


class InstancePaths(NamedTuple):
    """Where one service's parts are on the target (absolute target paths, not prefixed with ``root``).

    ``model_path`` is what vLLM gets as ``--model``: the model directory, or the repo id when the service is
    served by repo id from the Hugging Face cache view ``hf_cache``. ``env_meta`` is the environment's
    MANIFEST entry (a record or its dict) when the manifest being installed does not carry it (a
    model-only bundle).
    """

    env_prefix: Path
    model_path: str
    hf_cache: Path | None = None
    env_meta: Mapping | EnvironmentRecord | None = None


# --------------------------------------------------------------------------- names and paths


def check_instance_name(name: str) -> str:
    """Service names become unit instance names and file names: keep them plain."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"service name {name!r} cannot name a systemd instance",
            hint="use letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit)",
        )
    return name


def unit_name(name: str) -> str:
    return f"llm@{check_instance_name(name)}.service"


def env_file_path(root: Path, name: str) -> Path:
    return Path(root) / ENV_DIR / f"{check_instance_name(name)}.env"


def dropin_path(root: Path, name: str) -> Path:
    return Path(root) / UNIT_DIR / f"{unit_name(name)}.d" / DROPIN_NAME


def key_dropin_path(root: Path, name: str) -> Path:
    return Path(root) / UNIT_DIR / f"{unit_name(name)}.d" / KEY_DROPIN_NAME


def cache_dir(name: str) -> Path:
    return CACHE_ROOT / check_instance_name(name)


def as_service(service: ServiceRecord | Mapping) -> ServiceRecord:
    """The record of a ``services[]`` entry; a dict is checked with the service rules first (UsageError)."""
    if isinstance(service, ServiceRecord):
        return service
    problems = records.service_problems(service)
    if problems:
        rel, msg = problems[0]
        raise UsageError(f"service {service.get('name')!r}: {records.field_path(rel)}: {msg}",
                         hint="fix the manifest's services[] entry (`pack validate` checks the same rules)")
    return records.as_service(service)


def as_env(env_meta: EnvironmentRecord | Mapping) -> EnvironmentRecord:
    return records.as_environment(env_meta)


def is_cpu_env(env_meta: EnvironmentRecord | Mapping) -> bool:
    """An environment built without CUDA (``cuda: null``) serves on CPU."""
    return as_env(env_meta).is_cpu


# --------------------------------------------------------------------------- env file


def env_quote(value: str) -> str:
    """A value as systemd's EnvironmentFile= parser reads it back unchanged."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"environment value {value!r} contains a line break or NUL")
    if _PLAIN_VALUE_RE.fullmatch(value):
        return value
    escaped = "".join("\\" + c if c in '"\\`$' else c for c in value)
    return f'"{escaped}"'


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _command(env: EnvironmentRecord, env_prefix: Path) -> tuple[str, str]:
    """(absolute python, module) from the environment's ``vllm.command`` (``[bin/python, -m, module]``)."""
    cmd = list(env.vllm.command) if env.vllm is not None else []
    if len(cmd) >= 3 and cmd[1] == "-m":
        return str(env_prefix / cmd[0]), cmd[2]
    if cmd and cmd != ["bin/python", "-m"]:
        log.warning(
            "environment %s: vllm.command %r is not `python -m module`; using bin/python -m %s",
            env.name,
            cmd,
            DEFAULT_ENTRYPOINT,
        )
    return str(env_prefix / "bin" / "python"), DEFAULT_ENTRYPOINT


def render_env_file(
    service: ServiceRecord | Mapping,
    env_meta: EnvironmentRecord | Mapping,
    *,
    env_prefix: Path,
    model_path: str,
    hf_cache: Path | None,
    bundle: records.BundleInfo | Mapping | None = None,
    key_via_credential: bool = False,
) -> str:
    """The text of ``/etc/llm/<service>.env`` (read by systemd and by the ``llm-serve`` launcher).

    ``service`` is a MANIFEST ``services[]`` entry, ``env_meta`` its ``environments[]`` entry,
    ``env_prefix`` the environment's install dir on the target, ``model_path`` what vLLM gets as ``--model``
    (a directory, or the repo id when ``hf_cache`` is the Hugging Face cache view to serve it from).
    The API key itself never appears: only ``LLM_API_KEY_FILE``, read by the launcher at start. With
    ``key_via_credential`` the key reaches the service through ``LoadCredential=`` (:func:`render_key_dropin`
    sets ``LLM_API_KEY_FILE`` to the credential) and the env file does not name the operator's file.
    """
    svc = as_service(service)
    env = as_env(env_meta)
    name = check_instance_name(svc.name)
    cpu = env.is_cpu
    python, module = _command(env, Path(env_prefix))
    cache = cache_dir(name)
    host = svc.host
    if isinstance(bundle, Mapping):
        bundle = records.BundleInfo(name=str(bundle.get("name")), version=str(bundle.get("version")))

    entries: dict[str, str] = {}

    def put(key: str, value: object) -> None:
        if value is not None:
            entries[key] = _fmt(value)

    put("LLM_INSTANCE", name)
    if bundle:
        put("LLM_BUNDLE", f"{bundle.name} {bundle.version}")
        put("LLM_BUNDLE_VERSION", bundle.version)
    put("LLM_ENVIRONMENT", env.name)
    # offline, no telemetry
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "VLLM_NO_USAGE_STATS",
        "DO_NOT_TRACK",
        "HF_HUB_DISABLE_TELEMETRY",
    ):
        put(key, 1)
    # vLLM guesses the host's address with a UDP connect towards 8.8.8.8 unless told; the address is only used
    # by vLLM's processes to reach each other, and a single-host server reaches them on loopback whatever
    # address the API listens on. Multi-host setups set VLLM_HOST_IP in the service's `env`.
    put("VLLM_HOST_IP", "127.0.0.1")
    # devices
    if not cpu and svc.gpus:
        put("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in svc.gpus))
    if cpu:
        put("VLLM_CPU_KVCACHE_SPACE", 1)  # GiB of KV cache; vLLM CPU refuses to guess
    # paths: the env's tools first (conda-pack shebangs are `#!/usr/bin/env python`), writable caches
    put("PATH", f"{Path(env_prefix) / 'bin'}:{SYSTEM_PATH}")
    put("HOME", cache)
    put("XDG_CACHE_HOME", cache / ".cache")
    put("VLLM_CACHE_ROOT", cache / "vllm")
    put("HF_HOME", cache / "huggingface")  # writable: trust-remote-code modules land in HF_HOME/modules
    if hf_cache is not None:
        put("HF_HUB_CACHE", hf_cache)
    # the launcher's inputs
    put("LLM_PYTHON", python)
    put("LLM_ENTRYPOINT", module)
    put("LLM_MODEL", model_path)
    put("LLM_SERVED_MODEL_NAME", svc.api_name)
    put("LLM_HOST", host)
    put("LLM_PORT", svc.port)
    put("LLM_MAX_MODEL_LEN", svc.max_model_len)
    put("LLM_TENSOR_PARALLEL_SIZE", svc.tensor_parallel_size)
    put("LLM_PIPELINE_PARALLEL_SIZE", svc.pipeline_parallel_size)
    put("LLM_DTYPE", svc.dtype)
    put("LLM_GPU_MEMORY_UTILIZATION", svc.gpu_memory_utilization)
    if svc.trust_remote_code:
        put("LLM_TRUST_REMOTE_CODE", 1)
    if svc.api_key_file and not key_via_credential:
        put("LLM_API_KEY_FILE", svc.api_key_file)
    for i, arg in enumerate(svc.vllm_args, start=1):
        put(f"LLM_ARG_{i}", arg)
    # the manifest's own variables last: they win over the defaults above (names and values are checked
    # by the service rules, installer/records.py)
    for key, value in svc.env.items():
        put(key, value)

    lines = [
        f"# /etc/llm/{name}.env: environment of {unit_name(name)}, written by the llm-pack installer.",
        "# The installer rewrites this file; change the manifest's services[] entry (env, vllm_args).",
        "# LLM_* variables are read by /opt/llm/bin/llm-serve, which builds the vLLM command line.",
    ]
    lines += [f"{k}={env_quote(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


def parse_env_file(text: str) -> dict[str, str]:
    """Read back an env file written by :func:`render_env_file` (quoted values unescaped)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r'\\(["\\`$])', r"\1", value[1:-1])
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------- device drop-in


def render_devices_dropin(env_meta: EnvironmentRecord | Mapping, *, nvidia_modprobe: str | None = None) -> str:
    """``llm@<name>.service.d/devices.conf``: no devices for CPU builds, NVIDIA devices for CUDA builds."""
    env = as_env(env_meta)  # cuda is a checked version ("12.8"), never text that could end the comment line
    head = "# Written by the llm-pack installer: device access of this instance (docs/systemd.md).\n"
    head += "[Service]\n"
    if env.is_cpu:
        return head + (
            "# CPU build: a private /dev with only the pseudo devices (and /dev/shm).\nPrivateDevices=yes\n"
        )
    lines = [
        f"# CUDA build ({env.cuda}): the host's /dev, but only NVIDIA devices are allowed.",
        "PrivateDevices=no",
        "DevicePolicy=closed",
    ]
    lines += [f"DeviceAllow=char-{group} rw" for group in NVIDIA_DEVICE_GROUPS]
    if nvidia_modprobe:
        if nvidia_modprobe not in ["/" + p for p in NVIDIA_MODPROBE_PATHS]:
            raise InstallError(f"unexpected nvidia-modprobe path {nvidia_modprobe!r}")
        lines += [
            "# /dev/nvidia-uvm appears only once something privileged loads nvidia-uvm; the service itself",
            "# cannot ('+': this one command runs as root, '-': failure is not fatal).",
            f"ExecStartPre=-+{nvidia_modprobe} -u -c=0",
        ]
    return head + "\n".join(lines) + "\n"


def render_key_dropin(service: ServiceRecord | Mapping) -> str:
    """``llm@<name>.service.d/api-key.conf``: systemd reads the API key file as root when the unit starts and
    hands it to the service in its credentials directory, so the key file stays root:root 0600 and the
    service user needs no access to it (no group to create first, nothing owned by the service's ids)."""
    svc = as_service(service)
    if not svc.api_key_file:
        raise UsageError(f"service {svc.name} has no api_key_file")
    return (
        "# Written by the llm-pack installer: the API key of this instance (docs/systemd.md).\n"
        "# systemd reads the file as root at start; the service reads its private copy in $CREDENTIALS_DIRECTORY.\n"
        "[Service]\n"
        f"LoadCredential={CREDENTIAL_NAME}:{svc.api_key_file}\n"
        f"Environment=LLM_API_KEY_FILE=%d/{CREDENTIAL_NAME}\n"
    )


def systemd_version(root: Path = Path("/")) -> int | None:
    """The systemd version of ``root``: ``systemctl --version`` on the live system, else the version in the
    name of the tree's ``libsystemd-shared-NNN.so``; None when there is no systemd."""
    root = Path(root)
    if root == Path("/") and shutil.which("systemctl"):
        try:
            r = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            r = None
        m = re.match(r"systemd ([0-9]+)", r.stdout if r is not None else "")
        if m:
            return int(m.group(1))
    found = []
    for pattern in ("usr/lib/systemd/libsystemd-shared-*.so", "usr/lib/*/systemd/libsystemd-shared-*.so",
                    "usr/lib64/systemd/libsystemd-shared-*.so", "lib/systemd/libsystemd-shared-*.so"):
        for p in root.glob(pattern):
            m = re.match(r"libsystemd-shared-([0-9]+)", p.name)
            if m:
                found.append(int(m.group(1)))
    return max(found) if found else None


def uses_credentials(root: Path = Path("/")) -> bool:
    """True when the target's systemd hands API keys over with ``LoadCredential=`` (systemd ≥ 248)."""
    v = systemd_version(root)
    return v is not None and v >= MIN_CREDENTIALS_SYSTEMD


def find_nvidia_modprobe(root: Path) -> str | None:
    for rel in NVIDIA_MODPROBE_PATHS:
        if os.access(Path(root) / rel, os.X_OK):
            return "/" + rel
    return None


def template_text() -> str:
    return (UNITS_SRC / TEMPLATE).read_text(encoding="utf-8")


def launcher_text() -> str:
    return (UNITS_SRC / LAUNCHER.name).read_text(encoding="utf-8")


def install_units(
    root: Path,
    manifest: Manifest | Mapping,
    resolve_paths: Callable[[Mapping], InstancePaths | tuple],
    *,
    services: Iterable[str] | None = None,
) -> list[Path]:
    """Write the template, the launcher, and each service's env file and drop-ins under ``root``.

    ``manifest`` is the bundle's :class:`~installer.bundle.manifest.Manifest` (or its dict, validated here).
    ``resolve_paths(service)`` returns :class:`InstancePaths` (or a tuple in its order) for a MANIFEST
    ``services[]`` entry (given as a dict): absolute target paths. ``services`` limits the instances
    written (default: all). Every file is replaced atomically; nothing is started. Returns the paths
    written (under ``root``). Run :func:`daemon_reload` afterwards on a live system.
    """
    root = Path(root)
    m = records.as_manifest(manifest)
    wanted = set(services) if services is not None else None
    modprobe = find_nvidia_modprobe(root)
    credentials = uses_credentials(root)
    planned: list[tuple[Path, str, int]] = []
    stale: list[Path] = []
    for svc in m.services:
        if wanted is not None and svc.name not in wanted:
            continue
        paths = InstancePaths(*resolve_paths(svc.to_dict()))
        env_meta = m.environment(svc.environment) or paths.env_meta
        if env_meta is None:
            raise InstallError(
                f"service {svc.name}: environment {svc.environment!r} is neither in this "
                "bundle nor installed",
                hint="install a bundle with that environment first",
            )
        env = as_env(env_meta)
        via_credential = credentials and svc.api_key_file is not None
        text = render_env_file(
            svc,
            env,
            env_prefix=paths.env_prefix,
            model_path=paths.model_path,
            hf_cache=paths.hf_cache,
            bundle=m.bundle,
            key_via_credential=via_credential,
        )
        planned.append((env_file_path(root, svc.name), text, 0o644))
        planned.append((dropin_path(root, svc.name), render_devices_dropin(env, nvidia_modprobe=modprobe), 0o644))
        if via_credential:
            planned.append((key_dropin_path(root, svc.name), render_key_dropin(svc), 0o644))
        else:
            stale.append(key_dropin_path(root, svc.name))
        for problem in check_api_key_file(root, svc.api_key_file, via_credential=credentials):
            log.warning("service %s: %s", svc.name, problem)
    planned.insert(0, (root / UNIT_DIR / TEMPLATE, template_text(), 0o644))
    planned.insert(1, (root / LAUNCHER, launcher_text(), 0o755))
    for d in (root / ENV_DIR, root / LAUNCHER.parent):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
    written = [write_atomic(path, text, mode) for path, text, mode in planned]
    for p in stale:  # a key dropped from the manifest, or a systemd without credentials now
        p.unlink(missing_ok=True)
    return written


def key_install_command(key_file: str, *, via_credential: bool) -> str:
    """How the operator puts the API key in place (before the first install)."""
    if via_credential:
        return f"install -D -m 0600 -o root -g root KEYFILE {key_file}"
    return f"install -D -m 0640 -o root -g {GROUP} KEYFILE {key_file}"


def check_api_key_file(root: Path, key_file: str | None, *, via_credential: bool | None = None) -> list[str]:
    """Problems with an API key file on the target (it is placed there by the operator, never bundled).

    ``via_credential`` (default: :func:`uses_credentials`): systemd reads the file as root
    (``LoadCredential=``), so it must exist and be private, and the service user needs no access. Without
    credentials (systemd < 248) the service user reads the file itself: it must exist and be readable by
    the group ``llm``, which must exist first.
    """
    if not key_file:
        return []
    if via_credential is None:
        via_credential = uses_credentials(root)
    path = Path(root) / str(key_file).lstrip("/")
    try:
        st = path.stat()
    except FileNotFoundError:
        return [
            f"API key file {key_file} does not exist; the service cannot start until it does "
            f"({key_install_command(key_file, via_credential=via_credential)})"
        ]
    except OSError as e:
        return [f"API key file {key_file} cannot be read: {e.strerror}"]
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append(f"API key file {key_file} is not a regular file")
    if st.st_mode & 0o007:
        problems.append(
            f"API key file {key_file} is readable by every user (mode {st.st_mode & 0o777:04o}); "
            f"chmod 0640 {key_file}"
        )
    if st.st_mode & 0o020:
        problems.append(f"API key file {key_file} is writable by its group; chmod 0640 {key_file}")
    if via_credential:
        return problems  # systemd (root) reads it; the service sees only its private copy
    uid, gid = _llm_ids(root)
    if uid is None:
        problems.append(
            f"API key file {key_file} cannot be read by user {USER}: the user does not exist yet, and this "
            f"systemd (< {MIN_CREDENTIALS_SYSTEMD}) has no LoadCredential=; create it first: "
            f"useradd --system --user-group --no-create-home --shell {_nologin(root)} {USER}, then "
            f"chown root:{GROUP} {key_file} && chmod 0640 {key_file}"
        )
        return problems
    readable = (
        (st.st_uid == uid and st.st_mode & 0o400)
        or (st.st_gid == gid and st.st_mode & 0o040)
        or st.st_mode & 0o004
    )
    if uid is not None and not readable:
        problems.append(
            f"API key file {key_file} is not readable by user {USER}; "
            f"chown root:{GROUP} {key_file} && chmod 0640 {key_file}"
        )
    return problems


# --------------------------------------------------------------------------- the system user


def _passwd_entry(root: Path, name: str) -> list[str] | None:
    if Path(root) == Path("/"):
        try:
            p = pwd.getpwnam(name)
        except KeyError:
            return None
        return [p.pw_name, "x", str(p.pw_uid), str(p.pw_gid)]
    try:
        text = (Path(root) / "etc/passwd").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        fields = line.split(":")
        if fields and fields[0] == name:
            return fields
    return None


def _group_id(root: Path, name: str) -> int | None:
    if Path(root) == Path("/"):
        import grp

        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None
    try:
        text = (Path(root) / "etc/group").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    return None


def _llm_ids(root: Path) -> tuple[int | None, int | None]:
    entry = _passwd_entry(root, USER)
    if not entry or len(entry) < 4:
        return None, None
    return int(entry[2]), int(entry[3])


def sysusers_text(root: Path) -> str:
    return (
        "# Written by the llm-pack installer: the unprivileged user of llm@.service.\n"
        f'u {USER} - "LLM inference server (llm-pack)" /nonexistent {_nologin(root)}\n'
    )


def _nologin(root: Path) -> str:
    for rel in ("usr/sbin/nologin", "sbin/nologin"):
        if (Path(root) / rel).exists():
            return "/" + rel
    return "/bin/false"


def ensure_user(root: Path) -> bool:
    """Make sure the system user and group ``llm`` exist; True if this call created them.

    Writes ``/etc/sysusers.d/llm.conf`` (so an image made from a staging tree gets the user at boot too),
    then creates the user with ``systemd-sysusers`` or, failing that, ``useradd --system`` / ``adduser
    --system``. In a staging tree the user is added to its ``/etc/passwd`` (``--root``) when it has one.
    """
    root = Path(root)
    conf = write_atomic(root / SYSUSERS_CONF, sysusers_text(root))
    if _passwd_entry(root, USER) is not None:
        return False
    live = root == Path("/")
    if not live and not (root / "etc/passwd").exists():
        log.info("%s has no etc/passwd: user %s is created at boot from %s", root, USER, SYSUSERS_CONF)
        return False
    nologin = _nologin(root)
    root_opt = [] if live else [f"--root={root}"]
    attempts = [
        ["systemd-sysusers", *root_opt, str(conf)],
        [
            "useradd",
            *([] if live else ["--prefix", str(root)]),
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            nologin,
            "--comment",
            "LLM inference server (llm-pack)",
            USER,
        ],
    ]
    if live:
        attempts.append(
            [
                "adduser",
                "--system",
                "--group",
                "--no-create-home",
                "--home",
                "/nonexistent",
                "--shell",
                nologin,
                USER,
            ]
        )
    errors = []
    for cmd in attempts:
        if shutil.which(cmd[0]) is None:
            errors.append(f"{cmd[0]}: not found")
            continue
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode == 0 and _passwd_entry(root, USER) is not None:
            log.info("created system user %s with %s", USER, cmd[0])
            return True
        errors.append(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    raise InstallError(
        f"could not create the system user {USER!r}:\n  " + "\n  ".join(errors),
        hint=f"create it by hand: useradd --system --user-group --no-create-home --shell {nologin} {USER}",
    )


# Where files owned by the service user or group can be: its state, caches, the operator's key files.
SERVICE_ID_DIRS = ("etc/llm", "var/cache/llm", "var/lib/llm", "opt/llm", "run/llm")


def files_owned_by_service_ids(root: Path, extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Files under ``root`` owned by the ``llm`` user or group (target paths, sorted).

    Looks in :data:`SERVICE_ID_DIRS` and at the ``extra`` target paths (e.g. every ``api_key_file`` of the
    installed services, which may live anywhere). A removed user or group whose numeric id is still on
    a file hands that file to whoever gets the id next.
    """
    root = Path(root)
    entry = _passwd_entry(root, USER)
    uid = int(entry[2]) if entry and len(entry) >= 4 and entry[2].isdigit() else None
    gid = _group_id(root, GROUP)
    if uid is None and gid is None:
        return []
    found: set[Path] = set()

    def look(p: Path) -> None:
        try:
            st = p.lstat()
        except OSError:
            return
        if st.st_uid == uid or st.st_gid == gid:
            found.add(Path("/") / p.relative_to(root))

    for d in SERVICE_ID_DIRS:
        top = root / d
        if not top.exists():
            continue
        look(top)
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames + filenames:
                look(Path(dirpath, n))
    for e in extra:
        look(root / str(e).lstrip("/"))
    return sorted(found)


def user_removal_decision(root: Path, extra: Iterable[str | os.PathLike[str]] = ()) -> tuple[bool, str]:
    """``(remove, why)``: the ``llm`` user and group may go only when no file references their ids."""
    owned = files_owned_by_service_ids(root, extra)
    if not owned:
        return True, f"no file is owned by user {USER} or group {GROUP}"
    shown = ", ".join(str(p) for p in owned[:5]) + (" ..." if len(owned) > 5 else "")
    return False, (f"kept user {USER} and group {GROUP}: {len(owned)} file(s) still owned by them ({shown}); "
                   f"a later user or group with the same id would own them. Remove or chown those files, "
                   f"then run: userdel {USER}")


def remove_user(root: Path, *, referenced: Iterable[str | os.PathLike[str]] = ()) -> bool:
    """Remove the ``llm`` user and its sysusers.d entry (only call it if :func:`ensure_user` created it).

    The user and group are kept (and the sysusers.d entry with them) while a file is still owned by them
    (:func:`user_removal_decision`; ``referenced`` adds target paths to look at, e.g. API key files):
    returns False then and logs why.
    """
    root = Path(root)
    if _passwd_entry(root, USER) is None:
        (root / SYSUSERS_CONF).unlink(missing_ok=True)
        return False
    remove, why = user_removal_decision(root, referenced)
    if not remove:
        log.warning("%s", why)
        return False
    (root / SYSUSERS_CONF).unlink(missing_ok=True)
    cmd = ["userdel", *([] if root == Path("/") else ["--prefix", str(root)]), USER]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise InstallError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return True


# --------------------------------------------------------------------------- systemctl


def systemd_running() -> bool:
    """True when systemd is PID 1 here (the check systemd's own sd_booted() makes)."""
    return os.path.isdir("/run/systemd/system")


def systemctl(*args: str, root: Path = Path("/"), check: bool = True) -> subprocess.CompletedProcess:
    """Run ``systemctl ARGS`` on the live system.

    With a staging ``root`` only unit-file verbs (enable, disable, mask...) run, as ``systemctl --root``;
    anything that would touch running services is refused.
    """
    root = Path(root)
    cmd = ["systemctl"]
    if root != Path("/"):
        if not args or args[0] not in UNIT_FILE_VERBS:
            raise InstallError(
                f"`systemctl {' '.join(args)}` would act on the running system, but the target is "
                f"the staging tree {root}",
                hint="start services after booting the image",
            )
        cmd.append(f"--root={root}")
    elif not systemd_running():
        raise InstallError(
            "systemd is not running on this machine (no /run/systemd/system)",
            hint="install with --root DIR for an image, or run on a server booted with systemd",
        )
    cmd += list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise InstallError(
            f"`{' '.join(cmd)}` failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}",
            hint="see `journalctl -xe` and `systemctl status` of the unit",
        )
    return r


def daemon_reload(root: Path = Path("/")) -> None:
    """``systemctl daemon-reload`` on a live system; nothing to do for a staging tree."""
    if Path(root) == Path("/"):
        systemctl("daemon-reload")


def enable(names: Iterable[str], root: Path = Path("/")) -> None:
    units = [unit_name(n) for n in names]
    if units:
        systemctl("enable", *units, root=root)


def disable(names: Iterable[str], root: Path = Path("/")) -> None:
    units = [unit_name(n) for n in names]
    if units:
        systemctl("disable", *units, root=root, check=False)


def start(names: Iterable[str], root: Path = Path("/")) -> None:
    units = [unit_name(n) for n in names]
    if units:
        systemctl("start", *units, root=root)


def stop(names: Iterable[str], root: Path = Path("/")) -> None:
    units = [unit_name(n) for n in names]
    if units and Path(root) == Path("/"):
        systemctl("stop", *units)


def restart_instances(names: Iterable[str], root: Path = Path("/")) -> list[str]:
    """Restart the given instances that are running (``try-restart``); returns those restarted.

    A staging tree has nothing running: returns [].
    """
    if Path(root) != Path("/"):
        return []
    running = [n for n in names if unit_property(n, "ActiveState") in ("active", "activating", "reloading")]
    if running:
        systemctl("try-restart", *[unit_name(n) for n in running])
    return running


def unit_properties(name: str, props: Iterable[str]) -> dict[str, str]:
    """``systemctl show -p ...`` of one instance on the live system ({} when systemd is not running)."""
    if not systemd_running():
        return {}
    r = systemctl("show", unit_name(name), "-p", ",".join(props), check=False)
    out = {}
    for line in r.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def unit_property(name: str, prop: str) -> str | None:
    return unit_properties(name, [prop]).get(prop)


def installed_instances(root: Path = Path("/")) -> list[str]:
    """Instance names that have an env file in ``/etc/llm``."""
    d = Path(root) / ENV_DIR
    return sorted(p.stem for p in d.glob("*.env") if _NAME_RE.fullmatch(p.stem)) if d.is_dir() else []


def remove_units(root: Path, names: Iterable[str]) -> list[Path]:
    """Stop and disable the instances (live system), delete their env files and drop-ins.

    When no instance is left, the template and the launcher go too. Returns the paths removed.
    """
    root = Path(root)
    names = [check_instance_name(n) for n in names]
    if root == Path("/") and systemd_running() and names:
        systemctl("disable", "--now", *[unit_name(n) for n in names], check=False)
    removed: list[Path] = []
    for n in names:
        for p in (env_file_path(root, n), dropin_path(root, n), key_dropin_path(root, n)):
            if p.exists() or p.is_symlink():  # the installer's are links through /etc/llm/lines/: maybe dangling
                p.unlink()
                removed.append(p)
        d = dropin_path(root, n).parent
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
        # the instance's CacheDirectory= (systemd made it for our unit: vLLM's caches), /var/cache/llm/<name>
        cache = root / cache_dir(n).relative_to("/")
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(cache)
            removed.append(cache)
    cache_root = root / CACHE_ROOT.relative_to("/")
    if cache_root.is_dir() and not any(cache_root.iterdir()):
        cache_root.rmdir()
    if not installed_instances(root):
        for p in (root / UNIT_DIR / TEMPLATE, root / LAUNCHER):
            if p.exists() or p.is_symlink():
                p.unlink()
                removed.append(p)
        for d in (root / ENV_DIR, root / LAUNCHER.parent):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    if root == Path("/") and systemd_running():
        systemctl("daemon-reload", check=False)
        systemctl("reset-failed", *[unit_name(n) for n in names], check=False)
    return removed
