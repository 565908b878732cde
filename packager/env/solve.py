"""Solve the conda part for the target with py-rattler: the target's virtual packages, not the build host's."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from installer.errors import UsageError
from packager.errors import EnvironmentBuildError
from packager.spec import EnvSpec, TargetSpec

LINUX_VERSION = "4.18"  # kernel assumed for __linux (RHEL/Rocky 8, the glibc 2.28 generation)
ARCHSPEC = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}
CUDA_CONDA_PACKAGES = ("cuda-cudart", "cuda-version", "cudatoolkit", "cuda-runtime")


def conda_specs(spec: EnvSpec) -> list[str]:
    specs = list(spec.conda)
    if spec.python:
        specs.append(f"python {spec.python}.*")
    if not any(re.split(r"[\s=<>!~\[]", s.strip(), maxsplit=1)[0] == "python" for s in specs):
        raise UsageError(f"environment {spec.name}: no python in the conda packages",
                         hint='set python: "3.12" or add python to conda:')
    return specs



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


