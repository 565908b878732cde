"""What every preflight check shares: the result row, the statuses, the check names, the context."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from installer.bundle import manifest as records
from installer.bundle import names
from installer.bundle.manifest import EnvironmentRecord, Manifest, ModelRecord, ServiceRecord
from installer.errors import UsageError
from installer.preflight import cuda as cudatable
from installer.preflight.nvidia import GpuInfo

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"


CHECKS = ("driver", "gpus", "tp-heads", "gpu-memory", "compute-capability", "glibc", "arch", "disk",
          "ports", "cluster", "api-keys", "systemd", "libraries", "environment", "compiler")


GPU_CHECKS = ("driver", "gpus", "gpu-memory", "compute-capability")


MIN_COMPUTE_CAPABILITY = (7, 5)          # vLLM's floor (Turing)


DEFAULT_GPU_MEMORY_UTILIZATION = 0.9     # vLLM's default --gpu-memory-utilization


WEIGHT_HEADROOM = 1.1                    # weights' share × 1.1 must fit in total × utilisation


MIN_KV_CACHE_BYTES = 1 << 30             # less than this left for the KV cache → WARN


DISK_MARGIN = 1.1


INSTALL_DIR = names.INSTALL_DIR.lstrip("/")


GIB = 1 << 30


MIB = 1 << 20


@dataclass(frozen=True)
class CheckResult:
    name: str            # one of CHECKS
    status: str          # PASS | WARN | FAIL | SKIP
    detail: str
    remedy: str = ""
    subject: str = ""    # environment, service or GPU the row is about

    def to_dict(self) -> dict:
        return asdict(self)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def _major(v: str) -> int:
    return _version_tuple(v)[0]


def parse_skip(values: Iterable[str]) -> set[str]:
    """``--skip-check`` values (repeatable, comma-separated) → set of check names; unknown names refused."""
    names: set[str] = set()
    for v in values:
        names.update(x.strip() for x in v.split(",") if x.strip())
    unknown = sorted(names - set(CHECKS))
    if unknown:
        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, CHECKS, n=1)
            hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UsageError(f"unknown check name(s) for --skip-check: {', '.join(hints)}",
                         hint=f"known checks: {', '.join(CHECKS)}")
    return names


class _Context:
    def __init__(self, manifest: Manifest | Mapping, root: Path, owned_ports: Mapping[int, str],
                 install_dir: Path):
        self.manifest: Manifest = records.as_manifest(manifest)
        self.root = root
        self.live = root.resolve() == Path("/")
        self.owned_ports = owned_ports
        self.install_dir = install_dir
        self.envs: dict[str, EnvironmentRecord] = {e.name: e for e in self.manifest.environments}
        self.models: dict[str, ModelRecord] = {m.name: m for m in self.manifest.models}
        self.services: list[ServiceRecord] = list(self.manifest.services)
        self.gpu_info = GpuInfo()
        self.env_probes: dict[Path, object] = {}  # toolchain.probe_env results: an env's python runs once

    def env_of(self, service: ServiceRecord) -> EnvironmentRecord | None:
        return self.envs.get(service.environment)

    def is_gpu_service(self, service: ServiceRecord) -> bool:
        env = self.env_of(service)
        return env is None or not env.is_cpu   # env installed earlier (model-only bundle): assume GPU

    @property
    def cuda_envs(self) -> list[EnvironmentRecord]:
        return [e for e in self.envs.values() if not e.is_cpu]

    @property
    def needs_gpu(self) -> bool:
        return bool(self.cuda_envs) or any(self.is_gpu_service(s) for s in self.services)

    def driver_needed(self) -> str:
        """The driver a remedy should ask for: the highest minimum among the CUDA environments."""
        best = ""
        for e in self.cuda_envs:
            want = _required_driver(e)[0] or _required_driver(e)[1]
            if want and (not best or cudatable.compare_versions(want, best) > 0):
                best = want
        return best or "the version your CUDA needs"

    def no_gpu_remedy(self) -> str:
        return (f"install NVIDIA driver ≥ {self.driver_needed()} and reboot; `nvidia-smi` must list the GPUs "
                "(or use an environment built for CPU: cuda: null)")


def _cpu_skip(name: str, subject: str) -> CheckResult:
    return CheckResult(name, SKIP, "environment built for CPU (cuda: null): no GPU needed", subject=subject)


def _required_driver(env: EnvironmentRecord) -> tuple[str | None, str | None]:
    """(exact minimum, minor-version-compatibility floor) for an environment's CUDA."""
    cuda = env.cuda_runtime or env.cuda
    min_d, floor = env.min_driver, env.driver_floor
    if cuda and not min_d:
        try:
            min_d = cudatable.min_driver(str(cuda))
        except (KeyError, ValueError, LookupError):
            min_d = None
    if cuda and not floor:
        try:
            floor = cudatable.driver_floor(str(cuda))
        except (KeyError, ValueError, LookupError):
            floor = None
    return min_d, floor
