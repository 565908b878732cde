"""The services of a MANIFEST: the service rules (one implementation, also run by ``pack validate`` on the
YAML), port conflicts, the network warning, and :class:`ServiceRecord`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from installer.bundle.manifest.cluster import MAX_NODES, NodeRole, RaySettings, cluster_problems
from installer.bundle.manifest.fields import FieldReader, kind_of
from installer.bundle.manifest.record import FrozenDict, Record
from installer.bundle.manifest.rules import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DTYPES,
    ENV_KEY_RE,
    NAME_RE,
    SERVE_BY,
    SERVED_NAME_RE,
    Problem,
    abs_path_problem,
    control_char_problem,
    host_problem,
    is_loopback,
    value_problem,
)
from installer.bundle.manifest.tasks import CONVERTS, LORA_RANKS, TASKS
from installer.bundle.names import MANIFEST_NAME


def service_problems(svc: Mapping) -> list[Problem]:
    """The service rules, for a MANIFEST ``services[]`` entry or a manifest.yaml one (defaults not filled).

    Checks the content of the fields that reach the target's unit files, env file and launcher. A field of
    the wrong type is skipped here (the caller's type check reports it). Returns every problem found.
    """
    out: list[Problem] = []

    def name_like(key: str, rx: re.Pattern, what: str) -> None:
        v = svc.get(key)
        if isinstance(v, str) and not rx.fullmatch(v):
            bad = control_char_problem(v)
            out.append(((key,), f"{v!r} is not a valid {what}" + (f": it {bad}" if bad else "")))

    name_like("name", NAME_RE, "service name (letters, digits, '.', '_', '-'; at most 64, starting with a "
                               "letter or digit)")
    name_like("model", NAME_RE, "model name")
    name_like("environment", NAME_RE, "environment name")
    served = svc.get("served_model_name")
    if isinstance(served, str) and (not SERVED_NAME_RE.fullmatch(served) or ".." in served.split("/")):
        out.append((("served_model_name",), f"{served!r} is not a valid served model name (letters, digits "
                                            "and . _ : / + -, no '..')"))
    host = svc.get("host")
    if isinstance(host, str):
        bad = host_problem(host)
        if bad:
            out.append((("host",), bad))
    key_file = svc.get("api_key_file")
    if isinstance(key_file, str):
        bad = abs_path_problem(key_file)
        if bad:
            out.append((("api_key_file",), bad))
    args = svc.get("vllm_args")
    if isinstance(args, (list, tuple)):
        for i, arg in enumerate(args):
            if not isinstance(arg, str):
                continue
            if arg.split("=", 1)[0] == "--api-key":
                out.append((("vllm_args", i), "--api-key in vllm_args would put the key on the command line "
                                              "and in the bundle; use api_key_file: (a file on the target)"))
                continue
            bad = value_problem(arg)
            if bad:
                out.append((("vllm_args", i), f"argument {arg!r} {bad}"))
    env = svc.get("env")
    if isinstance(env, Mapping):
        for k, v in env.items():
            if not isinstance(k, str) or not ENV_KEY_RE.fullmatch(k):
                out.append((("env", str(k)), f"{k!r} is not a valid environment variable name "
                                             "(letters, digits, '_'; not starting with a digit)"))
                continue
            if k == API_KEY_ENV:
                out.append((("env", k), f"{API_KEY_ENV} must not be set in env (it would be stored in "
                                        "/etc/llm/*.env); use api_key_file: (a file on the target)"))
                continue
            if isinstance(v, (str, int, float)) and not (isinstance(v, float) and not math.isfinite(v)):
                bad = value_problem(str(v))
                if bad:
                    out.append((("env", k), f"value {str(v)!r} {bad}"))
    return out


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "*", ""})


def port_conflicts(listeners: Iterable[tuple[str | None, int]]) -> list[tuple[int, int]]:
    """``(i, j)`` for each listener ``i`` whose port is already taken by an earlier listener ``j``.

    ``listeners`` are ``(host, port)`` with the defaults filled in (None means the default host). Two
    services clash on the same port when their hosts are equal or either listens on every address.
    """
    seen: list[tuple[str, int, int]] = []
    out = []
    for i, (host, port) in enumerate(listeners):
        h = DEFAULT_HOST if host is None else host
        for ph, pp, j in seen:
            if pp == port and (ph == h or ph in WILDCARD_HOSTS or h in WILDCARD_HOSTS):
                out.append((i, j))
                break
        seen.append((h, port, i))
    return out


def service_warnings(svc: Mapping) -> list[Problem]:
    """Advice, not refusal: a non-loopback listener without an API key serves anyone on the network."""
    host = svc.get("host")
    if (host is None or isinstance(host, str)) and not is_loopback(host) and not svc.get("api_key_file"):
        return [(("host",), f"listens on {host} without api_key_file: anyone who can reach this address can "
                            "use the API; set api_key_file: or host: 127.0.0.1")]
    return []


SERVICE_FIELDS = ("name", "model", "environment", "served_model_name", "host", "port", "gpus",
                  "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "dtype",
                  "gpu_memory_utilization", "trust_remote_code", "api_key_file", "serve_by", "vllm_args", "env",
                  "task", "convert", "max_lora_rank", "nodes", "ray", "node")
# written to MANIFEST.json only when set: a bundle without them has the MANIFEST it had before they existed
OPTIONAL_FIELDS = {"task": "generate", "convert": None, "max_lora_rank": None, "nodes": 1, "ray": None,
                   "node": None}


@dataclass(frozen=True)
class ServiceRecord(Record):
    name: str
    model: str
    environment: str | None = None
    served_model_name: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    gpus: tuple[int, ...] = ()
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str | None = None
    gpu_memory_utilization: float | None = None
    trust_remote_code: bool = False
    api_key_file: str | None = None
    serve_by: str = "path"
    vllm_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: FrozenDict())
    task: str = "generate"  # generate | embed | score (installer/bundle/manifest/tasks.py)
    convert: str | None = None  # embed | classify: adapt a generative model (vLLM >= 0.10.1)
    max_lora_rank: int | None = None  # default: from the adapters' ranks
    nodes: int = 1  # > 1: served over a Ray cluster of that many servers (installer/bundle/manifest/cluster.py)
    ray: RaySettings | None = None  # the cluster's ports and wait (default RaySettings() when nodes > 1)
    node: NodeRole | None = None  # this server's part (head or worker): per server, from --overrides

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key, default in OPTIONAL_FIELDS.items():
            if out.get(key) == default:
                del out[key]
        return out

    @classmethod
    def read(cls, r: FieldReader) -> ServiceRecord:
        r.only_keys(SERVICE_FIELDS)
        gpus = tuple(r.check_int(g, ("gpus", i), minimum=0, maximum=1023) for i, g in enumerate(r.list("gpus")))
        if len(set(gpus)) != len(gpus):
            r.fail(("gpus",), "a GPU index is listed twice")
        util = r.raw("gpu_memory_utilization", optional=True)
        if util is not None:
            if isinstance(util, bool) or not isinstance(util, (int, float)) or not (0 < util <= 1):
                r.fail(("gpu_memory_utilization",), f"expected a number in (0, 1], found {util!r}")
            util = float(util)
        env_r = r.child("env", optional=True)
        env: dict[str, str] = {}
        if env_r is not None:
            for k, v in env_r.obj.items():
                if isinstance(v, bool):
                    env[k] = "1" if v else "0"
                elif isinstance(v, (str, int)) or (isinstance(v, float) and math.isfinite(v)):
                    env[k] = str(v)
                else:
                    r.fail(("env", k), f"expected a string, number or boolean, found {kind_of(v)}")
        args = r.str_list("vllm_args")
        svc = cls(
            name=r.str("name", what="service name"),
            model=r.str("model", what="model name"),
            environment=r.str("environment", optional=True, what="environment name"),
            served_model_name=r.str("served_model_name", optional=True),
            host=r.str("host", optional=True) or DEFAULT_HOST,
            port=r.int("port", minimum=1, maximum=65535, optional=True, default=DEFAULT_PORT),
            gpus=gpus,
            tensor_parallel_size=r.int("tensor_parallel_size", minimum=1, maximum=1024, optional=True, default=1),
            pipeline_parallel_size=r.int("pipeline_parallel_size", minimum=1, maximum=1024, optional=True,
                                         default=1),
            max_model_len=r.int("max_model_len", minimum=1, optional=True),
            dtype=r.str("dtype", choices=DTYPES, optional=True),
            gpu_memory_utilization=util,
            trust_remote_code=r.bool("trust_remote_code"),
            api_key_file=r.str("api_key_file", optional=True),
            serve_by=r.str("serve_by", choices=SERVE_BY, optional=True) or "path",
            vllm_args=args,
            env=FrozenDict(env),
            task=r.str("task", choices=TASKS, optional=True) or "generate",
            convert=r.str("convert", choices=CONVERTS, optional=True),
            max_lora_rank=_lora_rank(r),
            nodes=r.int("nodes", minimum=1, maximum=MAX_NODES, optional=True, default=1),
            ray=RaySettings.read(ray_r) if (ray_r := r.child("ray", optional=True)) is not None else None,
            node=NodeRole.read(node_r) if (node_r := r.child("node", optional=True)) is not None else None,
        )
        problems = service_problems({**svc.to_dict(), "env": env_r.obj if env_r is not None else {}})
        problems += cluster_problems(svc.to_dict())
        if problems:
            rel, msg = problems[0]
            r.fail(rel, msg)
        return svc

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @property
    def ray_settings(self) -> RaySettings:
        return self.ray or RaySettings()

    @property
    def workers_per_node(self) -> int:
        """Model workers (GPUs) on each node: tensor_parallel_size × pipeline_parallel_size / nodes."""
        return max(1, self.tensor_parallel_size * self.pipeline_parallel_size // self.nodes)

    @property
    def api_name(self) -> str:
        """The model name clients use (served_model_name, default the service name)."""
        return self.served_model_name or self.name


def _lora_rank(r: FieldReader) -> int | None:
    v = r.int("max_lora_rank", minimum=1, optional=True)
    if v is not None and v not in LORA_RANKS:
        r.fail(("max_lora_rank",), f"{v} is not a rank vLLM accepts (one of {', '.join(map(str, LORA_RANKS))})")
    return v


def as_service(s: ServiceRecord | Mapping, *, path: tuple = ("services", 0)) -> ServiceRecord:
    return s if isinstance(s, ServiceRecord) else ServiceRecord.read(FieldReader(dict(s), path, MANIFEST_NAME))
