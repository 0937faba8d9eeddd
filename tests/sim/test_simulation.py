"""Seeded simulation of the refresh protocol: thousands of runs, invariants after every step.

How the expectations work: `DEFECTS` names each defect the simulator finds, with the invariant
it breaks (tests/sim/invariants.py), the profile and seeds that show it, and the words of the
violation that tell it from another breaking the same invariant; `KNOWN_DEFECTS` lists those
today's code still has. While a defect is listed there:
- its regression test below (its seeds, aimed at it) is expected to fail: `xfail(strict=True)`,
  so the day the fix lands the test passes, pytest reports XPASS as a failure, and whoever
  landed the fix removes its name from KNOWN_DEFECTS;
- the seed sweep tolerates violations of its invariant; any other violation fails the sweep.
With `KNOWN_DEFECTS` empty, every seed of the sweep must keep every invariant.

Run more seeds (the long sweep), or replay one (the failure message says which):
    SIM_SEEDS=20000 .venv/bin/pytest -m sim tests/sim
    SIM_SEED=1234 SIM_PROFILE=mixed .venv/bin/pytest -m sim tests/sim -k replay -s
`SIM_LEASE_CLOCK=caller|store` and `SIM_FENCE=legacy|fenced` override what the simulated store
reads off the real SQLite backend (its lease clock; whether `store_pair` drops the lease);
`SIM_POLL=5` runs the scheduler at serve's poll instead of the profile's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest

from broker.logs import configure_logging
from tests.sim.driver import PROFILES, run_seed
from tests.sim.world import RunResult, format_event

pytestmark = pytest.mark.sim


class Defect(NamedTuple):
    codes: frozenset[str]  # the invariants it breaks
    profile: str
    seeds: range
    words: str = ""  # in the violation's message: tells it from others breaking the same
    poll: float | None = None  # the scheduler's poll, if not the profile's


DEFECTS: dict[str, Defect] = {
    # Issue 13's, found by the single-account simulator (its seeds); these seeds hold now.
    # 1: tick's retried write of an unsaved pair lands over the pair a 401 refresh made of it.
    "1 spent pair written over the live one after store_degraded": Defect(
        frozenset({"I2", "I3", "I5"}), "degraded", range(0, 200)
    ),
    # 2: every 401 that a new token does not cure rotates the pair again.
    "2 every incurable 401 rotates": Defect(frozenset({"I4"}), "incurable", range(0, 10)),
    # 4: in refresh back-off a process neither reads nor adopts the store's newer pair.
    "4 back-off is blind to a newer generation": Defect(frozenset({"I6"}), "backoff", range(0, 20)),
    # 5: a wall-clock step past the lease's expiry lets a second process spend the token.
    "5 lease expiry on the wall clock": Defect(frozenset({"I1"}), "clock", range(0, 10)),
    # A process that holds a granted pair unsaved releases the lease, and another process
    # then spends the stored token, which that pair already spent.
    "degraded pair leaves the lease to others": Defect(
        frozenset({"I1", "I5"}), "degraded_shared", range(0, 100)
    ),
    # When writing reauth_required fails, the next refresh re-reads no state from the store,
    # forgets the refusal and sends the refused token again.
    "a refusal whose state write failed is forgotten": Defect(
        frozenset({"I1"}), "degraded_shared", range(220, 230)
    ),
    # Issue 22's, found by this simulator. The seeds: those that showed each defect on the
    # code before its fix, as this simulator was then (R1, R2, R5, R7, R8 and SIGTERM's, found
    # before those fixes were merged; tuning the profiles since moved what a seed runs), or,
    # for the later ones, on the old code with this simulator as it is now.
    # R7: a write of the holder drops the lease its own refresh in flight holds (store_pair
    # deleted any lease; release_lease took the holder's, whichever), another process takes
    # the free lease and sends the same refresh token. Seen in the single-account simulator
    # as seed 9172 of `mixed`; here seed 262, with serve's faster poll (another process reads
    # the pair sooner): on the old code with SIM_FENCE=legacy, not with SIM_FENCE=fenced.
    "R7 a refresh in flight loses its lease to its holder's other write": Defect(
        frozenset({"I1"}), "degraded_shared", range(255, 265), poll=10.0
    ),
    # The same, in a narrower window: the process adopted the import while the grant's write
    # waited its turn (behind another write of this process), and wrote over it all the same.
    "a refresh's answer lands over an import adopted while its write waited": Defect(
        frozenset({"I7"}), "mixed", range(6281, 6282)
    ),
    # A call in flight when its account left (SIGHUP) started a refresh after the account's
    # landing had ended: the store refused the granted pair, and nothing wrote it again.
    "a call in flight refreshes after its account left": Defect(
        frozenset({"I2"}), "degraded", range(440, 446)
    ),
    # R5: `import` of a refresh token the history records as spent (an old import file run
    # again) writes it over the live pair; the account dies at the next refresh.
    "R5 an import brings back a spent refresh token": Defect(
        frozenset({"I8"}), "mixed", range(55, 75), "spent"
    ),
    # R2: `amo-broker refresh` whose write the store refuses exits as if all went well, and
    # the only copy of the new pair goes with it.
    "R2 refresh ends holding the pair the store refused": Defect(
        frozenset({"I9"}), "degraded", range(0, 40), "ended its command"
    ),
    # R1: an account that leaves on SIGHUP while its pair is unsaved drops it.
    "R1 an account leaving on SIGHUP drops its unsaved pair": Defect(
        frozenset({"I9"}), "degraded", range(260, 280), "let the account leave"
    ),
    # SIGTERM while the store refuses the pair: serve exits 0 and the pair is gone.
    "serve stopping on SIGTERM drops its unsaved pair": Defect(
        frozenset({"I9"}), "degraded", range(100, 110), "stopped on SIGTERM"
    ),
    # R8: a probe answered 429 (or 5xx, or nothing) is read as "the token works": the call is
    # replayed with the refused token and amoCRM's 401 goes to the caller.
    "R8 a probe without a verdict is taken as the token working": Defect(
        frozenset({"I10"}), "incurable", range(30, 40), "no verdict"
    ),
    # A 401 for the pair a refresh in flight just granted (amoCRM revoked its access token
    # at once) joins that refresh, gets the same refused pair, and goes back to the caller.
    "a 401 for a just granted pair joins the refresh that granted it": Defect(
        frozenset({"I10"}), "degraded", range(2067, 2072), "no probe"
    ),
    # The first cure of the one above refreshed again at once whenever the joined refresh
    # ended at the refused pair: incurable 401s then rotated again and again. The 401 is
    # judged again instead, as one for a fresh pair (probed within the cool-down).
    "a 401 joining the refresh of its own pair rotates again blindly": Defect(
        frozenset({"I4"}), "mixed", range(6651, 6652)
    ),
    # A refresh whose answer comes after the process adopted a person's import (its tick read
    # it meanwhile) writes the older lineage over the import, by compare-and-swap on the
    # import's own generation.
    "a refresh's answer lands over an import adopted meanwhile": Defect(
        frozenset({"I7"}), "degraded", range(178, 183)
    ),
    # A process whose lease the store refused refreshes from its unsaved pair without the
    # lease; its tick then wrote that very pair while the refresh was in flight, another
    # process took the free lease and sent the same refresh token (the long sweep, after the
    # model's urgent turns: `mixed` 4229).
    "a tick writes the pair its lease-less refresh is spending": Defect(
        frozenset({"I1"}), "mixed", range(4229, 4230)
    ),
}
# Limits of the design, shown by the simulator and documented (docs/reliability.md): the sweep
# of their profile tolerates them; each has a strict-xfail test that shows it is real.
LIMITS: dict[str, Defect] = {
    # A store that refuses every write for longer than the refresh lease, while a process
    # holds a granted pair unsaved: it cannot renew the lease, and when the store is back
    # another process may take the lapsed lease first and send the stored refresh token,
    # which that pair already spent. amoCRM refuses it (docs/reliability.md, Known limits).
    "store outage longer than the lease": Defect(
        frozenset({"I1"}), "long_outage", range(3010, 3015)
    ),
}
# The defects today's code still has: delete a name here when its fix lands.
KNOWN_DEFECTS: frozenset[str] = frozenset()

CHUNK = 250  # seeds per sweep test: each stays far inside the 60 s per-test timeout
SWEEP = int(os.environ.get("SIM_SEEDS", "2000"))  # per profile


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


def tolerated(profile: str) -> frozenset[str]:
    """The invariants a sweep of `profile` lets break: known defects', its limits'."""
    known = [DEFECTS[name].codes for name in KNOWN_DEFECTS]
    limits = [limit.codes for limit in LIMITS.values() if limit.profile == profile]
    return frozenset().union(*known, *limits)


def _sweep() -> list[tuple[str, range]]:
    return [
        (profile, range(start, min(start + CHUNK, SWEEP)))
        for profile in PROFILES
        for start in range(0, SWEEP, CHUNK)
    ]


@pytest.mark.parametrize(
    ("profile", "seeds"), _sweep(), ids=lambda v: v if isinstance(v, str) else f"{v.start}"
)
def test_seed_sweep_keeps_the_invariants(profile: str, seeds: range) -> None:
    """Every seed of every profile keeps every invariant, but those of known defects."""
    allowed = tolerated(profile)
    found: Counter[str] = Counter()
    for seed in seeds:
        result = run_seed(seed, profile)
        if result.violation is None:
            continue
        found[result.violation.code] += 1
        assert result.violation.code in allowed, describe(result)
    print(f"{profile}: {len(seeds)} seeds, tolerated violations: {dict(found)}")


def _regression(defect: Defect) -> None:
    for seed in defect.seeds:
        result = run_seed(seed, defect.profile, poll=defect.poll)
        violation = result.violation
        if violation is not None and violation.code in defect.codes:
            if defect.words in violation.message:
                pytest.fail(describe(result))


def _known(name: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(name in KNOWN_DEFECTS, reason=f"defect {name}", strict=True)


@pytest.mark.parametrize("name", list(DEFECTS))
def test_a_fixed_defect_stays_fixed(name: str, request: pytest.FixtureRequest) -> None:
    """Each defect's seeds keep the invariants it broke (strict xfail while it is known)."""
    request.applymarker(_known(name))
    _regression(DEFECTS[name])


