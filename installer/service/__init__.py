"""The service side on the target (systemd): the `llm@.service` template, one env file per instance, the `llm` user.

Layout written under ``root`` (``/`` on a live server, a staging tree with ``--root``)::

    /etc/systemd/system/llm@.service                          the template (installer/service/units/llm@.service)
    /etc/systemd/system/llm@<name>.service.d/devices.conf     per instance: CPU (no devices) or NVIDIA devices
    /etc/llm/<name>.env                                        per instance: offline, paths, vLLM args
    /opt/llm/bin/llm-serve                                     bash launcher: env file -> vLLM command line
    /etc/sysusers.d/llm.conf                                   the system user `llm` (also re-created at boot)

Standard library only: this runs on the bundle's minimal Python. ``systemctl`` is only ever run against the
live system (``root`` is ``/``); with a staging tree only unit-file verbs (``enable``...) run, with
``--root``.
Modules: paths.py (where things go), envfile.py, dropin.py, unit_files.py (writing them), user.py (the
``llm`` user), systemctl.py, health.py (is an instance serving). ``from installer import service`` gives
them all under one name. See docs/systemd.md.
"""

from installer.service import health
from installer.service.dropin import (
    find_nvidia_modprobe,
    render_devices_dropin,
    render_key_dropin,
    systemd_version,
    uses_credentials,
)
from installer.service.envfile import (
    env_quote,
    parse_env_file,
    render_env_file,
)
from installer.service.paths import (
    CACHE_ROOT,
    CREDENTIAL_NAME,
    DEFAULT_ENTRYPOINT,
    DROPIN_NAME,
    ENV_DIR,
    GROUP,
    KEY_DROPIN_NAME,
    LAUNCHER,
    MIN_CREDENTIALS_SYSTEMD,
    NVIDIA_DEVICE_GROUPS,
    NVIDIA_MODPROBE_PATHS,
    SYSTEM_PATH,
    SYSUSERS_CONF,
    TEMPLATE,
    UNIT_DIR,
    UNIT_FILE_VERBS,
    UNITS_SRC,
    USER,
    InstancePaths,
    as_env,
    as_service,
    cache_dir,
    check_instance_name,
    dropin_path,
    env_file_path,
    is_cpu_env,
    key_dropin_path,
    unit_name,
)
from installer.service.systemctl import (
    daemon_reload,
    disable,
    enable,
    restart_instances,
    start,
    stop,
    systemctl,
    systemd_running,
    unit_properties,
    unit_property,
)
from installer.service.unit_files import (
    check_api_key_file,
    install_units,
    installed_instances,
    key_install_command,
    launcher_text,
    remove_units,
    render_instance,
    template_text,
)
from installer.service.user import (
    SERVICE_ID_DIRS,
    ensure_user,
    files_owned_by_service_ids,
    remove_user,
    sysusers_text,
    user_removal_decision,
)

__all__ = [
    "CACHE_ROOT", "CREDENTIAL_NAME", "DEFAULT_ENTRYPOINT", "DROPIN_NAME", "ENV_DIR", "GROUP", "InstancePaths",
    "KEY_DROPIN_NAME", "LAUNCHER", "MIN_CREDENTIALS_SYSTEMD", "NVIDIA_DEVICE_GROUPS", "NVIDIA_MODPROBE_PATHS",
    "SERVICE_ID_DIRS", "SYSTEM_PATH", "SYSUSERS_CONF", "TEMPLATE", "UNITS_SRC", "UNIT_DIR", "UNIT_FILE_VERBS",
    "USER", "as_env", "as_service", "cache_dir", "check_api_key_file", "check_instance_name", "daemon_reload",
    "disable", "dropin_path", "enable", "ensure_user", "env_file_path", "env_quote", "files_owned_by_service_ids",
    "find_nvidia_modprobe", "health", "install_units", "installed_instances", "is_cpu_env", "key_dropin_path",
    "key_install_command", "launcher_text", "parse_env_file", "remove_units", "remove_user",
    "render_devices_dropin", "render_env_file", "render_instance", "render_key_dropin", "restart_instances",
    "start", "stop",
    "systemctl", "systemd_running", "systemd_version", "sysusers_text", "template_text", "unit_name",
    "unit_properties", "unit_property", "user_removal_decision", "uses_credentials",
]
