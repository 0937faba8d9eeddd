"""Seeded simulation of the refresh protocol: thousands of runs, invariants after every step.

How the expectations work: `DEFECTS` names each defect of issue 13 the simulator finds, with
the invariants it breaks (tests/sim/invariants.py) and the seeds that show it; `KNOWN_DEFECTS`
lists those today's token manager still has. While a defect is listed there:
- its regression test below (a fixed range of seeds of a profile aimed at it) is expected to
  fail: `xfail(strict=True)`, so the day the fix lands the test passes, pytest reports XPASS
  as a failure, and whoever landed the fix removes its name from KNOWN_DEFECTS;
- the seed sweep tolerates violations of its invariants; any other violation fails the sweep.
With `KNOWN_DEFECTS` empty, every seed of the sweep must keep every invariant.

Run more seeds, or replay one (the failure message says which):
    SIM_SEEDS=20000 .venv/bin/pytest -m sim tests/sim
    SIM_SEED=1234 SIM_PROFILE=mixed .venv/bin/pytest -m sim tests/sim -k replay -s
`SIM_LEASE_CLOCK=caller|store` overrides the lease clock read off the real SQLite backend.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from broker.logs import configure_logging
from tests.sim.driver import PROFILES, run_seed
from tests.sim.world import RunResult, format_event

pytestmark = pytest.mark.sim

# defect -> (the invariants it breaks, the profile and the seeds its regression test runs)
DEFECTS: dict[str, tuple[frozenset[str], str, range]] = {
    # 1: tick's retried write of an unsaved pair lands over the pair a 401 refresh made of it.
    "1 spent pair written over the live one after store_degraded": (
        frozenset({"I2", "I3", "I5"}),
        "degraded",
        range(0, 200),
    ),
    # 2: every 401 that a new token does not cure rotates the pair again.
    "2 every incurable 401 rotates": (frozenset({"I4"}), "incurable", range(0, 10)),
    # 4: in refresh back-off a process neither reads nor adopts the store's newer pair.
    "4 back-off is blind to a newer generation": (frozenset({"I6"}), "backoff", range(0, 20)),
    # 5: a wall-clock step past the lease's expiry lets a second process spend the token.
    "5 lease expiry on the wall clock": (frozenset({"I1"}), "clock", range(0, 10)),
    # Found by the simulator: a process that holds a granted pair unsaved releases the lease,
    # and another process then spends the stored token, which that pair already spent.
    "degraded pair leaves the lease to others": (
        frozenset({"I1", "I5"}),
        "degraded_shared",
        range(0, 100),  # on the old code: seeds 21, 50, 52, 78, 81, 98
    ),
    # Found by the simulator: when writing reauth_required fails, the next refresh re-reads
    # no state from the store, forgets the refusal and sends the refused token again.
    "a refusal whose state write failed is forgotten": (
        frozenset({"I1"}),
        "degraded_shared",
        range(220, 230),  # on the old code: seed 224
    ),
}
# Limits of the design, shown by the simulator and documented (docs/reliability.md): never
# tolerated by the sweep, whose profile stays inside them; each has a strict-xfail test.
LIMITS: dict[str, tuple[frozenset[str], str, range]] = {
    # A store that refuses writes for longer than the refresh lease: the degraded process
    # cannot renew it, and when the store is back another process may take the lapsed lease
    # and send the stored refresh token, which the degraded process already spent. amoCRM
    # refuses it; the degraded process's write then lands and lifts the refusal.
    # Rare since a degraded process retries its write every second: seed 1251 of 1500.
    "store outage longer than the lease": (frozenset({"I1"}), "long_outage", range(1200, 1300)),
}
# The defects today's code still has: delete a name here when its fix lands.
KNOWN_DEFECTS: frozenset[str] = frozenset()

SWEEP_PROFILE = "mixed"
CHUNK = 250  # seeds per sweep test: each stays far inside the 60 s per-test timeout


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Log nothing below critical: thousands of runs would fill the captured output."""
    configure_logging("json", "critical")


def describe(result: RunResult) -> str:
    """Say which seed broke what, show the last events (fingerprints only) and how to replay."""
    assert result.violation is not None
    return (
        f"seed {result.seed} (profile {result.profile}) broke {result.violation}\n"
        f"last events:\n{result.tail(30)}\n"
        f"replay: SIM_SEED={result.seed} SIM_PROFILE={result.profile} "
        ".venv/bin/pytest -m sim tests/sim -k replay -s"
    )


def _tolerated() -> frozenset[str]:
    return frozenset().union(*(DEFECTS[name][0] for name in KNOWN_DEFECTS))


