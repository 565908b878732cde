"""Typed, validated form of a manifest (what `packager.manifest.load_manifest` returns).

These records are plain frozen dataclasses so every build step can take exactly what it needs.
Validation (file, line, field path, did-you-mean) lives in `packager.manifest`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BundleSpec:
    name: str
    version: str
    description: str = ""


@dataclass(frozen=True)
class TargetSpec:
    platform: str = "linux-64"  # conda platform name: linux-64 | linux-aarch64
    glibc: str = "2.28"  # oldest glibc the target servers have

    @property
    def arch(self) -> str:
        return {"linux-64": "x86_64", "linux-aarch64": "aarch64"}[self.platform]


@dataclass(frozen=True)
class PipSpec:
    packages: tuple[str, ...] = ()
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    # distributions to uninstall after the pip layer (e.g. CUDA builds of torchvision that a CPU vLLM drags in)
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnvSpec:
    name: str
    python: str | None = None  # e.g. "3.12"; added to the conda specs as python=3.12.*
    cuda: str | None = None  # CUDA the env is built for ("12.8"); None = CPU-only environment
    channels: tuple[str, ...] = ("conda-forge",)
    conda: tuple[str, ...] = ()  # conda match specs
    pip: PipSpec = field(default_factory=PipSpec)
    prefix: Path | None = None  # pack an existing environment instead of building one
    download_kernels: bool = True  # run `vllm download-kernels` when the installed vLLM has it
    existing: str | None = None  # the target's own environment (absolute prefix): nothing built or carried
    # carry a C compiler (conda-forge gcc + sysroot; vLLM on CUDA compiles at start). The manifest's default is
    # True for an environment with cuda: (packager.manifest); constructed directly, an EnvSpec asks for none
    compiler: bool = False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # huggingface | modelscope | local
    repo: str | None = None  # org/name for hub sources
    revision: str | None = None  # branch, tag or commit; default main (HF) / master (ModelScope)
    path: Path | None = None  # for source: local
    allow_patterns: tuple[str, ...] = ()
    ignore_patterns: tuple[str, ...] = ()
    endpoint: str | None = None  # hub mirror; default HF_ENDPOINT / MODELSCOPE_ENDPOINT / the public hub
    adapter_of: str | None = None  # a LoRA adapter (manifest.yaml adapters[]) of this models[].name


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # systemd instance name: llm@<name>
    model: str  # a models[].name
    environment: str | None = None  # an environments[].name (None: one already on the target)
    served_model_name: str | None = None  # defaults to name
    host: str = "127.0.0.1"  # loopback unless the manifest says otherwise (then api_key_file is advised)
    port: int = 8000
    gpus: tuple[int, ...] = ()
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str | None = None
    gpu_memory_utilization: float | None = None
    trust_remote_code: bool = False
    api_key_file: str | None = None  # path on the target; read at start, never in the bundle
    serve_by: str = "path"  # path | repo_id (serve from an offline HF cache view by repo id)
    vllm_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables for the unit
    task: str = "generate"  # generate | embed | score
    convert: str | None = None  # embed | classify (vLLM --convert)
    max_lora_rank: int | None = None  # default: from the adapters' ranks
    nodes: int = 1  # > 1: one service over a Ray cluster of that many servers
    ray: tuple[tuple[str, int], ...] = ()  # {port, wait_s} of that cluster (as the manifest gives them)


@dataclass(frozen=True)
class Manifest:
    path: Path
    bundle: BundleSpec
    target: TargetSpec
    environments: tuple[EnvSpec, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    services: tuple[ServiceSpec, ...] = ()
    warnings: tuple[str, ...] = ()  # advice from validation (printed by pack validate/build)
