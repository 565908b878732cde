"""NVIDIA GPU and driver detection on the target, with the standard library only.

Three sources, tried in this order (the first that answers wins, later ones fill gaps):

1. ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` plus the plain ``nvidia-smi`` header
   (the only place nvidia-smi prints the CUDA version the driver supports);
2. NVML through ctypes (``libnvidia-ml.so.1``, shipped with every driver), for servers without
   nvidia-smi on PATH;
3. ``/proc/driver/nvidia/version``: the kernel module's version only (no GPU list).

Every parser is a pure function over captured text (or, for NVML, a JSON-able dict) so the real outputs
kept under ``tests/fixtures/gpu/`` test it. Memory is in MiB throughout, as nvidia-smi reports it.
"""

from __future__ import annotations

import csv
import ctypes
import io
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

QUERY_FIELDS = ("index", "name", "uuid", "driver_version", "memory.total", "memory.free", "compute_cap",
                "pci.bus_id")
PROC_VERSION = Path("/proc/driver/nvidia/version")
NVML_LIBRARY = "libnvidia-ml.so.1"
SMI_TIMEOUT_S = 30
MIB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str | None = None
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None
    compute_capability: str | None = None     # "9.0"
    pci_bus_id: str | None = None


@dataclass(frozen=True)
class GpuInfo:
    """What the machine has. ``driver_version`` None means no NVIDIA driver was found."""

    driver_version: str | None = None
    cuda_version: str | None = None           # the highest CUDA the driver supports, e.g. "13.0"
    gpus: tuple[Gpu, ...] = ()
    source: str = "none"                      # "nvidia-smi" | "nvml" | "proc" | "none"
    notes: tuple[str, ...] = field(default=())  # what was tried and why it did not answer

    def to_dict(self) -> dict:
        return asdict(self)

    def gpu(self, index: int) -> Gpu | None:
        for g in self.gpus:
            if g.index == index:
                return g
        return None


# --------------------------------------------------------------------------- pure parsers


def _value(text: str) -> str | None:
    text = text.strip()
    if not text or text.startswith("[") or text in ("N/A", "Not Supported"):
        return None
    return text


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else None


def parse_query_csv(text: str, fields: tuple[str, ...] = QUERY_FIELDS) -> tuple[str | None, list[Gpu]]:
    """Parse ``nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits``.

    Returns ``(driver_version, gpus)``. Values such as ``[N/A]`` or ``[Not Supported]`` become None.
    """
    driver = None
    gpus: list[Gpu] = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(fields):
            raise ValueError(f"nvidia-smi row has {len(row)} fields, expected {len(fields)}: {row!r}")
        rec = {fields[i]: _value(row[i]) for i in range(len(fields))}
        driver = driver or rec.get("driver_version")
        gpus.append(Gpu(
            index=int(rec["index"]) if rec.get("index") is not None else len(gpus),
            name=rec.get("name") or "unknown",
            uuid=rec.get("uuid"),
            memory_total_mib=_int(rec.get("memory.total")),
            memory_free_mib=_int(rec.get("memory.free")),
            compute_capability=rec.get("compute_cap"),
            pci_bus_id=rec.get("pci.bus_id"),
        ))
    return driver, gpus


_HEADER_DRIVER = re.compile(r"Driver Version:\s*([0-9][0-9.]*)")
_HEADER_CUDA = re.compile(r"CUDA Version:\s*([0-9]+\.[0-9]+)")


def parse_smi_header(text: str) -> tuple[str | None, str | None]:
    """``(driver_version, cuda_version)`` from plain ``nvidia-smi`` (or ``nvidia-smi -q``) output."""
    d = _HEADER_DRIVER.search(text) or re.search(r"Driver Version\s*:\s*([0-9][0-9.]*)", text)
    c = _HEADER_CUDA.search(text) or re.search(r"CUDA Version\s*:\s*([0-9]+\.[0-9]+)", text)
    return (d.group(1) if d else None), (c.group(1) if c else None)


