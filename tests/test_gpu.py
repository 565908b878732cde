"""GPU detection parsers over real outputs captured on an NVIDIA H200 (tests/fixtures/gpu, tools/gpu_probe.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from installer.preflight import nvidia as gpu

FIX = Path(__file__).parent / "fixtures" / "gpu"
UUID = "GPU-bcbfd08f-ef5f-f490-df35-8e255c209216"


def text(name: str) -> str:
    return (FIX / name).read_text()


def test_query_csv_real_output():
    driver, gpus = gpu.parse_query_csv(text("nvidia-smi-query.csv"))
    assert driver == "580.159.04"
    assert gpus == [gpu.Gpu(index=0, name="NVIDIA H200", uuid=UUID, memory_total_mib=143771,
                            memory_free_mib=143156, compute_capability="9.0", pci_bus_id="00000000:00:06.0")]


def test_query_csv_without_compute_cap_and_na_values():
    fields = tuple(f for f in gpu.QUERY_FIELDS if f != "compute_cap")
    row = "1, Tesla T4, [N/A], 470.82.01, 15360, [Not Supported], 00000000:3B:00.0\n"
    driver, gpus = gpu.parse_query_csv("\n" + row, fields)
    assert driver == "470.82.01"
    assert gpus[0].index == 1 and gpus[0].uuid is None and gpus[0].memory_free_mib is None
    assert gpus[0].compute_capability is None and gpus[0].memory_total_mib == 15360


def test_query_csv_wrong_field_count():
    with pytest.raises(ValueError, match="expected 8"):
        gpu.parse_query_csv("0, NVIDIA H200\n")


def test_smi_header_plain_and_q():
    assert gpu.parse_smi_header(text("nvidia-smi.txt")) == ("580.159.04", "13.0")
    assert gpu.parse_smi_header(text("nvidia-smi-q.txt")) == ("580.159.04", "13.0")
    assert gpu.parse_smi_header("garbage") == (None, None)


def test_smi_xml_real_output():
    info = gpu.parse_smi_xml(text("nvidia-smi-q.xml"))
    assert (info.driver_version, info.cuda_version) == ("580.159.04", "13.0")
    (g,) = info.gpus
    assert (g.name, g.uuid, g.memory_total_mib, g.memory_free_mib) == ("NVIDIA H200", UUID, 143771, 143156)
    assert g.compute_capability is None          # -q -x does not carry it
    assert g.pci_bus_id == "00000000:00:06.0"


def test_proc_version_open_and_proprietary_modules():
    assert gpu.parse_proc_version(text("proc-driver-nvidia-version.txt")) == "580.159.04"
    proprietary = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.54.03  Tue Jun  6 22:20:39 UTC 2023\n"
                   "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert gpu.parse_proc_version(proprietary) == "535.54.03"
    assert gpu.parse_proc_version("NVRM version: NVIDIA UNIX Kernel Module 570.26\n") == "570.26"
    assert gpu.parse_proc_version("no driver here") is None


def test_nvml_reading_real():
    info = gpu.parse_nvml_reading(json.loads(text("nvml.json")))
    assert (info.driver_version, info.cuda_version, info.source) == ("580.159.04", "13.0", "nvml")
    (g,) = info.gpus
    assert (g.memory_total_mib, g.compute_capability, g.uuid) == (143771, "9.0", UUID)
    # NVML's byte count and nvidia-smi's MiB agree
    _, smi = gpu.parse_query_csv(text("nvidia-smi-query.csv"))
    assert g.memory_total_mib == smi[0].memory_total_mib


@pytest.mark.parametrize("value,expected", [(13000, "13.0"), (12080, "12.8"), (11080, "11.8"), (0, None)])
def test_cuda_from_int(value, expected):
    assert gpu.cuda_from_int(value) == expected


def test_device_detection_matches_parsers():
    """What detect_gpus printed on the device equals what the parsers make of the raw captures."""
    recorded = json.loads(text("detect.json"))
    assert recorded["source"] == "nvidia-smi" and recorded["notes"] == []
    driver, gpus = gpu.parse_query_csv(text("nvidia-smi-query.csv"))
    assert recorded["driver_version"] == driver
    assert recorded["cuda_version"] == gpu.parse_smi_header(text("nvidia-smi.txt"))[1]
    assert [gpu.Gpu(**g) for g in recorded["gpus"]] == gpus
    nvml_only = json.loads(text("detect-nvml-only.json"))
    assert nvml_only["source"] == "nvml" and nvml_only["gpus"][0]["compute_capability"] == "9.0"
    proc_only = json.loads(text("detect-proc-only.json"))
    assert proc_only == {"driver_version": "580.159.04", "cuda_version": None, "gpus": [], "source": "proc",
                         "notes": []}


def test_detect_on_this_gpu_less_machine():
    info = gpu.detect_gpus()
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this machine has an NVIDIA driver")
    assert info.driver_version is None and info.gpus == () and info.source == "none"
    assert len(info.notes) == 3            # nvidia-smi, NVML and /proc each say why


def _fake_smi(tmp_path: Path, *, knows_compute_cap: bool = True) -> Path:
    """An nvidia-smi stand-in replaying the real captures (behaviour of the real binary, incl. its error)."""
    script = tmp_path / "nvidia-smi"
    bad = "" if knows_compute_cap else (
        'case "$1" in *compute_cap*) echo \'Field "compute_cap" is not a valid field to query.\'; exit 2;; esac\n')
    no_cc = "\n".join(
        ", ".join(v for i, v in enumerate(line.split(", ")) if i != 6)
        for line in text("nvidia-smi-query.csv").splitlines())
    (tmp_path / "query-no-cc.csv").write_text(no_cc + "\n")
    script.write_text(
        "#!/bin/sh\n" + bad
        + f'case "$1" in\n --query-gpu=*compute_cap*) cat {FIX}/nvidia-smi-query.csv;;\n'
        f" --query-gpu=*) cat {tmp_path}/query-no-cc.csv;;\n"
        f" *) cat {FIX}/nvidia-smi.txt;;\nesac\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_detect_through_nvidia_smi(tmp_path):
    info = gpu.detect_gpus(nvidia_smi=str(_fake_smi(tmp_path)), nvml_library=None, proc_version=None)
    assert (info.source, info.driver_version, info.cuda_version) == ("nvidia-smi", "580.159.04", "13.0")
    assert info.gpus[0].compute_capability == "9.0"


def test_detect_old_nvidia_smi_without_compute_cap(tmp_path):
    info = gpu.detect_gpus(nvidia_smi=str(_fake_smi(tmp_path, knows_compute_cap=False)),
                           nvml_library="libnvidia-ml-absent.so.1", proc_version=None)
    assert info.driver_version == "580.159.04" and info.gpus[0].memory_total_mib == 143771
    assert info.gpus[0].compute_capability is None
    assert any("NVML" in n for n in info.notes)


def test_detect_falls_back_to_proc(tmp_path):
    proc = tmp_path / "version"
    proc.write_text(text("proc-driver-nvidia-version.txt"))
    info = gpu.detect_gpus(nvidia_smi=str(tmp_path / "absent-smi"), nvml_library="libnvidia-ml-absent.so.1",
                           proc_version=proc)
    assert (info.source, info.driver_version, info.gpus) == ("proc", "580.159.04", ())
    assert len(info.notes) == 2


def test_read_nvml_without_library():
    with pytest.raises(OSError):
        gpu.read_nvml("libnvidia-ml-absent.so.1")


def test_compute_capability_tuple():
    assert gpu.compute_capability_tuple("9.0") == (9, 0)
    assert gpu.compute_capability_tuple("7.5") == (7, 5)
    assert gpu.compute_capability_tuple(None) is None

