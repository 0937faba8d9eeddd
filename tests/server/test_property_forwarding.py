"""A Hypothesis property against a running broker: whatever the target and headers, amoCRM
gets nothing outside /api/v4, the path exactly as sent, and one Authorization: ours.

Hypothesis drives a synchronous test, so the sandbox and the broker run on real loopback
ports in a background thread with its own event loop, and each example goes out through a
blocking socket as exact bytes. The sandbox's record is read from the test thread only after
the broker's whole response has arrived (the sandbox records a request before answering it).
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, unquote_plus, urlsplit

import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.config.load import load_config
from broker.pair import fingerprint
from broker.sandbox.server import Sandbox, start_sandbox
from broker.service import build_app, open_runtime
from broker.store.sealing import new_key
from broker.tokens.manager import TokenManager
from tests.conftest import seed_store

START_BOUND = 10.0  # seconds for the background servers to come up or go down: a bound only
SOCKET_BOUND = 5.0


@dataclass
class Live:
    """The sandbox and a broker in front of it, served from a background thread."""

    sandbox: Sandbox
    manager: TokenManager
    port: int
    origin: str  # host:port of the configured amoCRM, as the upstream Host must read
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event

    @property
    def ours(self) -> str:
        pair = self.manager.pair
        assert pair is not None
        return fingerprint(f"Bearer {pair.access_token}")


async def _serve(db_dir: Path, started: threading.Event, holder: list[Live]) -> None:
    stop = asyncio.Event()
    sandbox = Sandbox()
    sandbox_runner, url = await start_sandbox(sandbox)
    try:
        config = load_config(
            None,
            environ={
                "AMOCRM_BASE_URL": url,
                "AMOCRM_CLIENT_ID": sandbox.client_id,
                "AMOCRM_CLIENT_SECRET": sandbox.client_secret,
                "AMOCRM_REDIRECT_URI": sandbox.redirect_uri,
                "BROKER_DB": str(db_dir / "broker.db"),
                "BROKER_ENCRYPTION_KEY": new_key(),
            },
        )
        await seed_store(config, sandbox)
        async with open_runtime(config) as runtime:
            runner = web.AppRunner(build_app(runtime, config, proactive=False), access_log=None)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                port = runner.addresses[0][1]
                origin = urlsplit(url).netloc
                loop = asyncio.get_running_loop()
                holder.append(Live(sandbox, runtime.manager, port, origin, loop, stop))
                started.set()
                await stop.wait()
            finally:
                await runner.cleanup()
    finally:
        await sandbox_runner.cleanup()
        started.set()  # a failed start must not leave the fixture waiting


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Run the sandbox and a seeded broker on loopback in a thread for the whole module."""
    started = threading.Event()
    holder: list[Live] = []
    db_dir = tmp_path_factory.mktemp("property-broker")
    # asyncio.run, not a bare loop: it cancels and awaits what is left (connections aiohttp
    # still drains) before closing, so no task is destroyed while pending.
    thread = threading.Thread(
        target=lambda: asyncio.run(_serve(db_dir, started, holder)),
        name="property-broker",
        daemon=True,
    )
    thread.start()
    try:
        assert started.wait(START_BOUND) and holder, "the background broker did not start"
        yield holder[0]
    finally:
        if holder:
            holder[0].loop.call_soon_threadsafe(holder[0].stop.set)
        thread.join(START_BOUND)


# -- what a caller may send -----------------------------------------------------------------

TARGET_PIECES = [
    "/api/v4",
    "/leads",
    "/contacts",
    "/..",
    "/.",
    "/%2e%2E",
    "/.%2e",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "//",
    "/",
    "?a=1",
    "&b=%2F",
    "&access_token=x",
    "?ACCESS%5Ftoken=y",
    "&+access_token=z",
    "#",
    ";",
    "%",
    "a",
    "Z",
    "0",
    "9",
    "%252e",
    "%00",
]
targets = st.builds(
    lambda head, rest: head + "".join(rest),
    st.sampled_from(["/api/v4", "/api/v4/", "/api/v4/leads", "/", ""]),
    st.lists(st.sampled_from(TARGET_PIECES), max_size=8),
)

