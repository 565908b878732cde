"""Small real bundles for the installer tests.

The parts are real: the conda environment built offline by ``tests.conda.fixtures.built_env`` (python from
the test channel, a binary with a binary prefix placeholder, conda-unpack), packed by
``packager.env.pack.pack_env``, the installer runtime cut by ``packager.env.runtime.cut_runtime``, the installer
package as ``pack build`` archives it, and tiny model files. Bundles are written through
``packager.bundle_writer.BundleWriter`` and signed with an ed25519 key, as ``pack build`` does.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import installer
from installer.bundle import INSTALL_SH, INSTALLER_ARCHIVE, env_artifact, runtime_artifact
from packager.bundle_writer import BundleWriter
from packager.tarball import write_tar_gz

INSTALLER_PKG = Path(installer.__file__).resolve().parent


@dataclass(frozen=True)
class EnvParts:
    """A packed environment and the runtime cut from it, with the env's MANIFEST entry."""

    archive: Path
    runtime: Path
    python: str  # e.g. bin/python3.11 inside the runtime
    entry: dict


@dataclass
class Model:
    name: str
    files: dict[str, bytes]
    repo: str = "acme/tiny"
    commit: str = "0" * 40
    source: str = "huggingface"


@dataclass
class Keys:
    private: Ed25519PrivateKey
    pub: Path
    fingerprint: str


def make_keys(d: Path, name: str = "build") -> Keys:
    from installer.bundle import key_fingerprint

    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    d.mkdir(parents=True, exist_ok=True)
    pub = d / f"{name}.pub"
    pub.write_bytes(pem)
    return Keys(key, pub, key_fingerprint(pem))


def env_parts(built_env, work: Path, *, name: str = "t1", pad_bytes: int = 0, salt: str = "") -> EnvParts:
    """Pack ``built_env``; ``pad_bytes`` adds an incompressible file (slow extraction for kill tests) and
    ``salt`` changes the content hash (a different version of the environment)."""
    from packager.env.pack import pack_env
    from packager.env.runtime import cut_runtime

    work.mkdir(parents=True, exist_ok=True)
    packed = pack_env(built_env, work / f"{name}.tar.zst")
    archive, files, unpacked = packed.path, packed.files, packed.unpacked_size
    if pad_bytes or salt:
        archive = work / f"{name}-{salt or 'pad'}.tar.zst"
        files, unpacked = _repack_with(packed.path, archive, pad_bytes, salt)
    runtime = cut_runtime(built_env, work / f"{name}.runtime.tar.gz")
    content_hash = hashlib.sha256((built_env.content_hash + salt).encode()).hexdigest()
    entry = {
        "name": name,
        "artifact": env_artifact(name),
        "content_hash": content_hash,
        "python": built_env.python_version,
        "platform": "linux-64",
        "cuda": None,  # a CPU environment for the preflight (this machine has no GPU)
        "cuda_runtime": None,
        "min_driver": None,
        "driver_floor": None,
        "glibc": built_env.glibc_floor or "2.17",
        "unpacked_size": unpacked,
        "files": files,
        "vllm": built_env.vllm,
        "needed_libraries": [],
        "lock": built_env.lock,
    }
    return EnvParts(archive, runtime.path, f"bin/python{built_env.python_short}", entry)


def _repack_with(src: Path, dest: Path, pad_bytes: int, salt: str) -> tuple[int, int]:
    """Copy the members of ``src`` into a new archive plus a salt file and ``pad_bytes`` of random data."""
    n = size = 0
    with (
        open(src, "rb") as f,
        zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as zr,
        open(dest, "wb") as out,
        zstandard.ZstdCompressor(level=1).stream_writer(out) as zw,
    ):
        with (
            tarfile.open(fileobj=zr, mode="r|") as tin,
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tout,
        ):
            for m in tin:
                tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
                n += 1
                size += m.size
            extra = {"share/llm-test/salt.txt": salt.encode()}
            if pad_bytes:
                extra["share/llm-test/pad.bin"] = os.urandom(pad_bytes)
            for name, data in extra.items():
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
                tout.addfile(ti, io.BytesIO(data))
                n += 1
                size += len(data)
    return n, size


def tiny_model(name: str = "tiny", *, commit: str = "1" * 40, weights: bytes | None = None) -> Model:
    cfg = b'{"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2}\n'
    return Model(
        name,
        {
            "config.json": cfg,
            "model.safetensors": weights or os.urandom(64 << 10),
            "tokenizer/vocab.txt": b"a\nb\n",
        },
        commit=commit,
    )


