"""Who holds the refresh lease: naming a holder, and telling whether it can still be running.

Lease expiry is never judged by the wall clock, which an NTP step or a resumed VM can move
past a live lease's TTL in one process only: two processes would then send the same refresh
token. The SQLite store (one host) times leases on the boot clock below, which cannot step and
which every process of one boot shares; the PostgreSQL store uses the database's own clock.
`Lease.acquired_at`/`expires_at` are wall times, for display only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_HOST = os.uname().nodename
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# The boot id when the kernel does not tell it (not Linux, /proc hidden): a lease is then
# judged by the boot clock alone, and one taken later on it than now is from an earlier boot.
UNKNOWN_BOOT = "unknown"


@dataclass(frozen=True)
class LeaseToken:
    """What a lease holder presents to renew or release its lease: holder and fence."""

    holder: str
    seq: int


@dataclass(frozen=True)
class Lease:
    """Who is refreshing which generation, until when (wall times, for display)."""

    holder: str
    generation: int
    acquired_at: float
    expires_at: float
    live: bool  # by the store's lease clock: another holder would be refused it now
    # The fence: per account it only ever grows, and each grant gets a seq no earlier grant
    # had, so a holder whose lease lapsed and was granted again can never act on the new one.
    seq: int = 0

    @property
    def token(self) -> LeaseToken:
        return LeaseToken(self.holder, self.seq)


@dataclass(frozen=True)
class LeaseResult:
    """The outcome of trying to take the refresh lease."""

    acquired: bool
    generation: int
    current: Lease | None  # the lease now in force (ours when acquired)
    taken_over: Lease | None = None  # an expired or orphaned lease we replaced

    @property
    def token(self) -> LeaseToken | None:
        """The token of the lease taken: what renews and releases exactly that lease."""
        return self.current.token if self.acquired and self.current is not None else None


def is_alive(holder: str) -> bool:
    """Say whether a lease holder may still be running: only a local, dead pid is known dead.

    The SQLite store's shortcut (one host, one pid namespace). The PostgreSQL store never asks:
    across hosts and containers a pid proves nothing, so its leases end only by expiry.
    """
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BootClock(Protocol):
    """Seconds on a clock that cannot step, shared by all processes of the boot it names."""

    boot_id: str

    def now(self) -> float: ...


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id from the kernel, or UNKNOWN_BOOT when it cannot be read."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return UNKNOWN_BOOT
    return text or UNKNOWN_BOOT


def _boot_seconds() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _pick_boot_seconds() -> tuple[str, float]:
    """CLOCK_BOOTTIME where the kernel has it (it goes on counting through a suspend)."""
    try:
        return "boottime", _boot_seconds()
    except (AttributeError, OSError):
        return "monotonic", time.monotonic()  # CLOCK_MONOTONIC: also one per boot on Linux


class SystemBootClock:
    """Linux's CLOCK_BOOTTIME (else CLOCK_MONOTONIC), named by /proc's boot id."""

    def __init__(self) -> None:
        self.boot_id = read_boot_id()
        self.kind = _pick_boot_seconds()[0]

    def now(self) -> float:
        return _boot_seconds() if self.kind == "boottime" else time.monotonic()


@dataclass(frozen=True)
class BootStamp:
    """Where a SQLite lease was taken and ends on its boot's clock (None: an older release's)."""

    boot_id: str | None
    acquired: float | None
    expires: float | None


def boot_lease_live(
    holder: str,
    wall_expires: float,
    stamp: BootStamp,
    boot_id: str,
    boot_now: float,
    wall_now: float,
) -> bool:
    """Say whether a SQLite lease binds: taken this boot, unexpired on its clock, holder alive.

    A lease of another boot is void whatever its times say: its holder cannot be running.
    A row without a stamp was written by a release from before boot clocks (a process not yet
    upgraded, sharing the file): its wall-clock expiry is all it has.
    """
    if stamp.boot_id is None or stamp.acquired is None or stamp.expires is None:
        return wall_expires > wall_now and is_alive(holder)
    if UNKNOWN_BOOT not in (stamp.boot_id, boot_id):
        if stamp.boot_id != boot_id:
            return False
    elif stamp.acquired > boot_now:
        return False  # the boot clock counts from 0 again: it restarted since
    return stamp.expires > boot_now and is_alive(holder)


def holder_id() -> str:
    """Name this process as a lease holder: host, pid and a random part."""
    return f"{_HOST}:{os.getpid()}:{os.urandom(4).hex()}"


def lost_answer_note(taken_over: Lease | None, generation: int) -> str:
    """Explain a refused refresh when the lease we took over was for this same generation.

    Its holder stopped mid-refresh, after taking the lease: if amoCRM had already answered it,
    the refresh token we just sent was spent by that answer, which nobody stored. Whether the
    holder died is said only when known (a local pid that is gone); a lease may also lapse
    under a live holder, or one whose death cannot be seen from here (another host).
    """
    if taken_over is None or taken_over.generation != generation:
        return ""
    why = "the process died" if not is_alive(taken_over.holder) else "its lease lapsed first"
    return (
        f"; a refresh of generation {generation} by {taken_over.holder} did not finish ({why}), "
        "so amoCRM's answer to it was probably lost"
    )
