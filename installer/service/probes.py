"""The real requests that prove a pooling instance serves: one ``/v1/embeddings`` (task: embed) or one
``/v1/score`` (task: score) request, as :func:`installer.service.health.probe_completion` is for chat.
Standard library only."""

from __future__ import annotations

import http.client
import json
import time

from installer.errors import InstallError
from installer.service.health import PROBE_PROMPT, base_url, request


def _post(host: str | None, port: int, path: str, body: dict, api_key: str | None, timeout: float,
          what: str) -> tuple[dict, float]:
    """POST ``body`` to ``path``; the answer must be 200 JSON. Returns (document, seconds)."""
    t0 = time.monotonic()
    try:
        status, raw = request(host, port, "POST", path, body=body, api_key=api_key, timeout=timeout)
    except (OSError, http.client.HTTPException) as e:
        raise InstallError(f"{what} request to {base_url(host, port)}{path} failed: {e}") from e
    seconds = time.monotonic() - t0
    text = raw[:500].decode("utf-8", "replace")
    if status != 200:
        hint = "the API key is wrong or missing" if status == 401 else "see the service's journal"
        raise InstallError(f"{what} request to {path} answered HTTP {status}: {text}", hint=hint)
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise InstallError(f"{what} answer from {path} is not JSON: {text}") from e
    if not isinstance(doc, dict):
        raise InstallError(f"{what} answer from {path} is not a JSON object: {text}")
    return doc, seconds


def probe_embedding(host: str | None, port: int, model: str, api_key: str | None = None, *,
                    timeout: float = 300.0, text: str = PROBE_PROMPT) -> dict:
    """One ``/v1/embeddings`` request: it must answer 200 with a non-empty vector of numbers.

    Returns {"status", "seconds", "model", "content" (a one-line summary), "dimensions", "usage"}."""
    doc, seconds = _post(host, port, "/v1/embeddings", {"model": model, "input": text}, api_key, timeout,
                         "embedding")
    try:
        vec = doc["data"][0]["embedding"]
        ok = isinstance(vec, list) and vec and all(isinstance(x, (int, float)) for x in vec)
    except (KeyError, IndexError, TypeError):
        ok, vec = False, None
    if not ok:
        raise InstallError(f"embedding answer has no vector: {json.dumps(doc)[:300]}")
    return {"status": 200, "seconds": round(seconds, 3), "model": doc.get("model"),
            "content": f"{len(vec)} dimensions", "dimensions": len(vec), "usage": doc.get("usage")}


def probe_score(host: str | None, port: int, model: str, api_key: str | None = None, *,
                timeout: float = 300.0) -> dict:
    """One ``/v1/score`` request (a query against two documents): 200 with a score per document."""
    body = {"model": model, "text_1": PROBE_PROMPT, "text_2": ["Hello.", "Goodbye."]}
    doc, seconds = _post(host, port, "/v1/score", body, api_key, timeout, "score")
    try:
        scores = [float(d["score"]) for d in doc["data"]]
    except (KeyError, TypeError, ValueError):
        scores = []
    if len(scores) != 2:
        raise InstallError(f"score answer has no score per document: {json.dumps(doc)[:300]}")
    return {"status": 200, "seconds": round(seconds, 3), "model": doc.get("model"),
            "content": ", ".join(f"{x:.4f}" for x in scores), "scores": scores,
            "usage": doc.get("usage")}
