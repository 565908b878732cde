"""Environments the server already has (``existing:``) and the C compiler a GPU start needs.

Real parts: a real venv made by this host's python (with a minimal importable ``vllm`` package standing for the
site's vLLM install: the probe only imports it and reads ``__version__``), the real compiler, the real installer
in a subprocess on a staging root, pack validate on real YAML.
"""
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from installer import preflight as pf
from installer.bundle.manifest import Manifest, ManifestFieldError
from installer.preflight import toolchain
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    BundleSpec,
    keys,  # noqa: F401
    make_bundle,
    run_installer,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
)

pytestmark = pytest.mark.timeout(900)
FIX = Path(__file__).parent / "fixtures"
SYSTEM_PYTHON = "/usr/bin/python3"  # .ci/apt-packages.txt: python3, python3-dev (Python.h), python3-venv


def make_site_env(prefix: Path, *, vllm: str | None = "0.24.0", broken: bool = False) -> Path:
    """A real venv of the system python (as a site's platform team would make one; the service user can run
    it, unlike a python under /root); with ``vllm`` a package of that version importable from it."""
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(prefix)], check=True)
    if vllm is not None:
        site = next((prefix / "lib").glob("python3*/site-packages"))
        (site / "vllm").mkdir()
        body = "raise ImportError('libcudart.so.13: cannot open shared object file')\n" if broken else ""
        (site / "vllm" / "__init__.py").write_text(f"{body}__version__ = {vllm!r}\n")
    return prefix


@pytest.fixture
def open_dir():
    """A directory every user can enter (pytest's own tmp dirs are 0700: the service user could not)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="llm-site-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def gpu_manifest(existing: str, *, cc: str | None = None) -> dict:
    m = json.loads((FIX / "preflight" / "accept.json").read_text())
    m["environments"] = [{"name": "site", "existing": existing, "platform": "linux-64", "cuda": "13.0",
                          "cuda_runtime": "13.0", "min_driver": "580.65.06", "driver_floor": "580.65.06"}]
    svc = dict(m["services"][0], environment="site", env={"CC": cc} if cc else {})
    m["services"] = [svc]
    m["artifacts"] = [a for a in m.get("artifacts", []) if a.get("kind") != "environment"]
    return m


def only(m: dict, check: str, root: Path = Path("/")) -> list[pf.CheckResult]:
    from tests.test_preflight import h200

    res = pf.run_preflight(m, root=root, gpu_info=h200(), skip=[c for c in pf.CHECKS if c != check])
    return [r for r in res if r.name == check]


# --------------------------------------------------------------------------- MANIFEST records


def test_existing_record_reads_and_refuses_carried_parts():
    m = Manifest.from_dict(gpu_manifest("/opt/vllm-venv"), partial=True)
    (env,) = m.environments
    assert env.is_existing and env.existing == "/opt/vllm-venv" and env.artifact is None
    for key, value, says in (("artifact", "envs/site.tar.zst", "has no artifact"),
                             ("existing", "opt/vllm", "absolute path"),
                             ("existing", "/opt/../root", "'..'"),
                             ("existing", "/opt/vllm venv", "no '%', spaces")):
        bad = gpu_manifest("/opt/vllm-venv")
        bad["environments"][0][key] = value
        with pytest.raises(ManifestFieldError, match=says):
            Manifest.from_dict(bad, partial=True)


def test_pack_validate_existing(tmp_path):
    from packager.errors import ManifestError
    from packager.manifest import load_manifest

    base = """bundle: {name: gpu, version: "1"}
target: {platform: linux-64, glibc: "2.28"}
models:
  - {name: tiny, source: huggingface, repo: org/tiny, revision: main}
services:
  - {name: tiny, model: tiny, environment: site, gpus: [0]}