@pytest.mark.parametrize("name", list(LIMITS))
@pytest.mark.xfail(reason="a limit of the design: see LIMITS", strict=True)
def test_a_limit_of_the_design_is_real(name: str) -> None:
    """Each limit shows: its seeds break the invariant the design does not promise there."""
    _regression(LIMITS[name])


def test_a_seed_replays_the_same_run() -> None:
    """Two runs of one seed produce the identical event trace and verdict."""
    for profile in ("mixed", "degraded_shared", "clock"):
        for seed in (1, 7, 42):
            first, second = run_seed(seed, profile), run_seed(seed, profile)
            assert first.trace == second.trace
            assert str(first.violation) == str(second.violation)
            assert len(first.trace) > 20


def test_a_seed_replays_under_another_hash_seed() -> None:
    """A seed's trace does not depend on the interpreter's hash seed (CI's run replays here)."""
    script = (
        "import hashlib, sys\n"
        "from broker.logs import configure_logging\n"
        "configure_logging('json', 'critical')\n"
        "from tests.sim.driver import run_seed\n"
        "print(hashlib.sha256(repr(run_seed(3, 'mixed').trace).encode()).hexdigest())\n"
    )
    root = Path(__file__).resolve().parents[2]
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_the_simulation_reaches_what_it_claims() -> None:
    """The mixed profile reaches every action it draws and every fate it claims to simulate."""
    kinds: Counter[str] = Counter()
    for seed in range(60):
        kinds.update(event[1] for event in run_seed(seed, "mixed").trace)
    for kind in (
        "commit",
        "granted",
        "refused",
        "store_fault",
        "kill",
        "clock_step",
        "import",
        "sighup",
        "sigterm",
        "exit",
        "probe",
        "lost",
        "long_lived_revoked",
    ):
        assert kinds[kind] > 0, kind


@pytest.mark.skipif("SIM_SEED" not in os.environ, reason="set SIM_SEED to replay one seed")
def test_replay() -> None:
    """Replay SIM_SEED (SIM_PROFILE, default mixed): print its trace, keep the invariants."""
    profile = os.environ.get("SIM_PROFILE", "mixed")
    assert profile in PROFILES, f"SIM_PROFILE must be one of {sorted(PROFILES)}"
    result = run_seed(int(os.environ["SIM_SEED"]), profile)
    print("\n".join(format_event(event) for event in result.trace))
    if result.violation is not None:
        pytest.fail(describe(result))
