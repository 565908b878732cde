"""Per-server service overrides (``--overrides FILE``): merged into the bundle's services by the MANIFEST
rules, part of the installed version's identity (same file: nothing changed; another file: a new version to
switch to and roll back from), refused with a clear message when they break a rule. Real bundles, the real
installer in a subprocess, into a staging tree (--root)."""
# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)

from __future__ import annotations

import json
from pathlib import Path

import pytest

from installer.bundle import overrides
from installer.errors import UsageError
from tests.conda.fixtures import built_env, conda_channel, env_work, wheel_dir  # noqa: F401
from tests.installer_fixtures import (
    BundleSpec,
    keys,  # noqa: F401
    make_bundle,
    run_installer,
    service,
    t1_parts,  # noqa: F401
    tiny_model,
    tree_snapshot,
)

pytestmark = pytest.mark.timeout(900)


def _env(root: Path, name: str = "tiny") -> dict:
    from installer.service import parse_env_file

    return parse_env_file((root / "etc" / "llm" / f"{name}.env").read_text())


def _write(p: Path, obj: object) -> Path:
    p.write_text(json.dumps(obj))
    return p


def test_parse_refuses_what_cannot_be_overridden() -> None:
    ok = overrides.parse(b'{"services": {"tiny": {"port": 8001, "gpus": [0, 1]}}}', source="f")
    assert ok == {"services": {"tiny": {"port": 8001, "gpus": [0, 1]}}}
    for raw, words in (
        (b'{"services": {"tiny": {"vllm_args": ["--x"]}}}', "vllm_args cannot be overridden"),
        (b'{"services": {"tiny": {"port": 1, "port": 2}}}', "given twice"),
        (b'{"other": {}}', 'only a "services" key'),
        (b"[1]", 'only a "services" key'),
        (b"{nope", "not valid JSON"),
        (b'{"services": {"tiny": {"port": NaN}}}', "not valid JSON"),
    ):
        with pytest.raises(UsageError, match=words):
            overrides.parse(raw, source="f")


def test_apply_uses_the_manifest_service_rules() -> None:
    m = {"format_version": 1, "bundle": {"name": "b", "version": "1", "description": "", "tool": "t"},
         "artifacts": [], "environments": [], "models": [],
         "services": [service("a", environment=None, port=9000), service("b", environment=None, port=9001)]}
    merged, rec = overrides.apply(m, {"services": {"a": {"port": 8001, "host": "0.0.0.0"}}}, source="f")
    assert rec is not None and rec.service("a").port == 8001 and merged["services"][0]["host"] == "0.0.0.0"
    assert m["services"][0]["port"] == 9000  # the verified manifest itself is not changed
    for ov, words in (
        ({"a": {"port": 70000}}, r"services\[0\]\.port"),
        ({"a": {"port": 9001}}, "already used"),
        ({"a": {"api_key_file": "../k"}}, "api_key_file"),
        ({"a": {"host": "a b;c"}}, "host"),
        ({"a": {"gpus": [0, 0]}}, "gpus"),
        ({"zz": {"port": 1}}, "no such service"),
    ):
        with pytest.raises(UsageError, match=words):
            overrides.apply(m, {"services": ov}, source="f")
    assert overrides.identity_suffix(b"x", None) == overrides.identity_suffix(b"x", {"services": {}})
    assert overrides.identity_suffix(b"x", {"services": {"a": {"port": 1}}}) != overrides.identity_suffix(b"x", None)


def test_install_with_overrides_is_idempotent_and_a_new_file_is_a_new_version(tmp_path, t1_parts, keys):
    b = make_bundle(tmp_path / "out", BundleSpec(version="1.0.0", env=t1_parts, models=[tiny_model()],
                                                 services=[service()]), keys)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    ov1 = _write(tmp_path / "ov1.json", {"services": {"tiny": {"port": 18501, "host": "0.0.0.0",
                                                               "api_key_file": "/etc/llm/keys/tiny.key"}}})

    def install(*extra: str | Path, check: bool = True):
        return run_installer("install", "--bundle", b, "--root", root, "--pubkey", keys.pub, *extra, check=check)

    install("--overrides", ov1)
    env = _env(root)
    assert env["LLM_PORT"] == "18501" and env["LLM_HOST"] == "0.0.0.0"
    st = json.loads((root / "var/lib/llm/state.json").read_text())
    first = st["lines"]["demo"]["active"]
    kept = root / "var/lib/llm/bundles" / first / "overrides.json"
    assert json.loads(kept.read_text())["services"]["tiny"]["port"] == 18501

    before = tree_snapshot(root)
    r = install("--overrides", ov1)
    assert "nothing changed" in r.stdout and tree_snapshot(root) == before

    ov2 = _write(tmp_path / "ov2.json", {"services": {"tiny": {"port": 18502}}})
    install("--overrides", ov2)
    st = json.loads((root / "var/lib/llm/state.json").read_text())
    assert st["lines"]["demo"]["active"] != first and st["lines"]["demo"]["previous"] == first
    assert _env(root)["LLM_PORT"] == "18502"
    run_installer("rollback", "--root", root)
    assert _env(root)["LLM_PORT"] == "18501"  # the previous version's own overrides come back with it

    bad = _write(tmp_path / "bad.json", {"services": {"tiny": {"port": "8001; rm -rf /"}}})
    r = install("--overrides", bad, check=False)
    assert r.returncode == 2 and "port" in r.stderr and "Traceback" not in r.stderr, r.stderr
