"""pytest fixtures around :class:`devkit.hub.HubServer`.

``hub_env`` keeps the real clients away from the internet and from ~/.cache: it points HF_HOME,
MODELSCOPE_CACHE, MODELSCOPE_HOME and LLM_PACK_STORE at temp dirs, turns telemetry off and removes
any token or endpoint inherited from the environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.hub.server import HubServer

_CLEARED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "MODELSCOPE_ENDPOINT",
            "MODELSCOPE_API_TOKEN", "MODELSCOPE_DOMAIN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
            "HF_XET_HIGH_PERFORMANCE")


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "client-home"
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "10")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "modelscope-cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(home / "modelscope-home"))
    monkeypatch.setenv("LLM_PACK_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def hub(hub_env: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        yield server
