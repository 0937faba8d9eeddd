"""What a refusal after a taken-over lease says about the holder that did not finish."""

from __future__ import annotations

import os
import subprocess
import sys

from broker.store.lease import Lease, holder_id, lost_answer_note


def lease_of(holder: str) -> Lease:
    return Lease(holder, 4, 0.0, 1.0, live=False)


def test_a_lapsed_lease_of_a_live_holder_does_not_say_it_died() -> None:
    """A holder still running (this process: an account that left on SIGHUP) lapsed, not died.
    (The old note always said "the process died", for a live process too: issue 22, R1.)"""
    note = lost_answer_note(lease_of(holder_id()), 4)
    assert "did not finish" in note and "lease lapsed" in note
    assert "died" not in note


def test_a_lease_of_a_dead_local_pid_says_the_process_died() -> None:
    """A local holder whose pid is gone is known dead, and the note says so."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = holder_id().replace(f":{os.getpid()}:", f":{child.stdout.strip()}:", 1)
    assert "the process died" in lost_answer_note(lease_of(dead), 4)
    assert lost_answer_note(lease_of(dead), 5) == ""  # another generation's: not this refusal
