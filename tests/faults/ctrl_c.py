"""Children that a test interrupts with SIGINT must have SIGINT's default disposition.

A runner started as a background job without job control (``cmd &`` in a script, some CI agents) has SIGINT
ignored, and every process it starts inherits that: Python then never raises KeyboardInterrupt and the
interrupted install or build runs to the end (exit 0). That is right for the product (an ignored SIGINT is
the caller's choice), but these tests are about what Ctrl-C at a terminal does.
"""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test will interrupt: SIGINT as a terminal would deliver it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