def parse_smi_xml(text: str) -> GpuInfo:
    """Parse ``nvidia-smi -q -x``. It carries no compute capability (NVML or ``compute_cap`` do)."""
    root = ET.fromstring(text)
    driver = _value(root.findtext("driver_version") or "")
    cuda = _value(root.findtext("cuda_version") or "")
    gpus = []
    for i, g in enumerate(root.findall("gpu")):
        gpus.append(Gpu(
            index=i,
            name=_value(g.findtext("product_name") or "") or "unknown",
            uuid=_value(g.findtext("uuid") or ""),
            memory_total_mib=_int(_value(g.findtext("fb_memory_usage/total") or "")),
            memory_free_mib=_int(_value(g.findtext("fb_memory_usage/free") or "")),
            compute_capability=None,
            pci_bus_id=g.get("id"),
        ))
    return GpuInfo(driver_version=driver, cuda_version=cuda, gpus=tuple(gpus), source="nvidia-smi-xml")


_PROC_DRIVER = re.compile(r"NVRM version:.*?\s(\d{2,}\.\d+(?:\.\d+)?)\s")


def parse_proc_version(text: str) -> str | None:
    """Driver version from ``/proc/driver/nvidia/version`` (proprietary or open kernel module)."""
    m = _PROC_DRIVER.search(text + " ")
    return m.group(1) if m else None


def cuda_from_int(value: int | None) -> str | None:
    """NVML/cuDriverGetVersion integer (13000) → "13.0"."""
    if not value:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def parse_nvml_reading(reading: dict) -> GpuInfo:
    """Turn :func:`read_nvml`'s raw dict (bytes, ints) into a :class:`GpuInfo`."""
    gpus = []
    for d in reading.get("devices", []):
        mem = d.get("memory") or {}
        cc = d.get("compute_capability")
        gpus.append(Gpu(
            index=int(d["index"]),
            name=d.get("name") or "unknown",
            uuid=d.get("uuid"),
            memory_total_mib=mem["total"] // MIB if mem.get("total") is not None else None,
            memory_free_mib=mem["free"] // MIB if mem.get("free") is not None else None,
            compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
            pci_bus_id=d.get("pci_bus_id"),
        ))
    return GpuInfo(driver_version=reading.get("driver_version"),
                   cuda_version=cuda_from_int(reading.get("cuda_driver_version")),
                   gpus=tuple(gpus), source="nvml")


# --------------------------------------------------------------------------- live readers


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _NvmlPciInfo(ctypes.Structure):   # nvmlPciInfo_t as filled by nvmlDeviceGetPciInfo_v3
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint), ("bus", ctypes.c_uint),
                ("device", ctypes.c_uint), ("pciDeviceId", ctypes.c_uint),
                ("pciSubSystemId", ctypes.c_uint), ("busId", ctypes.c_char * 32)]


class NvmlError(RuntimeError):
    pass


def read_nvml(library: str = NVML_LIBRARY) -> dict:
    """Read driver, CUDA and per-GPU facts through NVML. Raises :class:`NvmlError` or OSError."""
    lib = ctypes.CDLL(library)
    lib.nvmlErrorString.restype = ctypes.c_char_p

    def call(fn: str, *args: object) -> None:
        ret = getattr(lib, fn)(*args)
        if ret != 0:
            msg = lib.nvmlErrorString(ret)
            raise NvmlError(f"{fn} failed: {msg.decode() if msg else ret}")

    call("nvmlInit_v2")
    try:
        buf = ctypes.create_string_buffer(96)
        call("nvmlSystemGetDriverVersion", buf, ctypes.c_uint(len(buf)))
        out: dict = {"driver_version": buf.value.decode(), "cuda_driver_version": None, "devices": []}
        cuda = ctypes.c_int()
        try:
            call("nvmlSystemGetCudaDriverVersion_v2", ctypes.byref(cuda))
            out["cuda_driver_version"] = cuda.value
        except (NvmlError, AttributeError):
            pass
        count = ctypes.c_uint()
        call("nvmlDeviceGetCount_v2", ctypes.byref(count))
        for i in range(count.value):
            handle = ctypes.c_void_p()
            call("nvmlDeviceGetHandleByIndex_v2", ctypes.c_uint(i), ctypes.byref(handle))
            dev: dict = {"index": i}
            name = ctypes.create_string_buffer(96)
            call("nvmlDeviceGetName", handle, name, ctypes.c_uint(len(name)))
            dev["name"] = name.value.decode()
            uuid = ctypes.create_string_buffer(96)
            call("nvmlDeviceGetUUID", handle, uuid, ctypes.c_uint(len(uuid)))
            dev["uuid"] = uuid.value.decode()
            mem = _NvmlMemory()
            call("nvmlDeviceGetMemoryInfo", handle, ctypes.byref(mem))
            dev["memory"] = {"total": mem.total, "free": mem.free, "used": mem.used}
            major, minor = ctypes.c_int(), ctypes.c_int()
            call("nvmlDeviceGetCudaComputeCapability", handle, ctypes.byref(major), ctypes.byref(minor))
            dev["compute_capability"] = [major.value, minor.value]
            pci = _NvmlPciInfo()
            try:
                call("nvmlDeviceGetPciInfo_v3", handle, ctypes.byref(pci))
                dev["pci_bus_id"] = pci.busId.decode()
            except (NvmlError, AttributeError):
                dev["pci_bus_id"] = None
            out["devices"].append(dev)
        return out
    finally:
        lib.nvmlShutdown()


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=SMI_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                           f"{(proc.stdout + proc.stderr).strip()[:300]}")
    return proc.stdout


