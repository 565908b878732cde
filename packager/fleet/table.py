"""The fleet preflight: every host's ``install.sh --check --json`` as one table.

Standard library only: ``pack fleet`` copies this file verbatim into the playbook's ``filter_plugins/`` (the
admin host has ansible-core, not llm-pack), where :class:`FilterModule` gives Ansible two filters:

* ``llm_preflight_parse``: the registered result of the check command -> ``{"ok", "checks", "error"}``
  (a host whose check did not even run, e.g. a bad signature, gets ``ok: false`` and the error's last line);
* ``llm_preflight_table``: ``hostvars`` and the play's hosts -> the table text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

RESULT_KEY = "llm_preflight"  # the fact each host sets with llm_preflight_parse's result


def parse_check(stdout: str, stderr: str = "", rc: int | None = None) -> dict:
    """``install.sh --check --json``'s output -> ``{"ok": bool, "checks": [...], "error": str}``."""
    try:
        doc = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("checks"), list):
        checks = [c for c in doc["checks"] if isinstance(c, dict)]
        ok = bool(doc.get("ok")) and not any(c.get("status") == "FAIL" for c in checks)
        return {"ok": ok, "checks": checks, "error": ""}
    lines = [ln.strip() for ln in (stderr or stdout or "").splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
    return {"ok": False, "checks": [], "error": err or f"the check exited {rc} with no output"}


DETAIL_WIDTH = 160  # a check's detail in the table (the host's own `install.sh --check` shows it whole)


def _problem(c: Mapping, width: int = DETAIL_WIDTH) -> str:
    subject = f" ({c['subject']})" if c.get("subject") else ""
    text = f"{c.get('status')} {c.get('name')}{subject}: {c.get('detail', '')}".rstrip()
    return text if len(text) <= width else text[: width - 3] + "..."


def render(results: Mapping[str, Mapping | None]) -> str:
    """One row per host (PASS/WARN/FAIL counts, verdict, first problem), then every FAIL/WARN with remedy."""
    rows = [("HOST", "PASS", "WARN", "FAIL", "RESULT", "FIRST PROBLEM")]
    details: list[str] = []
    for host in sorted(results):
        r = results[host]
        if not r:
            rows.append((host, "-", "-", "-", "NOT RUN", "the check did not run (host unreachable?)"))
            continue
        checks = list(r.get("checks") or [])
        n = {s: sum(1 for c in checks if c.get("status") == s) for s in ("PASS", "WARN", "FAIL")}
        bad = [c for c in checks if c.get("status") in ("FAIL", "WARN")]
        bad.sort(key=lambda c: c.get("status") != "FAIL")
        if r.get("not_run"):
            verdict, first = "NOT RUN", str(r["not_run"])
        elif r.get("error"):
            verdict, first = "ERROR", str(r["error"])
        else:
            verdict = "READY" if r.get("ok") else "REFUSED"
            first = _problem(bad[0], 100) if bad else ""
        rows.append((host, str(n["PASS"]), str(n["WARN"]), str(n["FAIL"]), verdict, first))
        for c in bad:
            details.append(f"  {host}: {_problem(c)}")
            if c.get("remedy"):
                details.append(f"  {' ' * len(host)}  remedy: {c['remedy']}")
    w = [max(len(row[i]) for row in rows) for i in range(5)]
    out = [f"{row[0]:<{w[0]}}  {row[1]:>{w[1]}}  {row[2]:>{w[2]}}  {row[3]:>{w[3]}}  {row[4]:<{w[4]}}  {row[5]}"
           .rstrip() for row in rows]
    ready = sum(1 for row in rows[1:] if row[4] == "READY")
    out.append(f"fleet preflight: {ready} of {len(rows) - 1} host(s) ready")
    if details:
        out += ["", "problems:", *details]
    return "\n".join(out) + "\n"


def table_from_hostvars(hostvars: Mapping[str, Any], hosts: Iterable[str]) -> str:
    return render({h: (hostvars.get(h) or {}).get(RESULT_KEY) for h in hosts})


def _parse_filter(registered: Mapping) -> dict:
    return parse_check(str(registered.get("stdout") or ""), str(registered.get("stderr") or ""),
                       registered.get("rc"))


class FilterModule:
    """Ansible's entry point when this file sits in a playbook's ``filter_plugins/``."""

    def filters(self) -> dict:
        return {"llm_preflight_parse": _parse_filter, "llm_preflight_table": table_from_hostvars}
