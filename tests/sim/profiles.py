"""The profiles: which actions a seed draws, with what weights, and how the weather tends to be.

`mixed` draws everything; the others aim at one defect each (named in tests/sim/test_simulation.py)
or at a limit of the design (`long_outage`).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIONS = {
    "request": 6.0,
    "requests": 3.0,  # several at once, over all processes
    "incurable": 1.5,  # a burst of calls amoCRM answers 401 whatever the token
    "expire_access": 2.0,  # amoCRM stops accepting the access tokens it issued
    "manual": 0.7,  # `amo-broker refresh`
    "import": 0.7,  # a person re-authorises: `amo-broker import` of a new consent
    "import_stale": 0.1,  # a person runs an old import again (its refresh token spent)
    "crash": 1.0,
    "shutdown": 0.5,  # SIGTERM (a deploy), then a new incarnation
    "sighup": 0.7,  # an account joins or leaves a process's configuration
    "clock_step": 0.7,
    "store_weather": 1.5,
    "endpoint_weather": 1.5,
    "api_weather": 0.7,  # how amoCRM answers the broker's probes: 429s, 5xx, timeouts
    "revoke_long_lived": 0.2,
    "new_long_lived": 0.2,
    "cancel": 1.0,  # a caller goes away mid-request
    "idle": 2.0,
}
CALM = {"calm": 1.0}
API_WEATHER = (("calm", 3.0), ("throttled", 1.0), ("flaky", 1.0))
# Store weather for the degraded profiles: failing writes, with little else going on.
DEGRADED_ACTIONS = {
    **ACTIONS,
    "store_weather": 4.0,
    "crash": 0.2,
    "clock_step": 0.0,
    "incurable": 0.0,
    "import_stale": 0.0,
}


@dataclass(frozen=True)
class Profile:
    """Which actions a run draws, with what weights, and how the weather tends to be."""

    name: str
    actions: dict[str, float]
    store_modes: dict[str, float]
    endpoint_modes: dict[str, float]
    steps: int = 16
    procs: tuple[int, ...] = (2, 2, 3)  # drawn from: how many serve processes share the store
    accounts: int = 3  # the first is every process's default; the last may be long-lived
    long_lived: float = 0.3  # the share of runs whose last account holds a long-lived token
    incurable_share: float = 0.2  # of the calls in a `requests` step
    api_modes: tuple[tuple[str, float], ...] = (("calm", 1.0),)
    # A store that fails writes (failing, flaky) recovers after this long: the guarantees hold
    # for outages shorter than the refresh lease (70 s here), which a degraded process cannot
    # renew while the store refuses it. None: unbounded, the `long_outage` profile's limit.
    max_outage: float | None = 60.0
    # The scheduler's poll of the store for other processes' writes: serve's is 5 s; a longer
    # one costs fewer wake-ups an hour (each refresh re-reads the store under its lease).
    poll: float = 60.0


PROFILES = {
    "mixed": Profile(
        "mixed",
        ACTIONS,
        {"calm": 3, "contended": 2, "failing": 1, "flaky": 1},
        {"calm": 3, "slow": 1, "down": 1, "outage": 0.5, "lossy": 0.3},
        api_modes=API_WEATHER,
    ),
    # Defect 1: a degraded store, a retried unsaved pair and 401s or expiry meeting it.
    "degraded": Profile(
        "degraded",
        DEGRADED_ACTIONS,
        {"calm": 1, "contended": 2, "failing": 2, "flaky": 1},
        {"calm": 3, "slow": 1},
        procs=(1,),  # one process: other processes' double spends would hide this one
        incurable_share=0.0,
    ),
    # The same weather over several processes: one of them degraded, the others going on.
    "degraded_shared": Profile(
        "degraded_shared",
        DEGRADED_ACTIONS,
        {"calm": 1, "contended": 2, "failing": 2, "flaky": 1},
        {"calm": 3, "slow": 1},
        incurable_share=0.0,
    ),
    # A limit, not a defect: store outages longer than the refresh lease (see max_outage).
    "long_outage": Profile(
        "long_outage",
        {
            **ACTIONS,
            "store_weather": 1.0,
            "crash": 0.0,
            "clock_step": 0.0,
            "incurable": 0.0,
            "import_stale": 0.0,
        },
        {"calm": 1, "failing": 2, "read_only": 2},
        {"calm": 3, "slow": 1},
        incurable_share=0.0,
        max_outage=300.0,  # four leases and more: the limit shows, and the run still ends
    ),
    # Defect 2: calls amoCRM answers 401 whatever the token; R8: the probes amoCRM throttles.
    "incurable": Profile(
        "incurable",
        {"request": 2.0, "incurable": 4.0, "expire_access": 2.0, "api_weather": 1.5, "idle": 1.0},
        CALM,
        CALM,
        steps=10,
        api_modes=(("calm", 1.0), ("throttled", 2.0), ("flaky", 1.0)),
    ),
    # Defect 4: token endpoint trouble while a newer pair lands in the store.
    "backoff": Profile(
        "backoff",
        {
            "request": 4.0,
            "requests": 2.0,
            "expire_access": 2.0,
            "import": 1.5,
            "endpoint_weather": 0.5,
            "idle": 1.0,
        },
        CALM,
        {"outage": 3, "down": 1, "calm": 1},
        procs=(2,),
        accounts=2,  # a defect of one account's back-off: a second shows it is per account
        incurable_share=0.0,
    ),
    # Defect 5: wall-clock steps while a refresh is under way.
    "clock": Profile(
        "clock",
        {"requests": 4.0, "expire_access": 2.0, "clock_step": 2.0, "endpoint_weather": 1.0},
        CALM,
        {"slow": 3, "calm": 1},
        procs=(2,),
        accounts=2,
        incurable_share=0.0,
    ),
}
