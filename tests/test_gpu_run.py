"""The GPU run on the lent H200 (tests/fixtures/gpu/run-2026-12-02, docs/gpu.md), replayed here.

What the real server printed is the reference: the env file the installer wrote there and the preflight rows
it printed must come out of today's code for the same MANIFEST and the same GPU facts. The runner that
started the instance there (devkit/unit_runner.py, no systemd on that machine) is run here for real.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from installer import preflight as pf
from installer.bundle.manifest import Manifest
from installer.service import render_env_file
from tests.test_preflight import h200

RUN = Path(__file__).parent / "fixtures" / "gpu" / "run-2026-12-02"


def manifest() -> Manifest:
    return Manifest.from_json((RUN / "MANIFEST.json").read_bytes())


def test_env_file_written_on_the_h200_is_what_the_code_renders(tmp_path):
    m = manifest()
    svc = m.services[0]
    env = m.environment(svc.environment)
    assert env.existing == "/opt/vllm-venv" and env.cuda == "13.0"
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    os.symlink("/bin/true", root / "usr/bin/cc")  # that server's compiler, found on the service's PATH
    recorded = (RUN / "tiny-gpu.env").read_text()
    model = next(line.split("=", 1)[1] for line in recorded.splitlines() if line.startswith("LLM_MODEL="))
    ours = render_env_file(svc, env, env_prefix=Path(env.existing), model_path=model, hf_cache=None,
                           bundle=m.bundle, root=root)
    # one line was added after the run: the launcher's compiler guard (LLM_NEEDS_CC, exit 78 without one)
    assert ours == recorded.replace("CC=/usr/bin/cc\n", "CC=/usr/bin/cc\nLLM_NEEDS_CC=1\n")
    for line in ("CC=/usr/bin/cc", "VLLM_USE_FLASHINFER_SAMPLER=0", "TRITON_CACHE_DIR=/var/cache/llm/tiny-gpu/triton",
                 "NCCL_NVLS_ENABLE=0", "HF_HUB_OFFLINE=1", "LLM_PYTHON=/opt/vllm-venv/bin/python"):
        assert line in ours.splitlines()


def _rows(log: str) -> list[dict]:
    """The preflight table install.sh printed (fixed-width columns under the STATUS/CHECK/SUBJECT/DETAIL head)."""
    lines = log.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("STATUS  CHECK"))
    cols = [lines[head].index(c) for c in ("CHECK", "SUBJECT", "DETAIL")]
    rows = []
    for x in lines[head + 1:]:
        if x.startswith("preflight:"):
            break
        if x[:1].isspace():  # a remedy line
            continue
        rows.append({"status": x[:cols[0]].strip(), "name": x[cols[0]:cols[1]].strip(),
                     "subject": x[cols[1]:cols[2]].strip(), "detail": x[cols[2]:].strip()})
    return rows


def test_gpu_preflight_rows_on_the_h200_reproduce_from_its_captures():
    recorded = [r for r in _rows((RUN / "install.log").read_text())
                if r["name"] in pf.GPU_CHECKS + ("tp-heads",)]
    assert {r["name"] for r in recorded} == {"driver", "gpus", "tp-heads", "gpu-memory", "compute-capability"}
    ours = [r.to_dict() for r in pf.run_preflight(manifest().to_dict(), gpu_info=h200(), skip=[
        "glibc", "arch", "disk", "ports", "api-keys", "systemd", "libraries", "environment", "compiler"])]
    assert [{k: r[k] for k in ("status", "name", "subject", "detail")} for r in ours
            if r["status"] != pf.SKIP or r["name"] == "driver"] == recorded


def test_h200_run_passed_environment_and_compiler():
    rows = {(r["name"], r["subject"]): r for r in _rows((RUN / "install.log").read_text())}
    assert rows[("environment", "site")]["status"] == pf.PASS
    assert "vLLM 0.24.0" in rows[("environment", "site")]["detail"]
    assert rows[("compiler", "tiny-gpu")]["status"] == pf.PASS


# --------------------------------------------------------------------------- devkit/unit_runner.py, for real


@pytest.fixture
def unit_root():
    """A root with a template unit, a drop-in and an env file; the service's script in a dir nobody can read."""
    d = Path(tempfile.mkdtemp(prefix="llm-runner-", dir="/var/tmp"))
    d.chmod(0o755)
    cache = Path("/var/cache") / f"llm-runner-test-{os.getpid()}"
    yield d, cache.name
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)


def test_unit_runner_runs_as_the_unit_says(unit_root):
    import subprocess
    import sys

    d, cache = unit_root
    out = d / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    script = d / "serve.sh"
    # first start: record who and what it got, exit 0 (Restart=always restarts); second: exit 78 (no restart)
    script.write_text(f"""#!/bin/bash
n=$(ls {out} | wc -l)
{{ id -un; pwd; umask; env | sort; }} > {out}/start-$n
[ "$n" -ge 1 ] && exit 78
exit 0
""")
    script.chmod(0o755)
    (d / "etc/systemd/system/svc@x.service.d").mkdir(parents=True)
    (d / "etc/llm").mkdir(parents=True)
    (d / "etc/systemd/system/svc@.service").write_text(f"""[Unit]
Description=test %i
[Service]
User=nobody
EnvironmentFile=/etc/llm/%i.env
Environment=FROM_UNIT=1
ExecStart={script}
CacheDirectory={cache}
WorkingDirectory=%C/{cache}
UMask=0077
Restart=always
RestartSec=0.2
RestartPreventExitStatus=78 243
""")
    (d / "etc/systemd/system/svc@x.service.d/extra.conf").write_text("[Service]\nEnvironment=FROM_DROPIN=%i\n")
    (d / "etc/llm/x.env").write_text('GREETING="hello world"\nPATH=/usr/bin:/bin\n')
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "devkit.unit_runner", "svc@x", "--root", str(d)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "LEAK": "no"},
                       cwd=Path(__file__).resolve().parents[1])
    print(r.stdout, r.stderr)
    assert r.returncode == 78 and "status 78 is in RestartPreventExitStatus=" in r.stdout
    assert time.monotonic() - t < 30
    starts = sorted(out.iterdir())
    assert [p.name for p in starts] == ["start-0", "start-1"]  # restarted once after exit 0, not after 78
    lines = starts[0].read_text().splitlines()
    assert lines[0] == "nobody" and lines[1] == f"/var/cache/{cache}" and lines[2] == "0077"
    env = dict(x.split("=", 1) for x in lines[3:] if "=" in x)
    assert env["GREETING"] == "hello world" and env["FROM_UNIT"] == "1" and env["FROM_DROPIN"] == "x"
    assert "LEAK" not in env and "PYTHONPATH" not in env and env["CACHE_DIRECTORY"] == f"/var/cache/{cache}"
