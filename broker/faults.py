"""A test-only crash hook: `AMO_BROKER_FAULT=<point>` kills the process at that point.

Inert unless the variable is set. It lets the crash tests stop a real `serve` process at an
exact step of a rotation with SIGKILL, which no handler, `finally` or atexit can soften, the
way a power cut or the OOM killer would. The points:

- `after_lease`: the refresh lease is committed, amoCRM not yet called (refresher.py);
- `after_answer`: amoCRM granted a new pair, nothing of it stored yet (refresher.py);
- `during_commit`: the new pair's row, history entry and lease release are written inside
  the open transaction, COMMIT not yet run (store.py). Armed, it also shrinks the store's
  page cache so those pages spill into the WAL uncommitted; the next open must discard them
  and find the old pair whole, never a mix.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "AMO_BROKER_FAULT"


def fault_armed(name: str) -> bool:
    """Tell whether the test asked to die at this point (to set the scene for it)."""
    return os.environ.get(FAULT_ENV) == name


def fault_point(name: str) -> None:
    """Die here, at once, when the test asked for this point."""
    if fault_armed(name):
        os.kill(os.getpid(), signal.SIGKILL)
