"""The bundle's SBOM: ``sbom.cdx.json``, CycloneDX 1.6 JSON, made with cyclonedx-python-lib at `pack build`.

It describes the whole version, also for a delta bundle (what the target provides is listed too, marked
``llm-pack:provided = target``):

- ``metadata.component``: the bundle (``bom-ref`` ``bundle``), the tool: llm-pack;
- each environment: an ``application`` component (``env/<name>``; hash = its archive's sha256, version = its
  content hash), and per package a ``library`` component: conda ``pkg:conda/NAME@VERSION?build=&channel=&subdir=
  &type=`` with its sha256 (md5 when the channel gave none) and download URL, pip ``pkg:pypi/NAME@VERSION`` with
  the wheel's sha256; licenses as the package metadata gives them (``BuiltEnv.licenses``);
- each model: a ``machine-learning-model`` component (``model/<name>``; ``pkg:huggingface/ORG/NAME@COMMIT``,
  ``pkg:modelscope/ORG/NAME@COMMIT``, none for a local directory), its files nested as ``file`` components with
  their sha256, the license of its README front matter;
- install.sh, the installer archive and the runtime as ``file`` components with their sha256.

Dependencies: the bundle depends on every environment, model and file; each environment on its packages.
Deterministic: no timestamp (unless ``SOURCE_DATE_EPOCH`` is set), the serial number derived from the content.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from cyclonedx.model import ExternalReference, ExternalReferenceType, HashAlgorithm, HashType, Property, XsUri
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from installer.bundle.names import SBOM_NAME
from installer.bundle.reader import Artifact, canonical_json
from packager import __version__
from packager.env.facts import canonical

try:  # cyclonedx-python-lib >= 11.x: the factories moved to contrib
    from cyclonedx.contrib.license.factories import LicenseFactory
except ImportError:  # pragma: no cover - older releases
    from cyclonedx.factory.license import LicenseFactory

__all__ = ["SBOM_NAME", "build_sbom", "make_sbom", "readme_license"]
P = "llm-pack:"  # property namespace
SERIAL_NAMESPACE = uuid.UUID("6c6c6d2d-7061-636b-2d73-626f6d000001")
FILE_KINDS = ("bootstrap", "installer", "runtime")
HUB_SITES = {"huggingface": "https://huggingface.co", "modelscope": "https://modelscope.cn/models"}
_licenses = LicenseFactory()


def _sha256(value: str | None) -> list[HashType]:
    return [HashType(alg=HashAlgorithm.SHA_256, content=value)] if value else []


def _props(**values: object) -> list[Property]:
    return [Property(name=P + k.replace("__", "."), value=str(v)) for k, v in values.items()
            if v not in (None, "", [], {})]


def _license_list(values: Iterable[str]) -> list:
    return [_licenses.make_from_string(v) for v in values if v]


def conda_purl(entry: Mapping) -> PackageURL:
    """``pkg:conda/NAME@VERSION?build=...&channel=...&subdir=...&type=...`` from a lock entry's URL."""
    url = str(entry.get("url") or "")
    parts = urlsplit(url)
    segs = [s for s in parts.path.split("/") if s]
    quals: dict[str, str] = {}
    if entry.get("build"):
        quals["build"] = str(entry["build"])
    if len(segs) >= 2:
        quals["subdir"] = segs[-2]
        chan_path = "/".join(segs[:-2])
        if parts.netloc in ("conda.anaconda.org", "anaconda.org") and chan_path:
            quals["channel"] = chan_path  # conda-forge, pytorch, ...: how conda names these channels
        elif parts.netloc == "repo.anaconda.com" and chan_path.startswith("pkgs/"):
            quals["channel"] = chan_path[len("pkgs/"):]  # pkgs/main -> main
        else:  # a mirror or a local channel: its URL
            quals["channel"] = f"{parts.scheme}://{parts.netloc}/{chan_path}".rstrip("/")
    name = segs[-1] if segs else ""
    for ext, typ in ((".conda", "conda"), (".tar.bz2", "tar.bz2")):
        if name.endswith(ext):
            quals["type"] = typ
    return PackageURL("conda", None, str(entry["name"]), str(entry["version"]), quals or None)


def pypi_purl(entry: Mapping) -> PackageURL:
    return PackageURL("pypi", None, canonical(str(entry["name"])), str(entry["version"]))


def model_purl(model: Mapping) -> PackageURL | None:
    """``pkg:huggingface/ORG/NAME@COMMIT`` (ModelScope likewise); None for a local model (no repository)."""
    repo, source, commit = model.get("repo"), model.get("source"), model.get("commit")
    if not repo or source not in HUB_SITES or "/" not in str(repo):
        return None
    org, name = str(repo).split("/", 1)
    return PackageURL(str(source), org, name, str(commit).lower() if commit else None)


