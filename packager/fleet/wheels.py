"""``pack fleet --with-ansible``: ansible-core as wheels for an admin host inside the air gap.

The build host downloads ansible-core and its dependencies as wheels (``pip download --only-binary=:all:``,
for the Python that runs it, or ``--ansible-python X.Y``) into ``DIR/wheels/`` with ``install-ansible.sh``
beside them; on the admin host (same CPU architecture, that Python with ``venv``) nothing is fetched:
``bash install-ansible.sh`` = ``python3 -m venv .ansible && .ansible/bin/pip install --no-index --find-links
wheels ansible-core``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from packager.errors import EnvironmentBuildError

ANSIBLE_CORE = "ansible-core>=2.17,<2.19"  # 2.17/2.18: controller Python 3.10-3.13, targets 3.7+/3.8+

INSTALL_SCRIPT = """#!/bin/bash
# written by `pack fleet --with-ansible`: install ansible-core from the wheels beside this script, offline.
# usage: bash install-ansible.sh [PYTHON]     (default python3; needs its venv module)
set -euo pipefail
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
py=${1:-python3}
"$py" -m venv "$here/.ansible"
"$here/.ansible/bin/pip" install --quiet --no-index --find-links "$here/wheels" "$here/wheels/"ansible_core-*.whl
echo "ansible-core installed: $here/.ansible/bin/ansible-playbook (run it from $here)"
"""


def download(out: Path, *, python_version: str | None = None, requirement: str = ANSIBLE_CORE,
             log=print) -> list[Path]:
    """Fetch the wheels into ``out/wheels`` and write ``out/install-ansible.sh``; returns the wheel files."""
    wheels = Path(out) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
           "--dest", str(wheels), requirement]
    if python_version:
        cmd += ["--python-version", python_version]
    log(f"$ {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise EnvironmentBuildError(f"pip download {requirement} failed (exit {proc.returncode}):\n"
                                    f"{(proc.stderr or proc.stdout)[-2000:]}",
                                    hint="the build host needs PyPI (or a mirror in pip's configuration)")
    script = Path(out) / "install-ansible.sh"
    script.write_text(INSTALL_SCRIPT)
    script.chmod(0o755)
    return sorted(wheels.glob("*.whl"))
