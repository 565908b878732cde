"""Byte counts as people read them (decimal units, like `df -H` and the hubs' web pages)."""

from __future__ import annotations


def human_size(n: float) -> str:
    """``1234567`` -> ``'1.2 MB'``; bytes below 1000 print whole."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
