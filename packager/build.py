"""`pack build`: manifest → resolve (pin) → fetch into the content store → assemble → verify → sign.

Data only flows forward. Everything that can fail on user input (manifest, key, unknown repo or revision)
fails before anything large is downloaded or built. What is signed is what was read: every artifact's
bytes are hashed once on their way into the bundle (a fresh archive or copy as it is written; a hardlink
from the content store, the env cache or a local model directory by one threaded pass over the bundle
before signing), never trusted from a name or a record. The bundle appears at its final path only once
it has been re-opened with the installer's reader, checked and signed, in one atomic step
(``renameat2(RENAME_EXCHANGE)``, see ``packager.bundle_writer.BundleWriter``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from installer import bundle as fmt
from installer.errors import IntegrityError, UsageError
from installer.sizes import human_size
from packager import __version__
from packager.bundle_writer import BundleWriter
from packager.manifest import load_manifest
from packager.serving import adapter_info, check_serving
from packager.spec import EnvSpec, Manifest, ServiceSpec
from packager.tarball import inputs_key, write_tar_gz

if TYPE_CHECKING:
    from packager.store import ContentStore

INSTALLER_PKG = Path(__file__).resolve().parent.parent / "installer"
INSTALLER_ALIAS = "installer-archive"  # content store alias: inputs_key of the installer package -> blob
CONFIG_KEYS = ("architectures", "model_type", "num_attention_heads", "num_key_value_heads", "hidden_size",
               "num_hidden_layers", "torch_dtype", "dtype", "max_position_embeddings", "head_dim")


@dataclass(frozen=True)
class BuildOptions:
    manifest: Path
    out_dir: Path = Path("out")
    key: Path | None = None
    store: Path | None = None  # content store; default ~/.cache/llm-pack/store or $LLM_PACK_STORE
    work: Path | None = None  # env build area; default ~/.cache/llm-pack/envs or $LLM_PACK_WORK
    jobs: int = 4
    progress: bool = True
    against: tuple[Path, ...] = ()  # a delta: leave out what these inventories / earlier bundles hold


@dataclass
class BuildResult:
    bundle_dir: Path
    name: str
    version: str
    size: int
    artifacts: int
    signed_by: str | None
    seconds: float
    models: list[dict] = field(default_factory=list)
    environments: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    provided: int = 0  # a delta: artifacts left to the target, and their bytes
    provided_size: int = 0

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle_dir), "name": self.name, "version": self.version, "size": self.size,
                "artifacts": self.artifacts, "signed_by": self.signed_by, "seconds": round(self.seconds, 2),
                "models": self.models, "environments": self.environments,
                "delta": {"provided": self.provided, "provided_size": self.provided_size,
                          "full_size": self.size + self.provided_size} if self.provided else None,
                "timings": {k: round(v, 2) for k, v in self.timings.items()}}


def cache_root() -> Path:
    return Path(os.environ.get("LLM_PACK_CACHE", Path.home() / ".cache" / "llm-pack"))


def build(opts: BuildOptions, log=print) -> BuildResult:
    from packager.signing import load_private_key
    from packager.sources import get_source
    from packager.store import ContentStore

    t0 = time.monotonic()
    timings: dict[str, float] = {}
    manifest = load_manifest(opts.manifest)
    from packager.against import load_against

    against = load_against(opts.against)  # read before anything is built: a bad file fails at once
    key = load_private_key(opts.key) if opts.key else None
    if key is None:
        log("warning: no --key given: the bundle will be unsigned and install.sh will refuse it "
            "without --insecure")
    store = ContentStore(opts.store or Path(os.environ.get("LLM_PACK_STORE", cache_root() / "store")))

    # 1. resolve: pin every model to a commit and a file list (hub API calls, no downloads yet; a local
    #    directory is walked here; its files are hashed once, in the bundle, after they are hardlinked there)
    t = time.monotonic()
    pinned = []
    for spec in manifest.models:
        p = get_source(spec.source, store=store, jobs=opts.jobs, progress=opts.progress,
                       defer_hash=True).resolve(spec)
        if not p.files:
            raise UsageError(f"model {spec.name}: no files in {p.repo or spec.path} match allow_patterns/"
                             "ignore_patterns", hint="check the patterns in the manifest")
        pin = p.commit or "content hash after placing"
        log(f"model {spec.name}: {spec.source} {p.repo or spec.path} {p.revision or ''} -> {pin} "
            f"({len(p.files)} files, {human_size(sum(f.size for f in p.files))})")
        pinned.append(p)
    timings["resolve"] = time.monotonic() - t

    # 2. environments: solve for the target, install, pip layer, pack (reused when the lock is unchanged)
    t = time.monotonic()
    built_envs = [_build_env(e, manifest, opts, log) for e in manifest.environments]
    timings["environments"] = time.monotonic() - t

    # 3. fetch models into the content store (parallel, resumable, verified)
    t = time.monotonic()
    blobs = [get_source(p.source, store=store).fetch(p, store, jobs=opts.jobs, progress=opts.progress) for p in pinned]
    pinned = [p if p.source == "local" else p.with_hashes(b) for p, b in zip(pinned, blobs, strict=True)]
    timings["fetch"] = time.monotonic() - t

    # 4. assemble: every file is placed (hardlinked where it can be), then every byte that was not hashed as
    #    it was written (hardlinks and reflinks from the store, the env cache, a local model) is read once,
    #    in one threaded pass, and must match before anything is signed
    t = time.monotonic()
    try:
        bundle, model_entries, env_entries, links = _assemble(opts, manifest, store, key, pinned, blobs,
                                                              built_envs, log, against)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file: say where the bundle was being written
            e.filename = os.fspath(opts.out_dir)
        raise
    timings["assemble+verify"] = time.monotonic() - t
    fingerprint = None
    if key is not None:
        from packager.signing import public_pem
        fingerprint = fmt.key_fingerprint(public_pem(key))
    log(f"models placed: {', '.join(f'{n} {k}' for k, n in sorted(links.items()))}" if links else "")
    if against is not None:
        log(f"delta against {', '.join(against.sources)}: {len(bundle.provided)} artifacts "
            f"({human_size(bundle.provided_size())}) left to the target, {human_size(bundle.total_size())} in the "
            f"bundle (full: {human_size(bundle.total_size() + bundle.provided_size())})")
    return BuildResult(provided=len(bundle.provided), provided_size=bundle.provided_size(),
                       bundle_dir=bundle.root, name=bundle.name, version=bundle.version,
                       size=bundle.total_size(), artifacts=len(bundle.artifacts), signed_by=fingerprint,
                       seconds=time.monotonic() - t0,
                       models=[{"name": m["name"], "commit": m["commit"], "files": len(m["files"]),
                                "size": m["size"]} for m in model_entries],
                       environments=[{"name": e["name"], "cuda_runtime": e["cuda_runtime"],
                                      "min_driver": e["min_driver"], "size": e.get("archive_size"),
                                      **({"existing": e["existing"]} if e.get("existing") else {})}
                                     for e in env_entries],
                       timings=timings)


def _assemble(opts: BuildOptions, manifest: Manifest, store: ContentStore, key, pinned, blobs, built_envs, log,
              against=None):
    """Step 4 of :func:`build`: place, hash what was not read, sign, switch. ``(bundle, models, envs, links)``."""
    from packager.sources.base import Progress, content_hash
    from packager.sources.local import remember_hash
    from packager.store import CORRUPT_HINT, place

    with BundleWriter(opts.out_dir, manifest.bundle.name, manifest.bundle.version) as w:
        links: dict[str, int] = {}
        on_damage: dict[str, Callable[[], str]] = {}  # relpath -> clean-up so that a re-run works; says what
        install_sh = INSTALLER_PKG / "bootstrap" / "install.sh"
        w.add_bytes(fmt.INSTALL_SH, install_sh.read_bytes(), kind="bootstrap", mode=0o755)
        known = installer_archive_sha(store)  # a stored one is hardlinked (or copied and checked)
        if known is not None:
            on_damage[fmt.INSTALLER_ARCHIVE] = _discard_blob(store, known)
        with _repair_on_damage(fmt.INSTALLER_ARCHIVE, on_damage):
            sha, how, copied = installer_archive(store, w.path(fmt.INSTALLER_ARCHIVE), detail=True)
        on_damage[fmt.INSTALLER_ARCHIVE] = _discard_blob(store, sha)
        w.record(fmt.INSTALLER_ARCHIVE, kind="installer", sha256=sha, hashed=copied is not None,
                 size=copied, source=store.blob(sha), hint=CORRUPT_HINT)
        runtime = None
        env_entries = []
        for spec, built, packed in built_envs:
            if packed is None:
                env_entries.append(_existing_entry(spec, manifest))
                continue
            rel = fmt.env_artifact(spec.name)
            _link_or_copy(Path(packed.path), w.path(rel))
            w.record(rel, kind="environment", sha256=packed.sha256, size=packed.size, source=packed.path,
                     hint="the packed environment in the build cache is damaged; build again (it is repacked)")
            on_damage[rel] = _discard_packed(Path(packed.path))
            if runtime is None:  # the installer runs on the first packed environment's interpreter
                from packager.env.runtime import cut_runtime
                rrel = fmt.runtime_artifact(spec.name)
                rt = cut_runtime(built, w.path(rrel))  # written now, hashed as it was written
                w.record(rrel, kind="runtime", sha256=rt.sha256, size=rt.size, hashed=True)
                runtime = {"artifact": rrel, "python": f"bin/python{_short_py(built.python_version)}"}
            env_entries.append(_env_entry(spec, built, packed, manifest))
        local_stats: dict[str, tuple[Path, os.stat_result]] = {}
        for p, blob_map in zip(pinned, blobs, strict=True):
            for f in p.files:
                rel = f"{fmt.model_dir(p.name)}/{f.path}"
                src = Path(blob_map[f.path])
                if p.source == "local":
                    local_stats[rel] = (src, src.stat())
                    hint = (f"{src} changed after it was hashed or does not hold the bytes the stat cache "
                            "recorded (edited in place?); build again (it is hashed again)")
                    on_damage[rel] = _forget_local(store, src)
                else:
                    hint = CORRUPT_HINT
                    on_damage[rel] = _discard_blob(store, f.sha256)
                with _repair_on_damage(rel, on_damage):
                    how, csha, csize = place(src, w.path(rel), f.sha256 or None, hint=hint)
                links[how] = links.get(how, 0) + 1
                w.record(rel, kind="model", sha256=csha or f.sha256 or None, size=csize or f.size,
                         hashed=csha is not None, source=src, hint=hint)
        pending = w.pending_size()
        bar = Progress(f"{manifest.bundle.name} (hashing {w.pending_count()} files to sign)", pending,
                       opts.progress and pending > 0)
        try:
            with _repair_on_damage(None, on_damage):
                hashed = w.hash_pending(jobs=opts.jobs, on_bytes=bar.callback)
        finally:
            bar.close()
        for rel, (src, st) in local_stats.items():
            if rel in hashed:
                remember_hash(store, src, st, hashed[rel].sha256)
        arts = {a.path: a for a in w.artifacts}
        model_entries = []
        specs = {m.name: m for m in manifest.models}
        for p in pinned:
            files = [{"path": f.path, "size": arts[f"{fmt.model_dir(p.name)}/{f.path}"].size,
                      "sha256": arts[f"{fmt.model_dir(p.name)}/{f.path}"].sha256} for f in p.files]
            if p.source == "local":
                p = replace(p, commit=content_hash((x["path"], x["sha256"]) for x in files))
                log(f"model {p.name}: local {p.repo} -> {p.commit} (content hash)")
            placed = {f.path: w.path(f"{fmt.model_dir(p.name)}/{f.path}") for f in p.files}
            entry = _model_entry(p, files, placed)  # config.json: the bytes just hashed
            if specs[p.name].adapter_of is not None:
                entry["adapter"] = adapter_info(specs[p.name], placed)
            model_entries.append(entry)
        doc = {
            "bundle": {"name": manifest.bundle.name, "version": manifest.bundle.version,
                       "description": manifest.bundle.description, "tool": f"llm-pack {__version__}"},
            "target": {"platform": manifest.target.platform, "arch": manifest.target.arch,
                       "glibc": manifest.target.glibc},
            "runtime": runtime,
            "installer": {"artifact": fmt.INSTALLER_ARCHIVE},
            "environments": env_entries,
            "models": model_entries,
            "services": [_service_entry(s) for s in manifest.services],
        }
        check_serving(manifest, doc)
        from packager.sbom import SBOM_NAME, build_sbom  # the whole version's SBOM, signed with the MANIFEST
        w.add_bytes(SBOM_NAME, build_sbom(doc, w.artifacts, built_envs, {p.name: b for p, b in zip(pinned, blobs)}),
                    kind="sbom")
        signer = (lambda data: key.sign(data)) if key is not None else None
        with _repair_on_damage(None, on_damage):
            bundle = w.commit(doc, sign=signer, verify_jobs=opts.jobs,
                              provided=against.provides if against is not None else None,
                              delta=against.delta_info() if against is not None else None)
    return bundle, model_entries, env_entries, links


@contextmanager
def _repair_on_damage(rel: str | None, on_damage: dict[str, Callable[[], str]]):
    """On an IntegrityError about artifact ``rel`` (or the one the error names), run its clean-up (drop the
    damaged store blob, the stale stat cache entry...) so that building again works, and say so."""
    try:
        yield
    except IntegrityError as e:
        fix = on_damage.get(rel or getattr(e, "artifact", ""))
        if fix is not None:
            e.message += f"; {fix()}"
            e.args = (e.message,)
        raise


def installer_archive_sha(store: ContentStore, pkg: Path = INSTALLER_PKG) -> str | None:
    """The sha256 of the stored installer archive for the installer package as it is now (None: not built)."""
    return store.lookup_alias(INSTALLER_ALIAS, inputs_key([("installer", pkg)]))


def installer_archive(store: ContentStore, dest: Path, pkg: Path = INSTALLER_PKG, *, detail: bool = False):
    """Put installer.tar.gz (the installer package as it is now) at ``dest``; ``(sha256, size)``.

    The archive is deterministic, so one built before from the same inputs (same :func:`inputs_key`) is the
    same bytes: it is kept in the content store and hardlinked, not compressed again on every build.
    ``detail=True`` returns ``(sha256, how, size)`` instead, ``size`` None unless the bytes were copied
    (and so hashed) on the way: a hardlinked archive must be hashed by the caller.
    """
    entries = [("installer", pkg)]
    key = inputs_key(entries)
    sha = store.lookup_alias(INSTALLER_ALIAS, key)
    if sha is None:
        tmp = store.tmpdir() / f"installer-{os.getpid()}-{time.monotonic_ns()}.tar.gz"
        try:
            wf = write_tar_gz(tmp, entries)
            store.add_file(tmp, expected_sha256=wf.sha256, expected_size=wf.size, name=fmt.INSTALLER_ARCHIVE,
                           move=True)
        finally:
            tmp.unlink(missing_ok=True)  # moved into the store, or half-written (disk full, Ctrl-C)
        store.record_alias(INSTALLER_ALIAS, key, wf.sha256)
        sha = wf.sha256
    how, _, copied = store.place_blob(sha, dest)
    if detail:
        return sha, how, copied
    return sha, dest.stat().st_size


def _build_env(spec: EnvSpec, manifest: Manifest, opts: BuildOptions, log):
    from packager.env.build import build_env
    from packager.env.pack import cached_pack

    if spec.existing is not None:
        log(f"environment {spec.name}: the target's existing {spec.existing} (nothing is built or carried)")
        return spec, None, None
    work = opts.work or Path(os.environ.get("LLM_PACK_WORK", cache_root() / "envs"))
    t = time.monotonic()
    built = build_env(spec, manifest.target, work, progress=opts.progress)
    log(f"environment {spec.name}: python {built.python_version}, CUDA runtime {built.cuda_runtime or 'none (CPU)'}"
        f", {len(built.lock.get('conda', []))} conda + {len(built.lock.get('pip', []))} pip packages "
        f"({time.monotonic() - t:.1f}s)")
    if built.compiler:
        log(f"environment {spec.name}: carries its C compiler {built.compiler} (for Triton's launcher at GPU starts)")
    t = time.monotonic()
    packed = cached_pack(built, work / "packed")
    log(f"environment {spec.name}: packed {human_size(packed.size)} ({time.monotonic() - t:.1f}s)")
    return spec, built, packed


def _env_entry(spec: EnvSpec, built, packed, manifest: Manifest) -> dict:
    from installer.preflight import cuda

    runtime_cuda = built.cuda_runtime or spec.cuda
    return {
        "name": spec.name,
        "artifact": fmt.env_artifact(spec.name),
        "archive_size": packed.size,
        "content_hash": built.content_hash,
        "python": built.python_version,
        "platform": manifest.target.platform,
        "cuda": spec.cuda,
        "cuda_runtime": runtime_cuda,
        "min_driver": cuda.min_driver(runtime_cuda) if runtime_cuda else None,
        "driver_floor": cuda.driver_floor(runtime_cuda) if runtime_cuda else None,
        "glibc": built.glibc_floor or manifest.target.glibc,
        "unpacked_size": packed.unpacked_size,
        "files": packed.files,
        "vllm": built.vllm,
        **({"compiler": built.compiler} if built.compiler else {}),
        "needed_libraries": list(built.needed_libraries),
        "needed_by": {k: list(v) for k, v in sorted(built.needed_by.items())},
        "lock": built.lock,
        "frames": [{"offset": o, "size": n, "sha256": h} for o, n, h in packed.frames],
    }


def _existing_entry(spec: EnvSpec, manifest: Manifest) -> dict:
    from installer.preflight import cuda

    return {
        "name": spec.name,
        "existing": spec.existing,
        "platform": manifest.target.platform,
        "cuda": spec.cuda,
        "cuda_runtime": spec.cuda,
        "min_driver": cuda.min_driver(spec.cuda) if spec.cuda else None,
        "driver_floor": cuda.driver_floor(spec.cuda) if spec.cuda else None,
    }


def _model_entry(p, files: list[dict], blob_map: dict[str, Path]) -> dict:
    config: dict = {}
    cfg_blob = blob_map.get("config.json")
    if cfg_blob is not None:
        try:
            raw = json.loads(Path(cfg_blob).read_text(encoding="utf-8"))
            text_cfg = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
            config = {k: raw.get(k, text_cfg.get(k)) for k in CONFIG_KEYS if k in raw or k in text_cfg}
        except (OSError, ValueError):
            config = {}
    # a local model has no repository: its build-host directory is not the target's business (and is not
    # a repo id that `serve_by: repo_id` could use)
    repo = None if p.source == "local" else p.repo
    from packager.sources.base import content_hash

    extra: dict = {"pinned_by": p.pinned_by,
                   "content_hash": content_hash((f["path"], f["sha256"]) for f in files)}
    if p.hub_file_commits:
        extra["hub_file_commits"] = list(p.hub_file_commits)
    return {**extra, "name": p.name, "source": p.source, "repo": repo, "revision": p.revision, "commit": p.commit,
            "endpoint": p.endpoint, "dir": fmt.model_dir(p.name), "files": files,
            "size": sum(f["size"] for f in files), "config": config}


def _service_entry(s: ServiceSpec) -> dict:
    return {"name": s.name, "model": s.model, "environment": s.environment,
            "served_model_name": s.served_model_name or s.name, "host": s.host, "port": s.port,
            "gpus": list(s.gpus), "tensor_parallel_size": s.tensor_parallel_size,
            "pipeline_parallel_size": s.pipeline_parallel_size, "max_model_len": s.max_model_len,
            "dtype": s.dtype, "gpu_memory_utilization": s.gpu_memory_utilization,
            "trust_remote_code": s.trust_remote_code, "api_key_file": s.api_key_file, "serve_by": s.serve_by,
            "vllm_args": list(s.vllm_args), "env": dict(s.env),
            **({"task": s.task} if s.task != "generate" else {}),
            **({"convert": s.convert} if s.convert else {}),
            **({"max_lora_rank": s.max_lora_rank} if s.max_lora_rank is not None else {}),
            **({"nodes": s.nodes} if s.nodes > 1 else {}),
            **({"ray": dict(s.ray)} if s.ray else {})}


def _discard_blob(store: ContentStore, sha256: str) -> Callable[[], str]:
    def fix() -> str:
        if store.discard(sha256):
            return f"removed the damaged blob {store.blob(sha256)} from the content store: building again fetches it"
        return "build again"
    return fix


def _discard_packed(path: Path) -> Callable[[], str]:
    def fix() -> str:
        path.unlink(missing_ok=True)
        path.with_suffix("").with_suffix(".json").unlink(missing_ok=True)
        return f"removed the damaged packed environment {path}: building again repacks it"
    return fix


def _forget_local(store: ContentStore, src: Path) -> Callable[[], str]:
    def fix() -> str:
        from packager.sources.local import forget_hash
        forget_hash(store, src)
        return f"building again hashes {src} anew"
    return fix


def _link_or_copy(src: Path, dest: Path) -> None:
    """Hardlink a cached artifact into the bundle (no second copy of its bytes), else copy it."""
    try:
        os.link(src, dest)
    except OSError:
        import shutil
        shutil.copyfile(src, dest)


def _short_py(version: str) -> str:
    return ".".join(version.split(".")[:2])
