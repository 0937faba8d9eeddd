"""Tests for broker.logs: JSON lines with the right fields, and no secret in any of them."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiohttp import ClientResponseError, RequestInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

import broker.logs
from broker.logs import FLUSH_EVERY, LineOutput, Redactor, configure_logging, get_logger
from tests.conftest import assert_no_leak

BEARER_VALUE = "bearer-value-" + secrets.token_hex(8)
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIiwiZXhwIjoxfQ.c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
REFRESH = "def50200" + secrets.token_hex(48)
KEYED = "keyed-value-" + secrets.token_hex(8)


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def opaque() -> str:
    """A secret no pattern knows: only registration can catch it."""
    return "opaque-" + secrets.token_hex(12)


# -- the JSON pipeline ----------------------------------------------------------------------


def test_each_event_is_one_json_line_with_event_level_and_ts(stream: io.StringIO) -> None:
    """Every event is a JSON object on its own line with event, level and a UTC ISO ts."""
    configure_logging("json", "info", stream=stream)
    log = get_logger()
    log.info("first", generation=3)
    log.warning("second")
    first, second = json_lines(stream)
    assert (first["event"], first["level"], first["generation"]) == ("first", "info", 3)
    assert (second["event"], second["level"]) == ("second", "warning")
    assert first["ts"].endswith("Z")
    assert first["ts"][:4].isdigit()


def test_debug_is_filtered_at_info_and_shown_at_debug(stream: io.StringIO) -> None:
    """The level setting drops lower events; debug level lets them through."""
    configure_logging("json", "info", stream=stream)
    get_logger().debug("hidden")
    get_logger().info("shown")
    assert [line["event"] for line in json_lines(stream)] == ["shown"]

    verbose = io.StringIO()
    configure_logging("json", "debug", stream=verbose)
    get_logger().debug("now-shown")
    assert [line["event"] for line in json_lines(verbose)] == ["now-shown"]


def test_logger_obtained_before_configuration_uses_it(stream: io.StringIO) -> None:
    """get_logger() binds lazily: a module-level logger follows a later configure_logging."""
    log = get_logger()
    configure_logging("json", "info", stream=stream)
    log.info("late")
    assert [line["event"] for line in json_lines(stream)] == ["late"]


def test_pattern_shaped_secrets_are_scrubbed_from_the_event(stream: io.StringIO) -> None:
    """Bearer values, JWTs and def50200 refresh tokens are removed from the event text."""
    configure_logging("json", "info", stream=stream)
    get_logger().info(f"sent Authorization: Bearer {BEARER_VALUE} with {JWT} and {REFRESH}")
    output = stream.getvalue()
    assert_no_leak(output, BEARER_VALUE, JWT, REFRESH)
    (line,) = json_lines(stream)
    assert "Bearer [redacted]" in line["event"]
    assert "[redacted-jwt]" in line["event"]
    assert "[redacted-refresh-token]" in line["event"]


def test_secret_named_keys_are_redacted_at_any_depth(stream: io.StringIO) -> None:
    """access_token / refresh_token / client_secret / authorization values go, however deep."""
    configure_logging("json", "info", stream=stream)
    get_logger().info(
        "call",
        access_token=KEYED + "-a",
        Client_Secret=KEYED + "-c",
        request={
            "headers": {"Authorization": KEYED + "-h", "Accept": "application/json"},
            "form": [{"refresh_token": KEYED + "-r"}, ("tuple", f"Bearer {BEARER_VALUE}")],
        },
        tokens=[JWT, REFRESH],
    )
    output = stream.getvalue()
    assert_no_leak(output, KEYED, BEARER_VALUE, JWT, REFRESH)
    (line,) = json_lines(stream)
    assert line["access_token"] == "[redacted]"
    assert line["Client_Secret"] == "[redacted]"
    assert line["request"]["headers"] == {
        "Authorization": "[redacted]",
        "Accept": "application/json",
    }
    assert line["request"]["form"][0] == {"refresh_token": "[redacted]"}
    assert line["tokens"] == ["[redacted-jwt]", "[redacted-refresh-token]"]


def test_registered_secret_is_scrubbed_through_the_module_redactor(stream: io.StringIO) -> None:
    """The module-level redactor is in the pipeline: a registered opaque secret never shows."""
    secret = opaque()
    configure_logging("json", "info", stream=stream)
    broker.logs.redactor.register(secret)
    get_logger().info(f"token is {secret}", nested={"values": [f"x{secret}y"]})
    assert_no_leak(stream.getvalue(), secret)
    (line,) = json_lines(stream)
    assert line["event"] == "token is [redacted]"
    assert line["nested"] == {"values": ["x[redacted]y"]}


def test_secrets_in_an_exception_message_and_traceback_are_scrubbed(
    stream: io.StringIO,
) -> None:
    """log.exception inside `except` keeps the traceback but scrubs every secret in it."""
    secret = opaque()
    configure_logging("json", "info", stream=stream)
    broker.logs.redactor.register(secret)

    def fail(token: str, refresh: str) -> None:
        raise RuntimeError(f"upstream refused {token} / {refresh} / Bearer {BEARER_VALUE}")

    try:
        fail(secret, REFRESH)
    except RuntimeError:
        get_logger().exception("refresh_failed")
    assert_no_leak(stream.getvalue(), secret, REFRESH, BEARER_VALUE)
    (line,) = json_lines(stream)
    assert line["event"] == "refresh_failed"
    assert line["level"] == "error"
    assert "Traceback" in line["exception"]
    assert "RuntimeError: upstream refused [redacted]" in line["exception"]


def test_exception_passed_as_a_value_is_scrubbed(stream: io.StringIO) -> None:
    """An exception object given as a field is rendered as text without the secret in it."""
    configure_logging("json", "info", stream=stream)
    get_logger().warning("failed", error=ValueError(f"bad token {REFRESH}"))
    assert_no_leak(stream.getvalue(), REFRESH)
    (line,) = json_lines(stream)
    assert line["error"] == "ValueError: bad token [redacted-refresh-token]"


def test_console_format_renders_a_readable_scrubbed_line(stream: io.StringIO) -> None:
    """The console renderer prints one human line, still through the redactor."""
    configure_logging("console", "info", stream=stream)
    get_logger().info("hello_console", generation=7, header=f"Bearer {BEARER_VALUE}")
    output = stream.getvalue()
    assert_no_leak(output, BEARER_VALUE)
    (line,) = output.splitlines()
    assert "hello_console" in line
    assert "generation=7" in line
    assert not line.startswith("{")


def test_console_format_renders_an_exception_without_its_secret(stream: io.StringIO) -> None:
    """log.exception in console format shows the error, not the token inside it."""
    configure_logging("console", "info", stream=stream)
    try:
        raise RuntimeError(f"bad {REFRESH}")
    except RuntimeError:
        get_logger().exception("console_failure")
    output = stream.getvalue()
    assert_no_leak(output, REFRESH)
    assert "console_failure" in output
    assert "RuntimeError" in output


# -- a fresh Redactor, driven directly ------------------------------------------------------


def test_fresh_redactor_scrubs_only_what_it_was_given() -> None:
    """A new Redactor knows no secrets of other tests; after register() it scrubs them."""
    secret = opaque()
    redactor = Redactor()
    before = redactor(None, "info", {"event": f"has {secret}"})
    assert before["event"] == f"has {secret}"
    redactor.register(secret)
    after = redactor(None, "info", {"event": f"has {secret}"})
    assert after["event"] == "has [redacted]"


def test_short_values_are_not_registered() -> None:
    """Values under 8 characters (or None/empty) would scrub ordinary words: they are ignored."""
    redactor = Redactor()
    redactor.register("info", "", None, "1234567")
    event = redactor(None, "info", {"event": "info 1234567"})
    assert event["event"] == "info 1234567"


def test_longer_secret_wins_over_its_own_prefix() -> None:
    """When one secret starts another, the longer one is scrubbed whole, leaving no tail."""
    short = opaque()
    long = short + "-and-more-of-it"
    redactor = Redactor()
    redactor.register(short, long)
    event = redactor(None, "info", {"event": f"[{long}]"})
    assert event["event"] == "[[redacted]]"


@pytest.mark.parametrize(
    "key", ["access_token", "REFRESH_TOKEN", "client_secret", "Authorization", "cookie"]
)
def test_secret_keys_are_matched_case_insensitively(key: str) -> None:
    """A secret-named key is redacted whatever its case, even when its value looks harmless."""
    event = Redactor()(None, "info", {"event": "x", key: "harmless-looking"})
    assert event[key] == "[redacted]"


def test_bytes_and_tuples_are_scrubbed_and_keep_their_shape() -> None:
    """Bytes are decoded and scrubbed; tuples stay tuples; non-text values pass untouched."""
    redactor = Redactor()
    event = redactor(
        None,
        "info",
        {"event": "x", "raw": f"Bearer {BEARER_VALUE}".encode(), "pair": (JWT, 5), "n": 3},
    )
    assert event["raw"] == "Bearer [redacted]"
    assert event["pair"] == ("[redacted-jwt]", 5)
    assert event["n"] == 3


def test_ordinary_text_passes_through_unchanged() -> None:
    """Redaction does not eat ordinary words, ids or fingerprints."""
    text = "refreshed generation 4, fingerprint 1a2b3c4d, token expires in 600 s"
    event = Redactor()(None, "info", {"event": text, "status": 200})
    assert event == {"event": text, "status": 200}


def test_client_response_error_request_headers_are_scrubbed(stream: io.StringIO) -> None:
    """An aiohttp error carrying our request's headers logs without the bearer token in them."""
    token = opaque()
    broker.logs.redactor.register(token)
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {token}", "X-Secret": JWT}))
    info = RequestInfo(URL("https://example.amocrm.ru/api/v4/leads"), "GET", headers)
    error = ClientResponseError(info, (), status=401, message="Unauthorized", headers=headers)
    configure_logging("json", "info", stream=stream)
    try:
        raise error
    except ClientResponseError as exc:
        get_logger().exception(
            "upstream_failed", error=exc, request_headers=dict(exc.request_info.headers)
        )
    assert_no_leak(stream.getvalue(), token, JWT)
    assert json_lines(stream)[0]["request_headers"]["Authorization"] == "[redacted]"


