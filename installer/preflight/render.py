"""Preflight results as a table, as JSON, as a summary; raising on a FAIL."""

from __future__ import annotations

import json
from collections.abc import Iterable

from installer.errors import PreflightError
from installer.preflight.context import FAIL, PASS, SKIP, WARN, CheckResult


def summary(results: Iterable[CheckResult]) -> dict[str, int]:
    counts = {PASS: 0, WARN: 0, FAIL: 0, SKIP: 0}
    for r in results:
        counts[r.status] += 1
    return counts


def failed(results: Iterable[CheckResult]) -> bool:
    return any(r.status == FAIL for r in results)


def render_table(results: list[CheckResult]) -> str:
    """Aligned table; a ``remedy:`` line under every non-PASS row that has one; a summary line last."""
    rows = [("STATUS", "CHECK", "SUBJECT", "DETAIL")] + [(r.status, r.name, r.subject, r.detail)
                                                         for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    indent = " " * (sum(w) + 6)
    lines = []
    for i, row in enumerate(rows):
        lines.append(f"{row[0]:<{w[0]}}  {row[1]:<{w[1]}}  {row[2]:<{w[2]}}  {row[3]}".rstrip())
        r = results[i - 1] if i else None
        if r is not None and r.status != PASS and r.remedy:
            lines.append(f"{indent}remedy: {r.remedy}")
    c = summary(results)
    verdict = "FAIL: install refused" if c[FAIL] else "OK"
    lines.append(f"preflight: {c[PASS]} PASS, {c[WARN]} WARN, {c[FAIL]} FAIL, {c[SKIP]} SKIP -> {verdict}")
    return "\n".join(lines) + "\n"


def results_to_json(results: list[CheckResult]) -> str:
    return json.dumps({"ok": not failed(results), "summary": summary(results),
                       "checks": [r.to_dict() for r in results]}, indent=1, ensure_ascii=False) + "\n"


def raise_on_failure(results: list[CheckResult]) -> None:
    bad = [r for r in results if r.status == FAIL]
    if bad:
        raise PreflightError(f"{len(bad)} preflight check(s) failed: "
                             + ", ".join(f"{r.name} ({r.subject})" if r.subject else r.name for r in bad),
                             hint="fix what the table says, or pass --skip-check NAME to override deliberately")