def service(
    name: str = "tiny",
    *,
    model: str = "tiny",
    environment: str | None = "t1",
    port: int = 18431,
    serve_by: str = "path",
    **overrides: object,
) -> dict:
    """A MANIFEST.json service entry (every key `pack build` writes) for a small CPU test model."""
    return {
        "name": name,
        "model": model,
        "environment": environment,
        "served_model_name": name,
        "host": "127.0.0.1",
        "port": port,
        "gpus": [],
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "max_model_len": 512,
        "dtype": "bfloat16",
        "gpu_memory_utilization": None,
        "trust_remote_code": False,
        "api_key_file": None,
        "serve_by": serve_by,
        "vllm_args": ["--enforce-eager"],
        "env": {},
        **overrides,
    }


@dataclass
class BundleSpec:
    name: str = "demo"
    version: str = "1.0.0"
    env: EnvParts | None = None
    runtime: bool = True
    models: list[Model] = field(default_factory=list)
    services: list[dict] = field(default_factory=list)
    extra_envs: list[dict] = field(default_factory=list)  # e.g. {"name": ..., "existing": "/opt/venv"}


def make_bundle(out_dir: Path, spec: BundleSpec, keys: Keys | None, *, against=None) -> Path:
    """Write a bundle through BundleWriter (signed when ``keys`` is given); returns its directory.
    ``against`` (a :class:`packager.against.Against`): a delta bundle, as ``pack build --against`` writes."""
    with BundleWriter(out_dir, spec.name, spec.version) as w:
        w.add_bytes(INSTALL_SH, (INSTALLER_PKG / "bootstrap" / "install.sh").read_bytes(), kind="bootstrap", mode=0o755)
        wf = write_tar_gz(w.path(INSTALLER_ARCHIVE), [("installer", INSTALLER_PKG)])
        w.record(INSTALLER_ARCHIVE, kind="installer", sha256=wf.sha256, size=wf.size)
        runtime = None
        envs = []
        if spec.env is not None:
            rel = env_artifact(spec.env.entry["name"])
            os.link(spec.env.archive, w.path(rel))
            w.record(
                rel, kind="environment", sha256=_sha(spec.env.archive), size=spec.env.archive.stat().st_size
            )
            envs.append(dict(spec.env.entry))
            if spec.runtime:
                rrel = runtime_artifact(spec.env.entry["name"])
                os.link(spec.env.runtime, w.path(rrel))
                w.record(
                    rrel, kind="runtime", sha256=_sha(spec.env.runtime), size=spec.env.runtime.stat().st_size
                )
                runtime = {"artifact": rrel, "python": spec.env.python}
        envs += [dict(e) for e in spec.extra_envs]
        models = []
        for m in spec.models:
            files = []
            for path, data in sorted(m.files.items()):
                w.add_bytes(f"models/{m.name}/{path}", data, kind="model")
                files.append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            models.append(
                {
                    "name": m.name,
                    "source": m.source,
                    "repo": m.repo,
                    "revision": "main",
                    "commit": m.commit,
                    "endpoint": None,
                    "dir": f"models/{m.name}",
                    "files": files,
                    "size": sum(f["size"] for f in files),
                    "config": {"num_attention_heads": 4, "num_key_value_heads": 2},
                }
            )
        doc = {
            "bundle": {"name": spec.name, "version": spec.version, "description": "", "tool": "tests"},
            "target": {"platform": "linux-64", "arch": "x86_64", "glibc": "2.17"},
            "runtime": runtime,
            "installer": {"artifact": INSTALLER_ARCHIVE},
            "environments": envs,
            "models": models,
            "services": spec.services,
        }
        sign = (lambda data: keys.private.sign(data)) if keys is not None else None
        return w.commit(doc, sign=sign, provided=against.provides if against is not None else None,
                        delta=against.delta_info() if against is not None else None).root


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its type, mode and content hash (files) or target (links)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = f"link {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = f"dir {oct(st.st_mode & 0o7777)}"
            else:
                out[rel] = f"file {oct(st.st_mode & 0o7777)} {_sha(p)}"
    return out


def run_command(cmd: list[str | Path], *, check: bool, timeout: float, env: dict | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` capturing its output; with ``check``, a non-zero exit fails the test showing both streams."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def run_installer(*args: str | Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m installer ARGS`` in a fresh process (as install.sh runs it)."""
    import sys

    return run_command([sys.executable, "-m", "installer", *args], check=check, timeout=timeout,
                       cwd=INSTALLER_PKG.parent)


def models_only_bundle(out: Path, keys: Keys) -> Path:
    """A bundle with a model and a service but no environment (for a server that already has one)."""
    return make_bundle(
        out,
        BundleSpec(
            name="extra",
            version="1",
            env=None,
            models=[tiny_model("m2", commit="b" * 40)],
            services=[service("m2svc", model="m2", port=18433)],
        ),
        keys,
    )


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def t1_parts(built_env, tmp_path_factory) -> EnvParts:
    return env_parts(built_env, tmp_path_factory.mktemp("t1parts"))