environments:
"""
    p = tmp_path / "m.yaml"
    p.write_text(base + '  - {name: site, existing: /opt/vllm-venv, cuda: "13.0"}\n')
    m = load_manifest(p)
    assert m.environments[0].existing == "/opt/vllm-venv" and m.environments[0].cuda == "13.0"
    p.write_text(base + '  - {name: site, existing: /opt/vllm-venv, conda: [python=3.12]}\n')
    with pytest.raises(ManifestError) as ei:
        load_manifest(p)
    assert any("m.yaml:8" in x and "'conda' cannot be combined with 'existing'" in x for x in ei.value.problems), \
        ei.value.problems
    p.write_text(base + "  - {name: site, existing: relative/venv}\n")
    with pytest.raises(ManifestError) as ei:
        load_manifest(p)
    assert any("existing" in x for x in ei.value.problems), ei.value.problems


# --------------------------------------------------------------------------- preflight: environment


def test_environment_check_runs_the_servers_python(open_dir):
    tmp_path = open_dir
    site = make_site_env(tmp_path / "srv" / "venv")
    (r,) = only(gpu_manifest(str(site)), "environment")
    assert r.status == pf.PASS and "vLLM 0.24.0" in r.detail and "python 3." in r.detail

    bare = make_site_env(tmp_path / "bare", vllm=None)
    (r,) = only(gpu_manifest(str(bare)), "environment")
    assert r.status == pf.FAIL and "vLLM is not installed" in r.detail and str(bare) in r.remedy

    broken = make_site_env(tmp_path / "broken", broken=True)
    (r,) = only(gpu_manifest(str(broken)), "environment")
    assert r.status == pf.FAIL and "vLLM does not import: ImportError: libcudart.so.13" in r.detail

    (r,) = only(gpu_manifest(str(tmp_path / "nowhere")), "environment")
    assert r.status == pf.FAIL and "is not there" in r.detail


def test_environment_check_service_user_must_reach_it(open_dir):
    tmp_path = open_dir
    home = tmp_path / "home"
    site = make_site_env(home / "venv")
    home.chmod(0o700)
    try:
        (r,) = only(gpu_manifest(str(site)), "environment")
    finally:
        home.chmod(0o755)
    assert r.status == pf.FAIL and f"cannot enter {home}" in r.detail and "chmod o+x" in r.remedy


# --------------------------------------------------------------------------- preflight: compiler


def test_compiler_check_builds_against_the_envs_python_h(open_dir):
    tmp_path = open_dir
    site = make_site_env(tmp_path / "venv")
    (r,) = only(gpu_manifest(str(site)), "compiler")
    include = toolchain.probe_env(site).include
    assert Path(include, "Python.h").is_file(), "the test host's python has its headers (python3-dev)"
    assert r.status == pf.PASS and "builds a shared object against the environment's Python.h" in r.detail

    (r,) = only(gpu_manifest(str(site), cc="/bin/false"), "compiler")
    assert r.status == pf.FAIL and "/bin/false -shared -fPIC" in r.detail and "apt-get install gcc" in r.remedy


def test_compiler_check_fails_without_any_compiler(tmp_path):
    """A server with no cc/gcc/clang in the service's PATH (a staging root without them)."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    site = make_site_env(root / "opt" / "venv")
    (r,) = only(gpu_manifest("/opt/venv"), "compiler", root=root)
    assert r.status == pf.FAIL and "no cc/gcc/clang" in r.detail and "Triton" in r.detail
    assert "services[].env.CC" in r.remedy
    os.symlink("/usr/bin/gcc", root / "usr/bin/gcc")
    (r,) = only(gpu_manifest("/opt/venv"), "compiler", root=root)
    assert r.status == pf.PASS and "/usr/bin/gcc (the server's" in r.detail
    assert site.is_dir()


def test_cpu_services_need_no_compiler():
    m = json.loads((FIX / "preflight" / "accept.json").read_text())
    for e in m["environments"]:
        e["cuda"] = e["cuda_runtime"] = None
    assert only(m, "compiler") == []


# --------------------------------------------------------------------------- install on a staging root


def test_install_with_an_existing_environment(tmp_path, t1_parts, keys):
    """A bundle that carries a packed env (the installer runtime) and serves from the server's own vLLM."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    make_site_env(root / "opt" / "vllm-venv")
    svc = service("gpu", environment="site", gpus=[0], port=18451)
    b = make_bundle(tmp_path / "out", BundleSpec(
        version="1.0.0", env=t1_parts, models=[tiny_model()], services=[svc],
        extra_envs=[{"name": "site", "existing": "/opt/vllm-venv", "platform": "linux-64", "cuda": "13.0",
                     "cuda_runtime": "13.0", "min_driver": "580.65.06", "driver_floor": "580.65.06"}]), keys)
    r = run_installer("install", "--bundle", b, "--root", root, "--pubkey", keys.pub, "--skip-check", "driver,gpus,"
                      "gpu-memory,compute-capability,systemd,compiler")
    print(r.stdout, r.stderr)
    assert "the server's existing environment /opt/vllm-venv" in r.stdout
    from installer.service import parse_env_file

    env = parse_env_file((root / "etc/llm/gpu.env").read_text())
    assert env["LLM_PYTHON"] == "/opt/vllm-venv/bin/python" and env["PATH"].startswith("/opt/vllm-venv/bin:")
    assert env["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and env["HF_HUB_OFFLINE"] == "1"
    assert env["TRITON_CACHE_DIR"] == "/var/cache/llm/gpu/triton"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/var/cache/llm/gpu/inductor"
    assert "CC" not in env  # the staging root has no compiler in the service's PATH
    st = json.loads((root / "var/lib/llm/state.json").read_text())
    bid = st["lines"]["demo"]["active"]
    assert st["bundles"][bid]["envs"]["site"] == "/opt/vllm-venv"
    assert "/opt/vllm-venv" not in st["objects"]  # never owned: uninstall must not touch it
    run_installer("uninstall", "--root", root)
    assert (root / "opt/vllm-venv/bin/python").exists()
    assert not (root / "etc/llm/gpu.env").exists()
