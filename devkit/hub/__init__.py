"""A hub-compatible HTTP server (Hugging Face + ModelScope protocols) for tests, on 127.0.0.1.

    from devkit.hub import HubServer, GeneratedContent
    with HubServer() as hub:
        sha = hub.add_repo("org/model", {"config.json": b"{}",
                                         "model.safetensors": GeneratedContent(10 << 20)})
        os.environ["HF_ENDPOINT"] = hub.url

Fixtures (import them into a test module or conftest): ``tests.hub.fixtures.hub`` (a running server)
and ``tests.hub.fixtures.hub_env`` (HF_HOME / MODELSCOPE_CACHE / store in tmp, telemetry off, no token).
"""

from devkit.hub.content import BytesContent, Content, FileContent, GeneratedContent
from devkit.hub.repos import HubFile, Request
from devkit.hub.server import HubServer

__all__ = ["BytesContent", "Content", "FileContent", "GeneratedContent", "HubFile", "HubServer", "Request"]