def _sweep_chunks() -> list[range]:
    total = int(os.environ.get("SIM_SEEDS", "2000"))
    return [range(start, min(start + CHUNK, total)) for start in range(0, total, CHUNK)]


@pytest.mark.parametrize("seeds", _sweep_chunks(), ids=lambda r: f"seeds{r.start}-{r.stop - 1}")
def test_seed_sweep_keeps_the_invariants(seeds: range) -> None:
    """Every seed keeps every invariant, except those of defects still listed as known."""
    tolerated = _tolerated()
    found: Counter[str] = Counter()
    for seed in seeds:
        result = run_seed(seed, SWEEP_PROFILE)
        if result.violation is None:
            continue
        found[result.violation.code] += 1
        assert result.violation.code in tolerated, describe(result)
    print(f"{len(seeds)} seeds, violations of known defects: {dict(found)}")


def _regression(defect: str) -> None:
    codes, profile, seeds = DEFECTS.get(defect) or LIMITS[defect]
    for seed in seeds:
        result = run_seed(seed, profile)
        if result.violation is not None and result.violation.code in codes:
            pytest.fail(describe(result))


def _known(defect: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(defect in KNOWN_DEFECTS, reason=f"defect {defect}", strict=True)


@_known("1 spent pair written over the live one after store_degraded")
def test_a_retried_unsaved_pair_never_lands_over_its_successor() -> None:
    """Defect 1: a degraded process's retried write never puts a spent pair over a newer one."""
    _regression("1 spent pair written over the live one after store_degraded")


@_known("2 every incurable 401 rotates")
def test_incurable_401s_do_not_rotate_the_pair_each() -> None:
    """Defect 2: 401s that a new token does not cure cost at most a few rotations a minute."""
    _regression("2 every incurable 401 rotates")


@_known("4 back-off is blind to a newer generation")
def test_a_process_in_back_off_adopts_a_newer_pair() -> None:
    """Defect 4: a process in refresh back-off serves the store's newer pair, not errors."""
    _regression("4 back-off is blind to a newer generation")


@_known("5 lease expiry on the wall clock")
def test_a_wall_clock_step_never_lets_two_processes_spend_one_token() -> None:
    """Defect 5: a clock step larger than the lease never lets a second process take it."""
    _regression("5 lease expiry on the wall clock")


@_known("degraded pair leaves the lease to others")
def test_no_process_spends_a_token_a_degraded_process_already_spent() -> None:
    """While one process holds a granted pair unsaved, no other spends the stored token."""
    _regression("degraded pair leaves the lease to others")


@_known("a refusal whose state write failed is forgotten")
def test_a_refused_token_is_not_sent_again_when_the_state_write_fails() -> None:
    """A refused refresh token is never sent again, even when reauth_required was not saved."""
    _regression("a refusal whose state write failed is forgotten")


@pytest.mark.xfail(reason="a limit of the design: see LIMITS", strict=True)
def test_a_store_outage_longer_than_the_lease_may_resend_a_spent_token() -> None:
    """The limit is real: past the lease, a long outage lets another process resend a token."""
    _regression("store outage longer than the lease")


def test_a_seed_replays_the_same_run() -> None:
    """Two runs of one seed produce the identical event trace and verdict."""
    for profile in ("mixed", "degraded_shared", "clock"):
        for seed in (1, 7, 42):
            first, second = run_seed(seed, profile), run_seed(seed, profile)
            assert first.trace == second.trace
            assert str(first.violation) == str(second.violation)
            assert len(first.trace) > 20


def test_the_simulation_reaches_what_it_claims() -> None:
    """The mixed profile rotates, degrades, restarts, refuses and steps clocks in its runs."""
    kinds: Counter[str] = Counter()
    for seed in range(30):
        kinds.update(event[1] for event in run_seed(seed, "mixed").trace)
    for kind in ("commit", "granted", "refused", "store_fault", "kill", "clock_step", "import"):
        assert kinds[kind] > 0, kind


@pytest.mark.skipif("SIM_SEED" not in os.environ, reason="set SIM_SEED to replay one seed")
def test_replay() -> None:
    """Replay SIM_SEED (SIM_PROFILE, default mixed): print its trace, keep the invariants."""
    profile = os.environ.get("SIM_PROFILE", SWEEP_PROFILE)
    assert profile in PROFILES, f"SIM_PROFILE must be one of {sorted(PROFILES)}"
    result = run_seed(int(os.environ["SIM_SEED"]), profile)
    print("\n".join(format_event(event) for event in result.trace))
    if result.violation is not None:
        pytest.fail(describe(result))
