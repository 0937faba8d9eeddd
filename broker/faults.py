"""A test-only crash hook: `AMO_BROKER_FAULT=<point>` kills the process at that point.

Inert unless the variable is set. It lets the crash tests stop a real `serve` process at an
exact step of a rotation (after the lease, after amoCRM answered) with SIGKILL, which no
handler, `finally` or atexit can soften, the way a power cut or the OOM killer would.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "AMO_BROKER_FAULT"


def fault_point(name: str) -> None:
    """Die here, at once, when the test asked for this point."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