def readme_license(path: Path) -> list[str]:
    """The ``license:`` (and ``license_name:``) of a model card's YAML front matter; [] without one."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    if not text.startswith("---"):
        return []
    end = text.find("\n---", 3)
    if end < 0:
        return []
    try:
        front = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return []
    if not isinstance(front, dict):
        return []
    lic = front.get("license")
    values = [lic] if isinstance(lic, str) else [x for x in lic if isinstance(x, str)] if isinstance(lic, list) \
        else []
    if front.get("license_name") and isinstance(front["license_name"], str):  # license: other + its name
        values = [v for v in values if v != "other"] + [front["license_name"]]
    return [v.strip() for v in values if v.strip()]


def _file(a: Artifact) -> Component:
    return Component(type=ComponentType.FILE, name=a.path, bom_ref=f"file/{a.path}", hashes=_sha256(a.sha256),
                     properties=_props(kind=a.kind, size=a.size, provided=a.provided))


def _env(env: Mapping, arts: Mapping[str, Artifact], licenses: Mapping) -> tuple[Component, list[Component]]:
    name = env["name"]
    art = arts.get(str(env.get("artifact") or ""))
    vllm = (env.get("vllm") or {}).get("version")
    what = (f"the target's existing environment {env['existing']} (not carried)" if env.get("existing") else
            f"conda environment: python {env.get('python')}, vLLM {vllm or '-'}, "
            f"CUDA {env.get('cuda_runtime') or 'none (CPU)'}")
    comp = Component(type=ComponentType.APPLICATION, name=name, bom_ref=f"env/{name}",
                     version=env.get("content_hash"), description=what,
                     hashes=_sha256(art.sha256 if art else None),
                     properties=_props(artifact=env.get("artifact"), content_hash=env.get("content_hash"),
                                       python=env.get("python"), cuda=env.get("cuda"),
                                       cuda_runtime=env.get("cuda_runtime"), min_driver=env.get("min_driver"),
                                       vllm__version=vllm, existing=env.get("existing"),
                                       provided=art.provided if art else None,
                                       size=art.size if art else None))
    lock = env.get("lock") or {}
    conda_lic = (licenses or {}).get("conda") or {}
    pip_lic = (licenses or {}).get("pip") or {}
    pkgs = []
    for e in lock.get("conda") or []:
        hashes = _sha256(e.get("sha256")) or (
            [HashType(alg=HashAlgorithm.MD5, content=e["md5"])] if e.get("md5") else [])
        refs = [ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(e["url"]))] if e.get("url") \
            else []
        pkgs.append(Component(type=ComponentType.LIBRARY, name=e["name"], version=e["version"],
                              bom_ref=f"env/{name}/conda/{e['name']}", purl=conda_purl(e), hashes=hashes,
                              external_references=refs, licenses=_license_list([conda_lic.get(e["name"], "")]),
                              properties=_props(package_manager="conda", environment=name)))
    for e in lock.get("pip") or []:
        cname = canonical(e["name"])
        wheel = e.get("sha256") if e.get("hash_of") is None else None
        pkgs.append(Component(type=ComponentType.LIBRARY, name=cname, version=e["version"],
                              bom_ref=f"env/{name}/pip/{cname}", purl=pypi_purl(e), hashes=_sha256(wheel),
                              licenses=_license_list(pip_lic.get(cname, [])),
                              properties=_props(package_manager="pip", environment=name,
                                                record_sha256=e.get("sha256") if wheel is None else None)))
    return comp, pkgs


def _model(model: Mapping, arts: Mapping[str, Artifact], licenses: list[str]) -> Component:
    name = model["name"]
    files = []
    for f in model.get("files") or []:
        art = arts.get(f"{model.get('dir') or 'models/' + name}/{f['path']}")
        files.append(Component(type=ComponentType.FILE, name=f["path"], bom_ref=f"model/{name}/{f['path']}",
                               hashes=_sha256(f["sha256"]),
                               properties=_props(size=f["size"], provided=art.provided if art else None)))
    refs = []
    site = model.get("endpoint") or HUB_SITES.get(str(model.get("source")))
    if model.get("repo") and site:
        url = f"{str(site).rstrip('/')}/{model['repo']}"
        refs.append(ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(url)))
    return Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=name, bom_ref=f"model/{name}",
                     version=model.get("commit"), purl=model_purl(model), components=files,
                     licenses=_license_list(licenses), external_references=refs,
                     description=f"{model.get('source')} {model.get('repo')}" if model.get("repo") else
                     "a local directory",
                     properties=_props(source=model.get("source"), repo=model.get("repo"),
                                       revision=model.get("revision"), pinned_by=model.get("pinned_by"),
                                       content_hash=model.get("content_hash"), size=model.get("size")))


def make_sbom(doc: Mapping, artifacts: Iterable[Artifact], *, env_licenses: Mapping[str, Mapping] | None = None,
              model_licenses: Mapping[str, list[str]] | None = None) -> bytes:
    """``sbom.cdx.json`` for a MANIFEST document ``doc`` (without ``artifacts``) and its ``artifacts``."""
    arts = {a.path: a for a in artifacts}
    b = doc.get("bundle") or {}
    top = Component(type=ComponentType.APPLICATION, name=str(b.get("name")), version=str(b.get("version")),
                    bom_ref="bundle", description=b.get("description") or None,
                    properties=_props(target__platform=(doc.get("target") or {}).get("platform"),
                                      target__glibc=(doc.get("target") or {}).get("glibc"),
                                      delta__against=(doc.get("delta") or {}).get("against")))
    meta = BomMetaData(component=top, properties=_props(format="llm-pack bundle format 1"))
    meta.tools.components.add(Component(type=ComponentType.APPLICATION, name="llm-pack", version=__version__))
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    meta.timestamp = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
                      if epoch and epoch.isdigit() else None)
    seed = canonical_json({"doc": doc, "artifacts": sorted(a.path + " " + a.sha256 for a in arts.values())})
    bom = Bom(metadata=meta, serial_number=uuid.uuid5(SERIAL_NAMESPACE, hashlib.sha256(seed).hexdigest()))
    direct = []
    for env in doc.get("environments") or []:
        comp, pkgs = _env(env, arts, (env_licenses or {}).get(env["name"]) or {})
        bom.components.add(comp)
        bom.components.update(pkgs)
        bom.register_dependency(comp, pkgs)
        for p in pkgs:
            bom.register_dependency(p, [])
        direct.append(comp)
    for m in doc.get("models") or []:
        comp = _model(m, arts, list((model_licenses or {}).get(m["name"]) or []))
        bom.components.add(comp)
        direct.append(comp)
    for a in sorted(arts.values(), key=lambda a: a.path):
        if a.kind in FILE_KINDS:
            comp = _file(a)
            bom.components.add(comp)
            direct.append(comp)
    bom.register_dependency(top, direct)
    for c in direct:
        if not c.bom_ref.value.startswith("env/"):
            bom.register_dependency(c, [])
    text = JsonV1Dot6(bom).output_as_string(indent=1)
    return (json.dumps(json.loads(text), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def build_sbom(doc: Mapping, artifacts: Iterable[Artifact], built_envs: Iterable,
               model_files: Mapping[str, Mapping[str, str | os.PathLike[str]]]) -> bytes:
    """The SBOM `pack build` adds: licenses from the built environments (``(spec, built, packed)``) and from each
    model's README.md (``model_files``: model name -> {path in the model: the file it was taken from}, which
    exists also for a file a delta leaves to the target)."""
    env_lic = {spec.name: built.licenses for spec, built, _packed in built_envs if built is not None}
    model_lic = {}
    for name, files in model_files.items():
        readme = next((files[k] for k in ("README.md", "readme.md", "Readme.md") if k in files), None)
        if readme is not None:
            model_lic[name] = readme_license(Path(readme))
    return make_sbom(doc, artifacts, env_licenses=env_lic, model_licenses=model_lic)


def read_bundle_sbom(path: str | os.PathLike[str], pubkeys: list[bytes] | None = None) -> bytes:
    """The bytes of a bundle's ``sbom.cdx.json`` (a bundle directory or split volume 1), checked against the size
    and sha256 MANIFEST.json lists for it, and the signature when ``pubkeys`` are given."""
    from installer.bundle.reader import Bundle
    from installer.bundle.volumes import Volumes, read_small
    from installer.errors import BundleError, IntegrityError

    b = Bundle.load(path)
    if pubkeys:
        b.check_signature(pubkeys)
    art = next((a for a in b.artifacts if a.path == SBOM_NAME), None)
    if art is None:
        raise BundleError(f"{b.root}: no {SBOM_NAME} listed in MANIFEST.json (a bundle built before SBOMs)",
                          hint="build the bundle again with this `pack build`: every bundle then holds its SBOM")
    if b.path_of(art).is_file():
        data = read_small(b.path_of(art))
    elif (b.root / "SPLIT.json").is_file():  # split volumes: read it from its pieces, where they are mounted
        from installer.unpack.pieces import Pieces

        vols = Volumes.load(b.root, b.root / "SPLIT.json", {a.path: a.size for a in b.artifacts},
                            b.manifest_sha256)
        with Pieces(art.path, art.size, vols.spans_of(art.path), vols).open() as f:
            data = f.read(art.size + 1)
    else:
        raise IntegrityError(art.path, expected=f"{art.size} bytes", actual="missing", what="file")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != art.size or digest != art.sha256:
        raise IntegrityError(art.path, expected=art.sha256, actual=digest,
                             hint="the SBOM was modified after the bundle was signed; copy the bundle again")
    return data
