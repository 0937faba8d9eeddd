"""Shared fixtures: the sandbox amoCRM on a real loopback port, a real store in tmp_path, and a
broker application wired exactly as `serve` wires it."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.config.load import load_config
from broker.config.model import Config
from broker.lifecycle import make_runner
from broker.logs import configure_logging
from broker.pair import TokenPair, fingerprint
from broker.sandbox.server import Sandbox, start_sandbox
from broker.service import build_app, open_runtime
from broker.store.sealing import Sealer, new_key
from broker.store.sqlite.backend import TokenStore
from broker.tokens.endpoint import parse_token_answer
from broker.tokens.manager import TokenManager

# Fixtures shared across modules: real `amo-broker` processes and the in-process CLI.
pytest_plugins = ["tests.fixtures_processes", "tests.fixtures_cli", "tests.fixtures_pg"]
# Their helper modules hold asserts moved out of test modules: keep pytest's assertion
# rewriting on them (registered before the plugins above import them).
pytest.register_assert_rewrite("tests.procs", "tests.cli_harness")

ConfigFactory = Callable[..., Config]


@pytest.fixture(autouse=True)
def _redacted_logs() -> None:
    """Log through the production pipeline (with redaction) to this test's captured stderr."""
    configure_logging("console", "info")


@pytest.fixture
def sandbox() -> Sandbox:
    return Sandbox()


@pytest.fixture
async def sandbox_url(sandbox: Sandbox) -> AsyncIterator[str]:
    runner, url = await start_sandbox(sandbox)
    yield url
    await runner.cleanup()


@pytest.fixture
def key() -> str:
    return new_key()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "broker.db"


@pytest.fixture
def broker_env(sandbox: Sandbox, sandbox_url: str, db_path: Path, key: str) -> dict[str, str]:
    """The environment a `serve` process of these tests runs with (no tokens in it)."""
    return {
        "AMOCRM_BASE_URL": sandbox_url,
        "AMOCRM_CLIENT_ID": sandbox.client_id,
        "AMOCRM_CLIENT_SECRET": sandbox.client_secret,
        "AMOCRM_REDIRECT_URI": sandbox.redirect_uri,
        "BROKER_DB": str(db_path),
        "BROKER_ENCRYPTION_KEY": key,
        # Tests that are not about pacing fire hundreds of calls at once: pace them out of
        # the way. The pacing tests set amoCRM's real 7 per second themselves.
        "BROKER_RPS": "100000",
        "BROKER_BURST": "100000",
        "BROKER_MAX_QUEUE": "100000",  # every waiter counts, for a connection too
    }


@pytest.fixture
def make_config(broker_env: dict[str, str]) -> ConfigFactory:
    """Build a Config from the test environment plus overrides (env names)."""

    def make(**env: str) -> Config:
        return load_config(None, environ={**broker_env, **env})

    return make


def unavailable(reason: str) -> NoReturn:
    """Skip a test that needs what this machine lacks, but fail it under CI (.ci/run has it)."""
    if os.environ.get("CI"):
        pytest.fail(f"required under CI (.ci/run provides it): {reason}")
    pytest.skip(reason)


def pair_from_sandbox(sandbox: Sandbox) -> TokenPair:
    """A fresh pair the sandbox issued, as the token endpoint would answer it."""
    answer = json.dumps(sandbox.issue_pair()).encode()
    return parse_token_answer(200, answer, now=time.time(), previous_refresh=None)


async def seed_store(config: Config, sandbox: Sandbox, pair: TokenPair | None = None) -> TokenPair:
    """Store `pair` (else a live sandbox pair) as generation 1 of the configured store."""
    pair = pair or pair_from_sandbox(sandbox)
    store = await TokenStore.open(
        config.db_path, Sealer(config.require_key()), account=config.account
    )
    try:
        await store.store_pair(pair, reason="import", outcome="imported")
    finally:
        await store.close()
    return pair


class ServeLikeServer(TestServer):
    """aiohttp's test server on the runner `serve` uses, not on one with the test's defaults."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        assert isinstance(self.app, web.Application)
        return make_runner(self.app)


@dataclass
class Broker:
    """A running broker app in this test's loop, with handles on its parts."""

    client: TestClient
    manager: TokenManager
    store: TokenStore
    sandbox: Sandbox
    config: Config


@pytest.fixture
async def broker(
    make_config: ConfigFactory, sandbox: Sandbox, aiohttp_client: Callable[..., object]
) -> AsyncIterator[Broker]:
    """A broker holding a live pair, without its proactive loop (tests drive time)."""
    async with serving_broker(make_config(), sandbox, aiohttp_client) as broker:
        yield broker


@asynccontextmanager
async def serving_broker(
    config: Config,
    sandbox: Sandbox,
    aiohttp_client: Callable[..., object],
    *,
    proactive: bool = False,
) -> AsyncIterator[Broker]:
    """Serve `config` as the `broker` fixture does, with a live pair seeded from `sandbox`
    (and, with `proactive`, the refresh scheduler running as under `serve`)."""
    await seed_store(config, sandbox)
    async with open_runtime(config) as runtime:
        app = build_app(runtime, config, proactive=proactive)
        client = await aiohttp_client(ServeLikeServer(app))  # type: ignore[operator]
        yield Broker(client, runtime.manager, runtime.store, sandbox, config)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The broker's JSON log lines, written to a string for the test to read."""
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    yield stream
    configure_logging("console", "info")


def log_events(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    """The logged events named `event`, parsed."""
    lines = (json.loads(line) for line in stream.getvalue().splitlines())
    return [e for e in lines if e.get("event") == event]


def most_in_one_second(times: list[float]) -> int:
    """The largest number of `times` within any window of one second, closed at both ends."""
    ordered = sorted(times)
    return max(
        (sum(1 for t in ordered if start <= t <= start + 1.0) for start in ordered), default=0
    )


def leaked(text: str | bytes, *secrets: str | None) -> list[str]:
    """Fingerprints of the secrets found in `text` (see assert_no_leak)."""
    haystack = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return [fingerprint(s) for s in secrets if s and s in haystack]


def assert_no_leak(text: str | bytes, *secrets: str | None) -> None:
    """Fail, naming fingerprints only, if any secret occurs in `text`.

    Call it as a statement, not inside `assert`: pytest prints the arguments of a failing
    assert expression, which would put the very token it guards into the test's output. This
    frame is hidden from tracebacks for the same reason.
    """
    __tracebackhide__ = True
    found = leaked(text, *secrets)
    if found:
        raise AssertionError(f"secrets leaked into the text (fingerprints): {found}")


def token_forms(*tokens: str | None) -> list[str]:
    """Each token as text, as hex of its bytes and as (urlsafe) base64."""
    forms: list[str] = []
    for token in tokens:
        if token:
            data = token.encode()
            forms += [
                token,
                data.hex(),
                base64.b64encode(data).decode(),
                base64.urlsafe_b64encode(data).decode(),
            ]
    return forms
