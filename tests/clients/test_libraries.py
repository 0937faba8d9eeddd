"""Six real amoCRM client libraries, pinned, against a real `amo-broker serve`.

Each library is installed into a cache (tests/clients/installs.py) and driven by a small
script in tests/clients/drivers/ the way its users drive it, pointed at the broker with its
documented option or the smallest patch (docs/clients.md says which). Every scenario is
asserted for the behaviour the broker owes it once the features being built in parallel
have landed; those that still wait for one are in NEEDS, marked strict xfail, so each mark
turns into a failure the day its feature lands and must then be removed.
Run with `pytest -m clients tests/clients`; the default run leaves them out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.clients.drivers._harness import SCENARIOS
from tests.clients.installs import BY_NAME, LIBRARIES, InstallFailed, ensure
from tests.clients.stack import AMOCRM_RPS, Run, run_library
from tests.conftest import most_in_one_second

pytestmark = [pytest.mark.clients, pytest.mark.timeout(300)]

FEATURES = {
    "links": "HAL link rewriting: _links hrefs point back through the broker (also /a/NAME/)",
    "shim": "the token-endpoint shim: POST /oauth2/access_token answers a placeholder pair",
    "problem_json": "the broker's own errors as application/problem+json",
}
# (library, scenario) -> the broker feature it waits for. Remove an entry once it lands.
# Empty since links, the shim and problem documents landed (issue 15): the nine scenarios
# that waited for them (aioamocrm's next links, its and amocrm-js's unknown account, five
# libraries' own refresh) pass.
NEEDS: dict[tuple[str, str], str] = {}
# (library, scenario) -> why the library cannot do it at all; its driver must say so.
UNSUPPORTED: dict[tuple[str, str], str] = {
    **{
        (library, scenario): "pages by number only; nothing follows _links.next.href"
        for library in ("amocrm-api-wrapper", "amocrm-api", "amocrm-sdk", "shevernitskiy-amo")
        for scenario in ("next_href", "next_href_account")
    },
    ("amocrm-sdk", "account"): "no account resource",
    ("amocrm-api", "token_refresh"): "its token URL is hard-coded to {subdomain}.amocrm.ru",
}


def _cases(supported: bool) -> list[object]:
    """(library, scenario) params, the supported or the unsupported ones, with NEEDS' marks."""
    cases: list[object] = []
    for library in LIBRARIES:
        for scenario in SCENARIOS:
            key = (library.name, scenario)
            if (key in UNSUPPORTED) == supported:
                continue
            need = NEEDS.get(key)
            marks = [pytest.mark.xfail(strict=True, reason=f"needs {need}")] if need else []
            cases.append(
                pytest.param(library.name, scenario, id=f"{library.name}-{scenario}", marks=marks)
            )
    return cases


RunOf = Callable[[str], Run]


@pytest.fixture(scope="session")
def run_of(tmp_path_factory: pytest.TempPathFactory) -> RunOf:
    """Install and drive each library once per session; every scenario test reads that run."""
    runs: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in runs:
            library = BY_NAME[name]
            try:
                ensure(library)
            except InstallFailed as exc:
                pytest.fail(f"cannot install {name}: {exc}")
            workdir = tmp_path_factory.mktemp(name)
            # Its own event loop: the stack's processes live exactly as long as this call.
            runs[name] = asyncio.run(run_library(library, workdir))
        return runs[name]

    return get


def test_the_tables_name_only_known_libraries_scenarios_and_features() -> None:
    """NEEDS and UNSUPPORTED name real libraries and scenarios, and never the same pair."""
    pairs = {(library.name, scenario) for library in LIBRARIES for scenario in SCENARIOS}
    assert set(NEEDS) <= pairs
    assert set(UNSUPPORTED) <= pairs
    assert not set(NEEDS) & set(UNSUPPORTED)
    assert set(NEEDS.values()) <= set(FEATURES)


@pytest.mark.parametrize(("library", "scenario"), _cases(supported=True))
def test_the_library_gets_what_amocrm_would_give_it(
    run_of: RunOf, library: str, scenario: str
) -> None:
    """The library, pointed at the broker, does the scenario as it would against amoCRM."""
    run = run_of(library)
    assert scenario in run.outcomes, f"the driver never reported it; {run.failure_context()}"
    outcome = run.outcomes[scenario]
    assert outcome["ok"] is True, outcome["detail"]


@pytest.mark.parametrize(("library", "scenario"), _cases(supported=False))
def test_unsupported_scenarios_are_reported_as_such(
    run_of: RunOf, library: str, scenario: str
) -> None:
    """What a library cannot do at all, its driver reports as unsupported, not as a failure."""
    outcome = run_of(library).outcomes[scenario]
    assert outcome["ok"] is False
    assert str(outcome["detail"]).startswith("unsupported: "), outcome["detail"]


@pytest.mark.parametrize("library", [library.name for library in LIBRARIES])
def test_the_broker_did_the_work_and_kept_the_dummy_tokens_out(run_of: RunOf, library: str) -> None:
    """Two refreshes, the 429 and the block reached amoCRM, at its pace; no dummy token did.

    The old broker, at the rotation's second drop, sent its token probe past the pace. Where
    amoCRM answered it 429, the broker took that for "the token works" and resent the dead
    token: the library got a 401 (three of the six did). Where the probe got through, the
    call behind it was amoCRM's 8th in that second and met a 429. Every run had one more.
    """
    run = run_of(library)
    assert run.exit_code == 0, run.failure_context()
    assert sorted(run.outcomes) == sorted(SCENARIOS), run.failure_context()
    assert run.duplicates == []
    stats = run.stats
    # The only 401s amoCRM gave were for the broker's dropped token, in `rotation`: the first
    # call after each drop, and the probe after the second (within the cool-down). A dummy
    # token that got through would add one.
    assert (stats["unauthorized_api_calls"], stats["refresh_calls"]) == (3, 2)
    assert stats["throttled_api_calls"] == 1  # the scripted one: nothing went past the pace
    assert most_in_one_second(stats["arrivals"]) <= AMOCRM_RPS
    assert stats["blocked_api_calls"] == 1
    assert stats["api_script"] == []
