"""Is an instance serving? /health polling, one real completion, the user's curl, and instance status.

/health alone proves little: measured with vLLM's CPU build under `MemoryDenyWriteExecute=yes`, /health
answered 200 while every completion failed with 500. So the post-start check is :func:`wait_healthy`
followed by :func:`probe_completion`. Standard library only (``http.client``): runs on the target.
"""

from __future__ import annotations

import http.client
import json
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from installer import service as systemd  # the package (health is imported last by its __init__)
from installer.bundle.manifest import ServiceRecord
from installer.errors import InstallError

PROBE_PROMPT = "Say hello."


def connect_host(host: str | None) -> str:
    """The address to reach a server listening on ``host`` from the same machine."""
    if not host or host in ("0.0.0.0", "*"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def base_url(host: str | None, port: int) -> str:
    h = connect_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def request(
    host: str | None,
    port: int,
    method: str,
    path: str,
    *,
    body: object | None = None,
    api_key: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body). Raises OSError when nothing answers."""
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = http.client.HTTPConnection(connect_host(host), int(port), timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_healthy(
    host: str | None,
    port: int,
    *,
    timeout: float,
    api_key: str | None = None,
    interval: float = 1.0,
    alive: Callable[[], bool] | None = None,
    unit: str | None = None,
    why: Callable[[], str | None] | None = None,
) -> float:
    """Poll ``GET /health`` until it answers 200; returns the seconds waited.

    ``alive()`` is asked between polls (e.g. "is the unit still active?"); when it says False the wait ends
    at once instead of running into the timeout, and ``why()`` (e.g. :func:`unit_failure_cause`) names the
    real cause. Raises :class:`InstallError` naming the cause, or else the last answer.
    """
    start = time.monotonic()
    deadline = start + timeout
    last = "no answer yet"
    where = unit or f"the server on port {port}"
    hint = f"see `journalctl -u {unit} -n 100`" if unit else "look at the server's log"
    while True:
        try:
            status, body = request(host, port, "GET", "/health", api_key=api_key, timeout=min(10.0, timeout))
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        if alive is not None and not alive():
            cause = why() if why is not None else None
            if cause:
                raise InstallError(f"{where} stopped before it became healthy: {cause}", hint=hint)
            raise InstallError(f"{where} stopped before it became healthy (last: {last})", hint=hint)
        if time.monotonic() >= deadline:
            raise InstallError(f"{where} was not healthy after {timeout:.0f} s (last: {last})", hint=hint)
        time.sleep(interval)


def probe_completion(
    host: str | None,
    port: int,
    model: str,
    api_key: str | None = None,
    *,
    timeout: float = 300.0,
    max_tokens: int = 8,
    prompt: str = PROBE_PROMPT,
) -> dict:
    """Send one short ``/v1/chat/completions`` request; it must answer 200 with a choice.

    Returns {"status", "seconds", "model", "content", "finish_reason", "usage"}; raises
    :class:`InstallError` with the server's answer otherwise.
    """
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    t0 = time.monotonic()
    try:
        status, raw = request(
            host, port, "POST", "/v1/chat/completions", body=body, api_key=api_key, timeout=timeout
        )
    except (OSError, http.client.HTTPException) as e:
        raise InstallError(f"completion request to {base_url(host, port)} failed: {e}") from e
    seconds = time.monotonic() - t0
    text = raw[:500].decode("utf-8", "replace")
    if status != 200:
        hint = "the API key is wrong or missing" if status == 401 else "see the service's journal"
        raise InstallError(f"completion request answered HTTP {status}: {text}", hint=hint)
    try:
        doc = json.loads(raw)
        choice = doc["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise InstallError(f"completion answer has no choice: {text}") from e
    message = choice.get("message") or {}
    content = message.get("content")
    if content is None:
        content = message.get("reasoning_content") or choice.get("text")
    return {
        "status": status,
        "seconds": round(seconds, 3),
        "model": doc.get("model"),
        "content": content,
        "finish_reason": choice.get("finish_reason"),
        "usage": doc.get("usage"),
    }


def probe_service(host: str | None, port: int, svc: ServiceRecord, api_key: str | None = None) -> dict:
    """The real request that proves ``svc`` serves: a completion, an embedding or a score, by its task."""
    from installer.service.probes import probe_embedding, probe_score

    if svc.task == "embed":
        return probe_embedding(host, port, svc.api_name, api_key)
    if svc.task == "score":
        return probe_score(host, port, svc.api_name, api_key)
    return probe_completion(host, port, svc.api_name, api_key)


EX_CONFIG = 78  # llm-serve: the configuration is wrong (the unit does not restart on it)
EXIT_CREDENTIALS = 243  # systemd: LoadCredential= could not read the file


def explain_exit(
    status: int | None, result: str | None, journal: Iterable[str], *, key_file: str | None = None
) -> str | None:
    """The real cause of a unit that stopped while starting, from its exit status and journal lines.

    78 is the launcher's configuration error: its own ``llm-serve: ...`` line says what is wrong. 243 is
    systemd failing to load the API key credential. None when the status says nothing useful.
    """
    lines = [ln.strip() for ln in journal if ln.strip()]
    if status == EX_CONFIG:
        said = [ln for ln in lines if "llm-serve: " in ln and "llm-serve: exec " not in ln]
        detail = said[-1][said[-1].index("llm-serve: "):] if said else "see the journal"
        return f"exited with status 78 (configuration error, not restarted): {detail}"
    if status == EXIT_CREDENTIALS:
        return (f"systemd could not load the API key file {key_file or '(api_key_file)'} (exit status 243, "
                "CREDENTIALS): it must exist and be readable by root")
    if status not in (None, 0):
        tail = f"; last log line: {lines[-1]}" if lines else ""
        return f"exited with status {status}" + (f" ({result})" if result and result != "success" else "") + tail
    return None


def unit_failure_cause(name: str, key_file: str | None = None) -> str | None:
    """:func:`explain_exit` for a live instance (its ExecMainStatus and last journal lines)."""
    props = systemd.unit_properties(name, ["ExecMainStatus", "Result"])
    raw = props.get("ExecMainStatus", "")
    status = int(raw) if raw.isdigit() else None
    journal: list[str] = []
    if status not in (None, 0):
        import subprocess

        try:
            r = subprocess.run(["journalctl", "-u", systemd.unit_name(name), "-n", "30", "-o", "cat",
                                "--no-pager"], capture_output=True, text=True, timeout=10, check=False)
            journal = r.stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            journal = []
    return explain_exit(status, props.get("Result"), journal, key_file=key_file)


def check_instance(root: Path, service: ServiceRecord | Mapping, *, timeout: float = 900.0) -> dict:
    """The post-start check of one started instance: /health, then one real request for its task (a
    completion, an embedding or a score).

    Reads the API key from the service's key file under ``root`` (the installer runs as root), stops waiting
    as soon as the unit gives up (naming the real cause: the launcher's own message for exit 78), and
    returns {"healthy_s", "completion", "curl"}.
    """
    svc = systemd.as_service(service)
    name = svc.name
    key = read_api_key(root, svc.api_key_file)

    def alive() -> bool:
        return systemd.unit_property(name, "ActiveState") in ("active", "activating", "reloading", None)

    healthy_s = wait_healthy(
        svc.host,
        svc.port,
        timeout=timeout,
        api_key=key,
        alive=alive,
        unit=systemd.unit_name(name),
        why=lambda: unit_failure_cause(name, svc.api_key_file),
    )
    completion = probe_service(svc.host, svc.port, svc, key)
    return {"healthy_s": round(healthy_s, 3), "completion": completion, "curl": curl_example(svc)}


def list_models(
    host: str | None, port: int, api_key: str | None = None, *, timeout: float = 10.0
) -> list[str]:
    """Model ids from ``GET /v1/models``."""
    status, raw = request(host, port, "GET", "/v1/models", api_key=api_key, timeout=timeout)
    if status != 200:
        raise InstallError(f"/v1/models answered HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")
    return [m.get("id") for m in json.loads(raw).get("data", [])]


def read_api_key(root: Path, key_file: str | None) -> str | None:
    """The API key from its file on the target (first line, stripped), as the launcher reads it."""
    if not key_file:
        return None
    path = Path(root) / str(key_file).lstrip("/")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        how = systemd.key_install_command(str(key_file), via_credential=systemd.uses_credentials(root))
        raise InstallError(f"cannot read the API key file {key_file}: {why}",
                           hint=f"put the key on its first line: {how}") from e
    lines = text.splitlines()
    return lines[0].strip() if lines else None


def curl_example(service: ServiceRecord | Mapping, *, max_tokens: int = 64) -> str:
    """The ``curl`` a user can run on the server to talk to ``service`` (a MANIFEST services[] entry)."""
    svc = systemd.as_service(service)
    model = svc.api_name
    if svc.task == "embed":
        path, doc = "/v1/embeddings", {"model": model, "input": "Hello! Who are you?"}
    elif svc.task == "score":
        path, doc = "/v1/score", {"model": model, "text_1": "Who are you?", "text_2": ["A model.", "A cat."]}
    else:
        path, doc = "/v1/chat/completions", {
            "model": model,
            "messages": [{"role": "user", "content": "Hello! Who are you?"}],
            "max_tokens": max_tokens,
        }
    url = base_url(svc.host, svc.port) + path
    body = json.dumps(doc, separators=(",", ":"))
    parts = [f"curl -sS {shlex.quote(url)}", "-H 'Content-Type: application/json'"]
    if svc.api_key_file:  # a checked plain path (installer/bundle/manifest/): nothing in it for the shell
        parts.append(f'-H "Authorization: Bearer $(sudo cat {shlex.quote(svc.api_key_file)})"')
    parts.append(f"-d {shlex.quote(body)}")
    return " \\\n  ".join(parts)


def _health(host: str | None, port: int | None, timeout: float) -> str:
    if not port:
        return "unknown"
    try:
        status, _ = request(host, int(port), "GET", "/health", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return "unreachable"
    return "healthy" if status == 200 else f"unhealthy (HTTP {status})"


def instance_status(
    root: Path,
    names: Iterable[str] | None = None,
    *,
    version_of: Callable[[str], str | None] | None = None,
    timeout: float = 2.0,
) -> list[dict]:
    """One JSON-friendly record per instance: unit state, main PID, version, port, health.

    ``names`` defaults to every instance with an env file under ``root``. On a staging tree (``root`` is not
    ``/``) nothing runs, so state and health are None. ``version_of(name)`` overrides the bundle version
    recorded in the env file (e.g. from /var/lib/llm state).
    """
    root = Path(root)
    live = root == Path("/") and systemd.systemd_running()
    rows = []
    for name in list(names) if names is not None else systemd.installed_instances(root):
        env_path = systemd.env_file_path(root, name)
        env = systemd.parse_env_file(env_path.read_text(encoding="utf-8")) if env_path.exists() else {}
        port = int(env["LLM_PORT"]) if env.get("LLM_PORT", "").isdigit() else None
        host = env.get("LLM_HOST")
        row: dict = {
            "instance": name,
            "unit": systemd.unit_name(name),
            "installed": env_path.exists(),
            "version": (version_of(name) if version_of else None) or env.get("LLM_BUNDLE_VERSION"),
            "environment": env.get("LLM_ENVIRONMENT"),
            "model": env.get("LLM_SERVED_MODEL_NAME"),
            "host": host,
            "port": port,
            "url": base_url(host, port) if port else None,
            "active": None,
            "sub": None,
            "main_pid": None,
            "restarts": None,
            "enabled": None,
            "health": None,
        }
        if live:
            props = systemd.unit_properties(
                name, ["ActiveState", "SubState", "MainPID", "NRestarts", "UnitFileState"]
            )
            row["active"] = props.get("ActiveState")
            row["sub"] = props.get("SubState")
            row["main_pid"] = int(props["MainPID"]) if props.get("MainPID", "0").isdigit() else 0
            row["main_pid"] = row["main_pid"] or None
            row["restarts"] = int(props["NRestarts"]) if props.get("NRestarts", "").isdigit() else None
            row["enabled"] = props.get("UnitFileState")
            row["health"] = _health(host, port, timeout) if row["active"] == "active" else "down"
        if env.get("LLM_RAY_ROLE"):
            row["cluster"] = _cluster_status(root, name, env, live)
            if env["LLM_RAY_ROLE"] == "worker":  # no API server here: the Ray worker's unit is the instance
                row["unit"], row["active"], row["health"] = row["cluster"]["unit"], row["cluster"]["active"], None
        rows.append(row)
    return rows


def _cluster_status(root: Path, name: str, env: dict, live: bool) -> dict:
    """A node of a service that spans nodes: its role, its Ray unit, and the cluster's nodes as the head
    reports them (installer/service/cluster.py)."""
    from installer.service import cluster

    role = env["LLM_RAY_ROLE"]
    unit = cluster.ray_unit(role, name)
    out: dict = {"role": role, "unit": unit, "head": env.get("LLM_RAY_HEAD"), "address": env.get("VLLM_HOST_IP"),
                 "expected_nodes": int(env["LLM_RAY_NODES"]) if env.get("LLM_RAY_NODES", "").isdigit() else None,
                 "active": None, "nodes": None, "error": None}
    if live:
        out["active"] = systemd.unit_properties(unit, ["ActiveState"]).get("ActiveState")
        nodes, error = cluster.cluster_nodes(env.get("LLM_PYTHON", ""), env.get("LLM_RAY_HEAD", ""), root=root)
        out["nodes"] = sorted(str(n.get("address")) for n in nodes) if error is None else None
        out["error"] = error
    return out


def format_status(rows: list[dict]) -> str:
    """A plain table of :func:`instance_status` rows."""
    cols = [
        ("INSTANCE", "instance"),
        ("VERSION", "version"),
        ("ACTIVE", "active"),
        ("PID", "main_pid"),
        ("PORT", "port"),
        ("MODEL", "model"),
        ("HEALTH", "health"),
    ]
    table = [[h for h, _ in cols]] + [
        ["-" if r.get(k) is None else str(r.get(k)) for _, k in cols] for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
    for r in rows:
        c = r.get("cluster")
        if c:
            nodes = (f"{len(c['nodes'])} of {c['expected_nodes']} node(s) joined: {', '.join(c['nodes']) or '-'}"
                     if c.get("nodes") is not None else f"nodes unknown ({c.get('error') or 'not running'})")
            text += (f"\n{r['instance']}: Ray {c['role']} ({c['unit']}: {c.get('active') or '-'}), this node "
                     f"{c.get('address')}, head {c.get('head')}; {nodes}")
    return text
