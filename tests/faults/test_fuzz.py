"""R6 fuzzing: the manifest loader (``pack validate``: YAML text) and the target's MANIFEST loader
(``Manifest.from_json``: JSON bytes) get 10,000 generated inputs each and raise nothing but the tool's own
errors (ManifestError / BundleError, no traceback).

Inputs: random bytes and text, YAML-ish and JSON-ish token soup (tags such as ``!!python/object``, anchors,
aliases, deep nesting), random JSON documents, and structured mutations of a valid document (a field
replaced by a random value or a hostile string, deleted, or an unknown one added). Hypothesis runs
derandomized with no example database, so CI sees the same inputs every run.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from installer.bundle.manifest import Manifest  # noqa: E402
from installer.errors import BundleError  # noqa: E402
from packager.errors import ManifestError  # noqa: E402
from packager.manifest import load_manifest  # noqa: E402
from tests.faults.test_manifest_fields import valid_manifest, valid_yaml_doc  # noqa: E402

EXAMPLES = 10_000
VALID_MANIFEST = valid_manifest()
VALID_YAML = valid_yaml_doc()
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)

HOSTILE_TEXT = st.sampled_from([
    "\n", "\x00", "%", ";", "$(id)", "`id`", "../", "/..", "..", "\r", "\t", " ", "", "\u2028", "\ufeff",
    "ExecStartPre=+/bin/sh", "12.8\n", "/etc/passwd", "a" * 300, "é", "\x7f", "--api-key=x", "VLLM_API_KEY",
    "0.0.0.0", "::", "-1", "1e400", "null", "{", "[", "'", '"', "\\",
])
TEXT = st.one_of(st.text(max_size=40), HOSTILE_TEXT, st.builds(lambda a, b: a + b, st.text(max_size=10), HOSTILE_TEXT))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(TEXT, inner, max_size=4)),
                           max_leaves=12)


def _paths(doc, prefix=()):
    """Every path into a JSON document (dict keys and list indices)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw, base: dict) -> dict:
    """1-3 random edits of ``base``: replace a value, delete it, or add an unknown key beside it."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        how = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if how == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif how == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(TEXT)] = draw(JSON_VALUES)
        else:
            parent.insert(path[-1], draw(JSON_VALUES))
    return doc


TOKENS_JSON = st.sampled_from(['{', '}', '[', ']', ',', ':', '"', '"a"', '1', '-0', '1e999', 'NaN', 'Infinity',
                               'true', 'null', '"format_version"', '"\\u0000"', '"\\ud800"', ' ', '\n'])
TOKENS_YAML = st.sampled_from(["!!python/object:os.system", "!!python/object/apply:os.system ['id']",
                               "!!python/name:os.system", "!!binary", "!!set", "!!timestamp", "!!float",
                               "&a", "*a", "<<: *a", "{", "}", "[", "]", "- ", ": ", "? ", ",", "\n", "  ",
                               "\t", "#", "'", '"', "|", ">", "---", "...", "%YAML 1.1", "%TAG", "bundle",
                               "name", "version", "services", "models", "environments", "port", "gpus",
                               "1.0", "12.8", "0x10", "~", "yes", "\x00", "\ufeff", "é"])


def _soup(tokens):
    return st.lists(tokens, max_size=40).map("".join)


JSON_INPUTS = st.one_of(
    st.binary(max_size=200),
    _soup(TOKENS_JSON).map(str.encode),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    mutated(VALID_MANIFEST).map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    mutated(VALID_MANIFEST).map(lambda d: json.dumps(d).encode()),
)


def test_fuzz_target_manifest_loader() -> None:
    counts = {"inputs": 0, "accepted": 0, "refused": 0}
    t0 = time.monotonic()

    @SETTINGS
    @given(JSON_INPUTS)
    def run(raw: bytes) -> None:
        counts["inputs"] += 1
        try:
            Manifest.from_json(raw)
        except BundleError as e:
            assert str(e) and "Traceback" not in str(e)
            counts["refused"] += 1
            return
        counts["accepted"] += 1

    run()
    print(f"R6 fuzz Manifest.from_json: {counts['inputs']} inputs, {counts['refused']} refused with BundleError, "
          f"{counts['accepted']} accepted, 0 other exceptions ({time.monotonic() - t0:.1f} s)")
    assert counts["inputs"] >= EXAMPLES
    assert counts["accepted"] > 0 and counts["refused"] > 0


def _yaml_text(doc) -> str:
    import yaml

    return yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, allow_unicode=True)


YAML_INPUTS = st.one_of(
    st.text(max_size=200),
    _soup(TOKENS_YAML),
    JSON_VALUES.map(_yaml_text),
    mutated(VALID_YAML).map(_yaml_text),
    mutated(VALID_YAML).map(_yaml_text),
)


def test_fuzz_yaml_manifest_loader(tmp_path: Path) -> None:
    counts = {"inputs": 0, "accepted": 0, "refused": 0}
    path = tmp_path / "m.yaml"
    t0 = time.monotonic()

    @SETTINGS
    @given(YAML_INPUTS)
    def run(text: str) -> None:
        counts["inputs"] += 1
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            load_manifest(path)
        except ManifestError as e:
            assert e.problems and all(p.startswith(str(path)) for p in e.problems), e.problems
            counts["refused"] += 1
            return
        counts["accepted"] += 1

    run()
    print(f"R6 fuzz load_manifest (pack validate): {counts['inputs']} inputs, {counts['refused']} refused with "
          f"ManifestError, {counts['accepted']} accepted, 0 other exceptions ({time.monotonic() - t0:.1f} s)")
    assert counts["inputs"] >= EXAMPLES
    assert counts["accepted"] > 0 and counts["refused"] > 0
