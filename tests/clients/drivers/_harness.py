"""What the Python drivers share: run scenarios, print one JSON line each, reach the sandbox.

A driver runs under a scratch venv's Python with one client library installed, so this
module uses the standard library only. Each scenario is a function that returns a short
detail when it worked as the library's user would expect and raises when not;
`Unsupported` says the library has no way to do it at all.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

# amoCRM's first page of three seeded leads, two a page: the walk needs page 2.
# Every driver runs these, in this order (tests/clients/test_libraries.py reads them here).
SCENARIOS = (
    "account",  # GET /api/v4/account (with= extras where the library asks for them)
    "pages",  # two pages of leads by page number
    "next_href",  # page 1, then its _links.next.href
    "next_href_account",  # the same under /a/default/
    "get_lead",
    "create_lead",
    "update_lead",
    "rotation",  # amoCRM drops the broker's token twice, calls at full pace: nothing shows
    "throttled",  # amoCRM answers one 429: the broker waits and retries, nothing shows
    "blocked",  # amoCRM's HTML 403 for a blocked account reaches the library as an error
    "unknown_account",  # /a/nope/: the broker's 404, its message readable by the user
    "token_refresh",  # the library refreshes its own (dummy) token through the broker
)
LIMIT = 2
SEEDED_LEADS = 3
# The rotation scenario: this many steps back to back, as fast as the broker's pace lets
# them go (7 a second), amoCRM dropping the broker's access token before these steps. The
# second drop falls within the broker's 5-minute cool-down after the first: it probes.
ROTATION_STEPS = 24
ROTATION_DROPS = (8, 20)
UNKNOWN = "nope"
# The broker's message for an unknown account; every error shown to the user should carry it.
UNKNOWN_MESSAGE = "no account named"
# A JWT (not signed: nobody checks) that expires in 2100, for libraries that read `exp`.
FAR_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjQxMDI0NDQ4MDB9.ZHVtbXk"
# The same with `exp` in 2001: the library believes it has expired and refreshes.
EXPIRED_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjEwMDAwMDAwMDB9.ZHVtbXk"
DUMMY = "dummy-not-a-token"
CLIENT = {
    "client_id": "dummy-client-id",
    "client_secret": "dummy-client-secret",
    "redirect_uri": "https://example.com/callback",
}


class Unsupported(Exception):
    """The library cannot do this scenario at all; the message says why."""


def urls() -> tuple[str, str]:
    """The broker's and the sandbox's base URLs, from argv."""
    _, broker, sandbox = sys.argv
    return broker.rstrip("/"), sandbox.rstrip("/")


def admin(sandbox: str, action: str, body: Any = None) -> dict[str, Any]:
    """Turn one of the sandbox's knobs (POST /_sandbox/{action}); return its counters."""
    data = json.dumps(body if body is not None else {}).encode()
    method = "GET" if action == "stats" else "POST"
    url = f"{sandbox}/_sandbox/{action}"  # always http://127.0.0.1:...
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def check(condition: bool, message: str) -> None:
    """Fail the scenario with `message` unless `condition` holds."""
    if not condition:
        raise AssertionError(message)


def failure(result: Any) -> AssertionError:
    """The error to raise when a call that must fail returned `result` instead."""
    return AssertionError(f"no error raised; it returned {str(result)[:200]}")


def same_leads(leads: list[int]) -> str:
    """Check a walk saw every seeded lead once; return the detail."""
    check(len(leads) == len(set(leads)), f"a lead came twice: {leads}")
    check(len(leads) >= SEEDED_LEADS, f"only {len(leads)} leads: {leads}")
    return f"{len(leads)} leads over 2 pages"


def rotations(sandbox: str, *steps: Callable[[], Any]) -> str:
    """Run `steps` in turn ROTATION_STEPS times, amoCRM dropping the token at ROTATION_DROPS."""
    for number in range(ROTATION_STEPS):
        if number in ROTATION_DROPS:
            admin(sandbox, "expire")
        steps[number % len(steps)]()
    return _rotated()


async def arotations(sandbox: str, *steps: Callable[[], Any]) -> str:
    """`rotations` for a library whose calls are coroutines."""
    for number in range(ROTATION_STEPS):
        if number in ROTATION_DROPS:
            admin(sandbox, "expire")
        await steps[number % len(steps)]()
    return _rotated()


def _rotated() -> str:
    return f"{ROTATION_STEPS} steps at full pace, the token dropped {len(ROTATION_DROPS)} times"


def _report(name: str, ok: bool, detail: Any) -> None:
    line = {"scenario": name, "ok": ok, "detail": detail}
    print(json.dumps(line, ensure_ascii=False, default=str), flush=True)


def _failed(exc: Exception) -> str:
    if isinstance(exc, Unsupported):
        return f"unsupported: {exc}"
    return f"{type(exc).__name__}: {exc}"[:600]


def run(defined: Mapping[str, Any]) -> int:
    """Run every scenario, in SCENARIOS' order, from the driver's functions of those names.

    One failing does not stop the others; a driver that names no function for a scenario
    fails loudly (what a library cannot do, its function says by raising Unsupported).
    """
    for name, scenario in _in_order(defined):
        try:
            _report(name, True, scenario())
        except Exception as exc:  # every failure is the scenario's result
            _report(name, False, _failed(exc))
    return 0


async def arun(defined: Mapping[str, Any]) -> int:
    """`run` for a library whose calls are coroutines, all in one event loop."""
    for name, scenario in _in_order(defined):
        try:
            _report(name, True, await scenario())
        except Exception as exc:  # every failure is the scenario's result
            _report(name, False, _failed(exc))
    return 0


def _in_order(defined: Mapping[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
    missing = [name for name in SCENARIOS if not callable(defined.get(name))]
    if missing:
        raise SystemExit(f"driver defines no scenario {', '.join(missing)}")
    return [(name, defined[name]) for name in SCENARIOS]
