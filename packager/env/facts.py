"""Lock and facts of a built environment: conda-meta and pip lock entries, the checks conda-pack needs
(no conda file changed by pip, no editable install), the CUDA runtime and the vLLM inside."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from installer.errors import UsageError
from installer.preflight.cuda import compare_versions, major_minor, min_driver
from packager.env.solve import CUDA_CONDA_PACKAGES
from packager.errors import EnvironmentBuildError
from packager.spec import EnvSpec

VLLM_COMMAND = ["bin/python", "-m", "vllm.entrypoints.openai.api_server"]


def read_conda_meta(prefix: Path) -> list[dict]:
    out = []
    for p in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            raise EnvironmentBuildError(f"{p}: unreadable conda metadata: {e}",
                                        hint="the environment is damaged; recreate it") from e
    return out


def site_packages(prefix: Path) -> Path | None:
    found = sorted((prefix / "lib").glob("python3*/site-packages"))
    return found[0] if found else None


def check_conda_files(env_name: str, prefix: Path, conda_meta: list[dict]) -> None:
    """pip over conda: files of a conda package deleted or replaced by pip make the env unpackable."""
    broken = []
    for m in conda_meta:
        missing = [f for f in m.get("files", []) if not os.path.lexists(prefix / f)]
        if missing:
            broken.append(f"{m['name']} {m['version']} ({len(missing)} files gone, e.g. {missing[0]})")
    if broken:
        raise EnvironmentBuildError(
            f"environment {env_name}: pip removed or replaced files of conda packages:\n"
            + "\n".join(f"  - {b}" for b in broken),
            hint="install each package with conda or with pip, not both: drop it from conda: (or pin pip to "
            "the conda version); for a hand-built env, `conda install --force-reinstall` those packages")


def check_no_editable(env_name: str, site: Path) -> None:
    """Editable installs (pip install -e) keep their code outside the env: they cannot be packed."""
    found = []
    if site.is_dir():
        for d in sorted(site.glob("*.dist-info")):
            du = d / "direct_url.json"
            if du.is_file():
                try:
                    info = json.loads(du.read_text())
                except ValueError:
                    continue
                if info.get("dir_info", {}).get("editable"):
                    found.append(f"{d.name.split('-')[0]} ({info.get('url', '?')})")
        found += [f"{p.stem} (egg-link)" for p in sorted(site.glob("*.egg-link"))]
    if found:
        raise EnvironmentBuildError(
            f"environment {env_name}: editable installs cannot be packed: {', '.join(found)}",
            hint="reinstall them as regular packages: pip install --no-deps --force-reinstall <path> (without -e)")


def _dist_name_version(dist_info: Path) -> tuple[str, str] | None:
    meta = dist_info / "METADATA"
    if not meta.is_file():
        return None
    name = version = None
    with open(meta, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                break
            if line.startswith("Name:"):
                name = line[5:].strip()
            elif line.startswith("Version:"):
                version = line[8:].strip()
    return (name, version) if name and version else None


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_lock_entries(prefix: Path, site: Path, conda_meta: list[dict], report: dict) -> list[dict]:
    """One entry per pip-installed distribution (those not owned by a conda package)."""
    conda_files = {f for m in conda_meta for f in m.get("files", [])}
    hashes: dict[str, str] = {}
    for item in report.get("install", []):
        info = item.get("download_info", {})
        arch = info.get("archive_info", {})
        sha = arch.get("hashes", {}).get("sha256")
        if not sha and str(arch.get("hash", "")).startswith("sha256="):
            sha = arch["hash"].split("=", 1)[1]
        if not sha and info.get("url", "").startswith("file://"):
            sha = _sha256_file(Path(info["url"][7:]))
        if sha:
            hashes[canonical(item["metadata"]["name"])] = sha
    out = []
    if not site.is_dir():
        return out
    for d in sorted(site.glob("*.dist-info")):
        if str((d / "METADATA").relative_to(prefix)) in conda_files:
            continue
        nv = _dist_name_version(d)
        if nv is None:
            continue
        name, version = nv
        entry = {"name": name, "version": version, "sha256": hashes.get(canonical(name))}
        if entry["sha256"] is None and (d / "RECORD").is_file():
            entry["sha256"] = _sha256_file(d / "RECORD")
            entry["hash_of"] = "RECORD"
        out.append(entry)
    return sorted(out, key=lambda e: canonical(e["name"]))


def _sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


_TORCH_CUDA = re.compile(r"^cuda\s*(?::[^=\n]*)?=\s*['\"](\d+\.\d+)", re.M)


def detect_cuda_runtime(site: Path, conda_lock: list[dict], pip_lock: list[dict]) -> tuple[str | None, str | None]:
    """CUDA runtime really inside the env (major.minor) and where it was read from."""
    tv = site / "torch" / "version.py"
    if tv.is_file():
        m = _TORCH_CUDA.search(tv.read_text(errors="replace"))
        torch_ver = next((e["version"] for e in pip_lock if canonical(e["name"]) == "torch"), "")
        if m:
            return major_minor(m.group(1)), f"torch {torch_ver}".strip()
    by_name = {e["name"]: e["version"] for e in conda_lock}
    for name in CUDA_CONDA_PACKAGES:
        if name in by_name:
            return major_minor(by_name[name]), f"conda {name} {by_name[name]}"
    for e in pip_lock:
        if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", canonical(e["name"])):
            return major_minor(e["version"]), f"pip {e['name']} {e['version']}"
    return None, None


def check_cuda(spec: EnvSpec, cuda_runtime: str | None, source: str | None) -> None:
    if not (spec.cuda and cuda_runtime) or compare_versions(cuda_runtime, spec.cuda) <= 0:
        return
    try:
        need = f" (needs NVIDIA driver >= {min_driver(cuda_runtime)})"
    except UsageError:
        need = ""
    tag = "cu" + major_minor(spec.cuda).replace(".", "")
    raise EnvironmentBuildError(
        f"environment {spec.name}: {source} is built for CUDA {cuda_runtime}{need}, but the manifest targets "
        f"CUDA {spec.cuda}",
        hint=f"install it from the index for {tag} (e.g. pip: index_url: https://download.pytorch.org/whl/{tag}) "
        f"or raise cuda: to {cuda_runtime} if every server's driver supports it")


def detect_vllm(site: Path, pip_lock: list[dict]) -> dict | None:
    if not (site / "vllm" / "__init__.py").is_file():
        return None
    dist = next((e for e in pip_lock if canonical(e["name"]).startswith("vllm")), None)
    version = dist["version"] if dist else None
    if version is None:  # conda-installed vLLM
        for d in site.glob("vllm*.dist-info"):
            nv = _dist_name_version(d)
            if nv:
                dist, version = {"name": nv[0]}, nv[1]
    return {"version": version, "distribution": dist["name"] if dist else "vllm", "command": list(VLLM_COMMAND)}