def _from_smi(smi: str) -> GpuInfo:
    try:
        fields = QUERY_FIELDS
        text = _run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"])
    except RuntimeError:
        # older drivers (< 510) do not know compute_cap; NVML fills it in below when it can
        fields = tuple(f for f in QUERY_FIELDS if f != "compute_cap")
        text = _run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"])
    driver, gpus = parse_query_csv(text, fields)
    header_driver, cuda = parse_smi_header(_run([smi]))
    return GpuInfo(driver_version=driver or header_driver, cuda_version=cuda, gpus=tuple(gpus),
                   source="nvidia-smi")


def detect_gpus(*, nvidia_smi: str | None = "nvidia-smi", nvml_library: str | None = NVML_LIBRARY,
                proc_version: Path | None = PROC_VERSION) -> GpuInfo:
    """Ask nvidia-smi, then NVML, then /proc. Pass None to leave a source out."""
    notes: list[str] = []
    info: GpuInfo | None = None
    smi = shutil.which(nvidia_smi) if nvidia_smi else None
    if nvidia_smi and not smi:
        notes.append(f"{nvidia_smi}: not on PATH")
    if smi:
        try:
            info = _from_smi(smi)
        except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            notes.append(f"nvidia-smi: {e}")
    nvml: GpuInfo | None = None
    if nvml_library and (info is None or info.cuda_version is None
                         or any(g.compute_capability is None for g in info.gpus)):
        try:
            nvml = parse_nvml_reading(read_nvml(nvml_library))
        except (OSError, NvmlError, AttributeError) as e:
            notes.append(f"NVML ({nvml_library}): {e}")
    if info is None and nvml is not None:
        info = nvml
    elif info is not None and nvml is not None:
        info = _fill(info, nvml)
    if info is None and proc_version is not None:
        try:
            driver = parse_proc_version(proc_version.read_text())
            if driver:
                info = GpuInfo(driver_version=driver, source="proc")
            else:
                notes.append(f"{proc_version}: no driver version in it")
        except OSError as e:
            notes.append(f"{proc_version}: {e.strerror or e}")
    info = info or GpuInfo()
    return GpuInfo(driver_version=info.driver_version, cuda_version=info.cuda_version, gpus=info.gpus,
                   source=info.source, notes=tuple(notes))


def _fill(primary: GpuInfo, extra: GpuInfo) -> GpuInfo:
    by_uuid = {g.uuid: g for g in extra.gpus if g.uuid}
    gpus = []
    for g in primary.gpus:
        other = by_uuid.get(g.uuid) or extra.gpu(g.index)
        if other is not None and g.compute_capability is None:
            g = Gpu(**{**asdict(g), "compute_capability": other.compute_capability})
        gpus.append(g)
    return GpuInfo(driver_version=primary.driver_version or extra.driver_version,
                   cuda_version=primary.cuda_version or extra.cuda_version,
                   gpus=tuple(gpus), source=primary.source)


def compute_capability_tuple(cc: str | None) -> tuple[int, int] | None:
    if not cc:
        return None
    m = re.match(r"(\d+)\.(\d+)", cc)
    return (int(m.group(1)), int(m.group(2))) if m else None