def test_remembered_tokens_are_bounded_and_configured_secrets_are_kept() -> None:
    """Only the newest tokens are remembered; a permanent secret outlives any number of them."""
    redactor = Redactor(keep=3)
    client_secret = opaque()
    redactor.register(client_secret, permanent=True)
    tokens = [opaque() for _ in range(5)]
    for token in tokens:
        redactor.register(token)
    event = redactor(None, "info", {"event": " ".join([client_secret, *tokens])})
    assert_no_leak(event["event"], client_secret, *tokens[-3:])
    assert tokens[0] in event["event"]  # forgotten: rotated away long ago


def test_secrets_are_found_inside_longer_runs_and_with_odd_characters() -> None:
    """A secret glued to other token characters, or one with characters no token has (a
    database password), is scrubbed all the same."""
    token, password = opaque(), "p@ss word:with/odd#chars"
    redactor = Redactor()
    redactor.register(token)
    redactor.register(password, permanent=True)
    event = redactor(None, "info", {"event": f"x{token}y.{token}. url=pg://u:{password}@h"})
    assert event["event"] == "x[redacted]y.[redacted]. url=pg://u:[redacted]@h"


def test_a_thousand_accounts_secrets_are_all_scrubbed() -> None:
    """Each of a thousand accounts' client secrets stays scrubbed (registering one is O(1):
    no pattern of alternatives is rebuilt), and unrelated text stays as it was."""
    redactor = Redactor()
    secrets = [opaque() for _ in range(1000)]
    for secret in secrets:
        redactor.register(secret, permanent=True)
    text = " ".join(secrets[::97]) + " generation 4, fingerprint 1a2b3c4d"
    event = redactor(None, "info", {"event": text})
    assert event["event"] == " ".join(["[redacted]"] * len(secrets[::97])) + (
        " generation 4, fingerprint 1a2b3c4d"
    )


class CountingStream(io.StringIO):
    """A stream that counts its writes: each would be a system call on stderr."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_request_lines_are_batched_and_any_other_line_flushes_them() -> None:
    """`request` lines wait (≤ 0.1 s) to go out together; an audit line takes them along at once."""
    stream = CountingStream()
    output = LineOutput(stream)
    for n in range(10):
        output.info(json.dumps({"n": n, "event": "request", "status": 200}))
    assert stream.writes == 0
    output.info(json.dumps({"event": "token_refreshed", "generation": 2}))
    assert stream.writes == 1
    assert len(stream.getvalue().splitlines()) == 11
    output.info(json.dumps({"event": "request", "status": 200}))
    await asyncio.sleep(FLUSH_EVERY * 2)
    assert stream.writes == 2  # the timer flushed the lone request line


def test_without_an_event_loop_every_line_goes_out_at_once() -> None:
    """Outside the event loop (CLI commands), nothing waits for a timer that will not run."""
    stream = CountingStream()
    LineOutput(stream).info(json.dumps({"event": "request", "status": 200}))
    assert stream.writes == 1