NAMED = ["close", "keep-alive", "x-custom", "authorization", "cookie", "host", "x-broker-retry"]
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)
random_names = st.from_regex(r"X-R[a-z]{1,8}", fullmatch=True)
VALUES = {
    "connection": st.lists(st.sampled_from(NAMED), min_size=1, max_size=3).map(", ".join),
    "transfer-encoding": st.one_of(
        st.sampled_from(["chunked", "identity", "chunked, identity", "xchunked", "gzip, chunked"]),
        printable,
    ),
    "content-length": st.one_of(
        st.integers(0, 64).map(str),
        st.sampled_from(["-1", "abc", "2, 2", "99999999999", "0x2"]),
        # digits only would need that many body bytes: they come from the integers above
        printable.filter(lambda v: not v.strip().isdigit()),
    ),
}
NAMES = [
    "Authorization",
    "Cookie",
    "Proxy-Authorization",
    "X-Forwarded-For",
    "Forwarded",
    "Connection",
    "Host",
    "X-Custom",
    "X-Broker-Retry",
    "Transfer-Encoding",
    "Content-Length",
]


@st.composite
def header(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.one_of(st.sampled_from(NAMES), random_names))
    value = draw(VALUES.get(name.lower(), printable))
    return draw(st.sampled_from([name, name.lower(), name.upper()])), value


headers = st.lists(header(), max_size=6)


def _frame(method: str, target: str, fields: list[tuple[str, str]]) -> bytes:
    """Write the request, with a body that completes whatever framing the headers declare."""
    lines = [f"{method} {target} HTTP/1.1"]
    if not any(n.lower() == "host" for n, _ in fields):
        lines.append("Host: x")
    lines.extend(f"{n}: {v}" for n, v in fields)
    body = b""
    lengths = [v.strip() for n, v in fields if n.lower() == "content-length"]
    if any(n.lower() == "transfer-encoding" for n, _ in fields):
        body = b"0\r\n\r\n"  # ends a chunked body; any other TE is refused before the body
    elif len(lengths) == 1 and lengths[0].isdigit() and int(lengths[0]) <= 64:
        body = b"x" * int(lengths[0])
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def _exchange(port: int, data: bytes, method: str) -> int:
    """Send exact bytes on a fresh connection; return the status once the body is read."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_BOUND) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        response.read()
        return response.status


def _php_name(param: str) -> str:
    """The name PHP would register for a raw query parameter (lowercased)."""
    name = unquote_plus(param.partition("=")[0]).partition("\x00")[0].strip().lower()
    return name.partition("[")[0].replace(" ", "_").replace(".", "_")


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    rest = iter(whole)
    return all(item in rest for item in part)


# -- the property ----------------------------------------------------------------------------


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(method=st.sampled_from(["GET", "POST"]), target=targets, fields=headers)
def test_broker_forwards_only_under_api_v4_with_only_our_token(
    live: Live, method: str, target: str, fields: list[tuple[str, str]]
) -> None:
    """Any target and headers: a 4xx with nothing upstream, or one clean /api/v4 request."""
    before = len(live.sandbox.requests)
    status = _exchange(live.port, _frame(method, target, fields), method)
    new = live.sandbox.requests[before:]
    if not new:
        if status == 200:  # GET / is the broker's own status page (server/status_page.py)
            event("the status page")
            assert method in ("GET", "HEAD") and urlsplit(target).path == "/"
            return
        event(f"refused by the broker: {status}")
        assert 400 <= status < 500
        return
    event("forwarded")
    assert len(new) == 1
    [seen] = new
    assert seen.raw_path == "/api/v4" or seen.raw_path.startswith(("/api/v4/", "/api/v4?"))
    path, _, query = seen.raw_path.partition("?")
    assert path == target.partition("?")[0]
    # ... and stays there once amoCRM decodes it: no dot-segment, backslash or control byte.
    decoded = unquote(path, errors="replace")
    assert not any(ord(ch) < 0x20 for ch in decoded) and "\\" not in decoded
    assert not [s for s in decoded.split("/") if s.partition(";")[0] in (".", "..")]
    sent_query = target.partition("?")[2]
    params = query.split("&") if query else []
    assert _is_subsequence(params, sent_query.split("&"))
    assert [p for p in params if _php_name(p) == "access_token"] == []
    auths = [fingerprint(v) for n, v in seen.headers if n.lower() == "authorization"]
    assert auths == [live.ours]
    names = [n.lower() for n, _ in seen.headers]
    forbidden = {"cookie", "proxy-authorization", "forwarded", "transfer-encoding", "connection"}
    assert [n for n in names if n in forbidden or n.startswith(("x-forwarded-", "x-broker-"))] == []
    assert [v for n, v in seen.headers if n.lower() == "host"] == [live.origin]
    named = {
        token.strip().lower()
        for n, v in fields
        if n.lower() == "connection"
        for token in v.split(",")
    }
    # Host and Content-Length are the broker's own upstream, not the caller's, once named.
    assert named.isdisjoint(set(names) - {"host", "content-length", "authorization"})
